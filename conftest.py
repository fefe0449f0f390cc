"""Suite-wide settings for everything pytest collects (tests/ and the notebooks run by nbval).

Offline and quiet, and run outputs (checkpoints, the default results store) go to a temporary
folder instead of ./rft_runs next to the notebooks.
"""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RFT_PROGRESS", "off")

_RUNS_DIR: str | None = None


def pytest_configure(config):
    global _RUNS_DIR
    if not os.environ.get("RFT_RUNS_DIR"):
        _RUNS_DIR = tempfile.mkdtemp(prefix="rft-test-runs-")
        os.environ["RFT_RUNS_DIR"] = _RUNS_DIR


def pytest_unconfigure(config):
    if _RUNS_DIR is not None:
        shutil.rmtree(_RUNS_DIR, ignore_errors=True)
        os.environ.pop("RFT_RUNS_DIR", None)
