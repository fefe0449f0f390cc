"""Test-wide settings: offline, quiet, and results written to a temporary store."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RFT_PROGRESS", "off")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_results_db(tmp_path, monkeypatch):
    """Every test writes results to its own temporary SQLite file."""
    monkeypatch.setenv("RFT_RESULTS_DB", str(tmp_path / "results.db"))
