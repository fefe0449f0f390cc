"""Test-wide settings: offline, quiet, and results written to a temporary store."""

import pytest

# offline/quiet settings and a temporary RFT_RUNS_DIR come from the repository's root conftest.py


@pytest.fixture(autouse=True)
def _isolated_results_db(tmp_path, monkeypatch):
    """Every test writes results to its own temporary SQLite file."""
    monkeypatch.setenv("RFT_RESULTS_DB", str(tmp_path / "results.db"))


@pytest.fixture(scope="module")
def data():
    """The tiny synthwild world, generated once per test module (not cached on disk)."""
    from rftlib.data import get_dataset

    return get_dataset("synthwild", size="tiny", cache=False)
