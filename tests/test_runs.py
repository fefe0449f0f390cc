"""Content-addressed runs: the same command finds the same run, resumes it, never retrains a
finished one unless forced, and the store keeps one run for it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rftlib.methods import get_config, run_method
from rftlib.results import ResultsStore, load, runs_dir
from rftlib.runs import RunFolder, RunIdentityError, RunInUseError, identity_of
from rftlib.train import NonFiniteLossError

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
        identity_of("finetune", "synthwild", "rft-tiny", None, 0,
                    get_config("finetune", "synthwild", {**SCHEDULE, "lr": 1e-3}), {"size": "tiny"}),
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


def test_a_folder_holding_another_run_is_refused_with_the_differences(data, tmp_path):
    out = tmp_path / "x"
    _run(data, out_dir=out)
    with pytest.raises(RunIdentityError) as err:
        run_method("finetune", data=data, clip=tiny_clip(), out_dir=out, progress="off",
                   overrides={**SCHEDULE, "lr": 1e-3, "batch_size": 16})
    message = str(err.value)
    assert "2 difference(s)" in message and "config.train.lr: 0.0003 -> 0.001" in message
    assert "config.train.batch_size: 32 -> 16" in message and "--out-dir" in message and "--force" in message
    assert len(ResultsStore().runs()) == 1  # nothing was registered for the refused run


def test_a_folder_in_use_by_a_live_process_is_refused(data, tmp_path):
    out = tmp_path / "busy"
    with RunFolder(out).acquire():
        with pytest.raises(RunInUseError, match=f"in use by pid {os.getpid()}"):
            _run(data, out_dir=out)
    _run(data, out_dir=out)  # released: the run goes ahead


def test_weights_that_turn_non_finite_are_never_checkpointed(data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as err:
        run_method("finetune", data=data, clip=tiny_clip(), out_dir=out, progress="off",
                   overrides={**SCHEDULE, "lr": 1e3, "warmup_steps": 0, "checkpoint_every": 1})
    for path in out.glob("ckpt-*.safetensors"):  # whatever was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())
    named = re.search(r"last (?:finite|good) checkpoint is (\S+?\.safetensors)", str(err.value))
    assert named is None or Path(named.group(1)).exists()


def test_choosing_on_a_test_split_is_refused_before_any_work(data):
    events: list = []
    with pytest.raises(ValueError, match="select_split='test' is a ood test split"):
        run_method("finetune", data=data, clip=tiny_clip(), callbacks=[events.append],
                   overrides={**SCHEDULE, "select_split": "test", "eval_splits": ["test"]})
    with pytest.raises(ValueError, match="select_split='id_test'"):
        run_method("linear_probe", data=data, clip=tiny_clip(), overrides={"select_split": "id_test"})
    assert events == [] and ResultsStore().runs().empty


def test_a_missing_gpu_is_named_before_anything_loads(data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run_method("zeroshot", data=data, model="ViT-B-16", pretrained="openai", device="cuda")


def test_settings_are_checked_before_the_data_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="epochs=0 is invalid"):  # not "iwildcam is missing"
        run_method("finetune", dataset="iwildcam", data_root=str(tmp_path / "nothing"), overrides={"epochs": 0})
    with pytest.raises(ValueError, match="alphas must be a list"):
        run_method("wiseft", dataset="fmow", data_root=str(tmp_path / "nothing"), overrides={"alphas": 0.5})


def test_a_held_folder_is_in_use_and_a_released_one_is_not(tmp_path):
    from rftlib.runs import RunFolder

    folder = RunFolder(tmp_path / "run")
    assert not folder.in_use()  # no lock file yet
    folder.acquire()
    assert RunFolder(tmp_path / "run").in_use()
    folder.release()
    assert not RunFolder(tmp_path / "run").in_use()
