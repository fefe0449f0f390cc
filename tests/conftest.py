"""Test-wide settings: offline, quiet, and results written to a temporary store."""

import pytest

# offline/quiet settings and a temporary RFT_RUNS_DIR come from the repository's root conftest.py


@pytest.fixture(autouse=True)
def _isolated_results_db(tmp_path, monkeypatch):
    """Every test writes results to its own temporary SQLite file and runs in its own runs folder
    (run folders are named by content: two tests running the same method, data and config must not
    find each other's runs)."""
    monkeypatch.setenv("RFT_RESULTS_DB", str(tmp_path / "results.db"))
    monkeypatch.setenv("RFT_RUNS_DIR", str(tmp_path / "rft_runs"))


@pytest.fixture(scope="module")
def data():
    """The tiny synthwild world, generated once per test module (not cached on disk)."""
    from rftlib.data import get_dataset

    return get_dataset("synthwild", size="tiny", cache=False)


# -- the method registry as the registry-driven tests see it (test_methods, test_method_resume,
# -- test_notebooks): nothing here names a method, so a newly registered one is tested as it is.
TINY_SCHEDULE = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}


def method_trains(name: str) -> bool:
    """Whether a registered method trains with the shared loop: its ``Config`` has a ``train`` field
    holding a :class:`rftlib.train.TrainConfig` (the declared contract; zero-shot, the linear probe
    and WiSE-FT's merge have none)."""
    import dataclasses

    from rftlib.methods import get_method
    from rftlib.train import TrainConfig

    config = get_method(name).Config
    return "train" in {f.name for f in dataclasses.fields(config)} and isinstance(config().train, TrainConfig)


def trained_methods() -> list[str]:
    from rftlib.methods import list_methods

    return [name for name in list_methods() if method_trains(name)]


def tiny_overrides(name: str, schedule: dict = TINY_SCHEDULE) -> dict:
    """Overrides that make a registered method's run tiny, derived from its config.

    The keys of ``schedule`` that the config accepts (:func:`rftlib.methods.common.config_options`,
    the rule notebook sessions use for ``epochs``/``batch_size``): a one-epoch schedule for a method
    that trains, nothing for one that does not. A field named ``*_overrides`` holds the overrides of
    a base run the method trains first (WiSE-FT's ``base_overrides``, DPS's ``reference_overrides``);
    it gets ``schedule`` too.
    """
    import dataclasses

    from rftlib.methods import get_method
    from rftlib.methods.common import config_options

    config = get_method(name).Config
    accepted = config_options(config)
    overrides = {key: value for key, value in schedule.items() if key in accepted}
    base_runs = [f.name for f in dataclasses.fields(config) if f.name.endswith("_overrides")]
    return {**overrides, **{field: dict(schedule) for field in base_runs}}
