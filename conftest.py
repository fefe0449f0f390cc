"""Suite-wide settings for everything pytest collects (tests/ and the notebooks run by nbval).

Offline and quiet, and run outputs (checkpoints, the default results store) go to a temporary
folder instead of ./rft_runs next to the notebooks; caches (the synthwild world, decoded evaluation
splits of the fabricated datasets) go to another instead of ~/.cache/rftlib.
"""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RFT_PROGRESS", "off")

_TEMPORARY: dict[str, str] = {}


def pytest_configure(config):
    for name, prefix in (("RFT_RUNS_DIR", "rft-test-runs-"), ("RFT_CACHE_DIR", "rft-test-cache-")):
        if not os.environ.get(name):
            _TEMPORARY[name] = os.environ[name] = tempfile.mkdtemp(prefix=prefix)


def pytest_unconfigure(config):
    for name, folder in _TEMPORARY.items():
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(name, None)
