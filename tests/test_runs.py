"""Content-addressed runs: the same command finds the same run, resumes it, never retrains a
finished one unless forced, and the store keeps one run for it."""

from __future__ import annotations

import pytest
import torch

from rftlib.methods import get_config, run_method
from rftlib.results import ResultsStore, load, runs_dir
from rftlib.runs import identity_of

from .helpers import tiny_clip

SCHEDULE = {"epochs": 2, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 3}


class Interrupt(Exception):
    """Stands in for a kill in the middle of training."""


def _steps(events) -> list[int]:
    return [e.step for e in events if e.kind == "step"]


def _run(data, callbacks=(), **kwargs):
    return run_method("finetune", data=data, clip=tiny_clip(), overrides=SCHEDULE, progress="off",
                      callbacks=callbacks, **kwargs)


def test_the_run_id_is_a_function_of_what_decides_the_result(data):
    cfg = get_config("finetune", "synthwild", SCHEDULE)
    base = identity_of("finetune", "synthwild", "rft-tiny", None, 0, cfg, {"size": "tiny"})
    assert base.run_id() == identity_of("finetune", "synthwild", "rft-tiny", None, 0, cfg, {"size": "tiny"}).run_id()
    assert base.run_id().startswith("finetune-synthwild-")
    changed = [
        identity_of("finetune", "synthwild", "rft-tiny", None, 1, cfg, {"size": "tiny"}),
        identity_of("finetune", "synthwild", "rft-tiny", None, 0, get_config("finetune", "synthwild",
                                                                             {**SCHEDULE, "lr": 1e-3}), {"size": "tiny"}),
        identity_of("finetune", "synthwild", "rft-tiny", None, 0, cfg, {"size": "small"}),
        identity_of("finetune", "synthwild", "ViT-B-16", "openai", 0, cfg, {"size": "tiny"}),
    ]
    assert len({base.run_id(), *(c.run_id() for c in changed)}) == 5


def test_running_the_same_command_again_resumes_then_reuses(data):
    store = ResultsStore()
    events: list = []

    def stop_after_step_4(event):
        events.append(event)
        if event.kind == "step" and event.step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(data, [stop_after_step_4])
    (run,) = store.runs()["run_id"]
    assert store.run_status(run) == "failed" and (runs_dir() / run).is_dir()

    resumed: list = []
    first = _run(data, [resumed.append])
    assert first.run_id == run and _steps(resumed)[0] == 4  # continued after the checkpoint at step 3
    assert store.runs()["status"].tolist() == ["done"]
    rows = len(load())

    again: list = []
    second = _run(data, [again.append])
    assert second.run_id == run and _steps(again) == []  # finished: nothing is trained again
    assert len(load()) == rows and len(store.runs()) == 1  # its rows were replaced, not duplicated
    assert second.metrics == first.metrics

    fresh = run_method("finetune", data=data, clip=tiny_clip(), overrides=SCHEDULE, progress="off",
                       out_dir=runs_dir() / "uninterrupted", results_db=str(runs_dir() / "other.db"))
    for name, tensor in fresh.clip.model.state_dict().items():  # the resumed run ends where an uninterrupted one does
        assert torch.equal(tensor, first.clip.model.state_dict()[name]), name


def test_force_retrains_from_scratch_and_keeps_one_run(data, tmp_path):
    done = _run(data)
    marker = runs_dir() / done.run_id / "marker.txt"
    marker.write_text("from the first training")
    events: list = []
    forced = _run(data, [events.append], force=True)
    assert forced.run_id == done.run_id and _steps(events)[0] == 1 and not marker.exists()
    assert len(ResultsStore().runs()) == 1
    assert load(kind="final").groupby(["split", "metric"]).size().eq(1).all()

    explicit = tmp_path / "mine"
    _run(data, out_dir=explicit)
    (explicit / "notes.txt").write_text("mine")
    _run(data, out_dir=explicit, force=True)  # a folder the user chose is moved aside, never deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
