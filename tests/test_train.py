"""The shared training loop: schedule, exact resume after a real kill, DDP parity, failure modes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rftlib.data import get_dataset
from rftlib.data.pipeline import ImageSpec
from rftlib.methods.finetune import FinetuneTask
from rftlib.models import build_zeroshot_head, load_clip
from rftlib.results import ResultsStore, load
from rftlib.schedule import lr_at
from rftlib.task import Batch, Task
from rftlib.train import NonFiniteLossError, TrainConfig, ddp_options, fit

from .fakes import write_image_folder
from .helpers import launch_two_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "tiny_fit.py"


def test_schedule_values():
    kw = dict(base=1.0, warmup=10, total=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)
    assert lr_at(109, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    # FLYP's min_lr sits on top of the cosine; "floor" decays from base to min_lr
    assert lr_at(10, **kw, min_lr=0.1) == pytest.approx(1.1)
    assert lr_at(110, **kw, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(10, **kw, min_lr=0.1, mode="floor") == pytest.approx(1.0)
    assert lr_at(110, **kw, min_lr=0.1, mode="floor") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="valid modes"):
        lr_at(0, **kw, mode="nope")


def _run(args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT, **kw)


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol == 0.0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            assert torch.allclose(wa[k], wb[k], atol=atol), (k, (wa[k] - wb[k]).abs().max())


def _assert_same_update(init: dict, a: dict, b: dict, rel: float = 0.1):
    """Two runs made the same update, up to float reduction order.

    Adam turns float noise on near-zero gradients into lr-sized steps (the attention key bias has
    an exactly zero gradient in theory), so each tensor's change is compared relative to its size.
    """
    moved = 0
    for k in a:
        da, db = a[k] - init[k], b[k] - init[k]
        assert (da - db).norm() <= rel * da.norm() + 1e-6, (k, (da - db).norm(), da.norm())
        moved += int(da.norm() > 0)
    assert moved > 10  # the comparison is not vacuous


@pytest.fixture(scope="module")
def image_folder(data, tmp_path_factory):
    """tiny synthwild as 48x40 JPEG files: 96 training images (6 steps of 16 per epoch)."""
    return write_image_folder(tmp_path_factory.mktemp("files"), data, per_split=96)


def _source_args(source: str, folder) -> list[str]:
    """tiny_fit.py arguments: in-memory arrays with views cut in-process, or files streamed by workers."""
    if source == "arrays":
        return ["--augment", "rrc_flip"]
    return ["--folder", str(folder), "--workers", "2", "--augment", "rrc"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["arrays", "files"])
def test_resume_after_kill_is_bit_identical(tmp_path, source, image_folder):
    """SIGKILL mid-training, start again: the same final weights, with augmentation on (and, for
    files, two loader worker processes)."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    extra = _source_args(source, image_folder)
    _run(["--out", str(clean), *extra], check=True, timeout=300)
    total = json.loads((clean / "latest.json").read_text())["step"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(killed), "--slow", "0.3", *extra],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    latest = killed / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 9):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(latest.read_text())["step"]
    assert 9 <= step < total, "the kill must land mid-training"
    assert not (killed / "final.safetensors").exists()
    _run(["--out", str(killed), *extra], check=True, timeout=300)  # resumes from the last checkpoint
    _assert_same_weights(clean / "final.safetensors", killed / "final.safetensors")
    _assert_same_weights(clean / f"ckpt-{total:08d}.safetensors", killed / f"ckpt-{total:08d}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method,source", [("finetune", "arrays"), ("flyp", "arrays"), ("flyp", "files")])
def test_ddp_two_processes_match_single_process(tmp_path, method, source, image_folder):
    """Two gloo ranks, each reading its half of every global batch, make the update one process
    makes, with augmentation on: the same crops reach the same positions."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--method", method, "--epochs", "1", "--checkpoint-every", "0", *_source_args(source, image_folder)]
    _run([*common, "--out", str(single)], check=True, timeout=300)
    assert launch_two_ranks([sys.executable, str(SCRIPT), *common, "--out", str(ddp)],
                            {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT)
    init = load_file(str(single / "init.safetensors"))
    assert init.keys() == load_file(str(ddp / "init.safetensors")).keys()
    _assert_same_update(init, load_file(str(single / "final.safetensors")), load_file(str(ddp / "final.safetensors")))


@pytest.mark.slow
def test_two_rank_cli_run_is_recorded_once(tmp_path):
    """Under torchrun every rank runs the method; the run id is the main rank's and only it writes."""
    db = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "rftlib.train", "--method", "finetune", "--model", "rft-tiny", "--pretrained", "none",
           "--data-option", "size=tiny", "cache=false", "--set", "epochs=1", "batch_size=32", "warmup_steps=1",
           "select_split=null", "eval_splits=[]", "--results-db", str(db), "--progress", "off", "--workers", "0"]
    assert launch_two_ranks(cmd, {**os.environ, "PYTHONPATH": str(ROOT), "RFT_RUNS_DIR": str(tmp_path / "runs")}, ROOT)
    runs = ResultsStore(db).runs()
    assert len(runs) == 1 and runs.status.tolist() == ["done"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == runs.run_id.tolist()  # one checkpoint folder
    rows = load(db)  # without per-epoch evaluation, each (split, metric) is written once by the final evaluation
    assert len(rows) == 4 * 3 and not rows.duplicated(["split", "metric"]).any()


class _ExplodingTask(FinetuneTask):
    def training_step(self, batch: Batch):
        out = super().training_step(batch)
        if batch.step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    clip = load_clip("rft-tiny", None)
    data = get_dataset("synthwild", size="tiny", cache=False)
    task = _ExplodingTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_steps=1, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*ckpt-00000002"):
        fit(task, data, cfg, spec=ImageSpec.of(clip), out_dir=tmp_path)


def test_bad_batch_and_split_settings_fail_clearly():
    torch.manual_seed(0)
    clip = load_clip("rft-tiny", None)
    data = get_dataset("synthwild", size="tiny", cache=False)
    task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    spec = ImageSpec.of(clip)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        fit(task, data, TrainConfig(batch_size=100_000), spec=spec)
    with pytest.raises(ValueError, match="multiple of world_size x accum_steps"):
        fit(task, data, TrainConfig(batch_size=10, accum_steps=3), spec=spec)
    with pytest.raises(ValueError, match="select_split 'val' must be one of"):
        fit(task, data, TrainConfig(select_split="val"), spec=spec)
    with pytest.raises(ValueError, match="select_split='test' is a ood test split"):  # never choose on test
        fit(task, data, TrainConfig(select_split="test", eval_splits=("test",)), spec=spec)


@pytest.mark.parametrize(("setting", "message"), [
    ({"epochs": "ten"}, "epochs='ten' is invalid"),
    ({"epochs": 0}, "epochs=0 is invalid: it must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0 is invalid"),
    ({"lr": -1e-5}, "lr=-1e-05 is invalid"),
    ({"grad_clip": float("nan")}, "grad_clip=nan is invalid"),
    ({"amp": "yes"}, "amp='yes' is invalid"),
    ({"min_lr_mode": "linear"}, "valid: flyp, floor"),
    ({"eval_splits": "id_val"}, "must be a list of split names"),
])
def test_train_config_refuses_bad_settings_where_they_are_set(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**setting)


def test_accumulation_matches_one_big_batch():
    """Two micro-steps of 8 give the same update as one step of 16 (mean loss)."""
    data = get_dataset("synthwild", size="tiny", cache=False)
    finals = []
    for accum in (1, 2):
        torch.manual_seed(0)
        clip = load_clip("rft-tiny", None)
        task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
        init = {k: v.clone() for k, v in task.checkpoint_state().items()}
        cfg = TrainConfig(epochs=1, batch_size=16, accum_steps=accum, lr=1e-3, warmup_steps=1, restore_best=False)
        fit(task, data, cfg, spec=ImageSpec.of(clip))
        finals.append(task.checkpoint_state())
    _assert_same_update(init, finals[0], finals[1])


def test_task_interface_is_explicit():
    with pytest.raises(NotImplementedError):
        Task().classifier()


class _SometimesUnusedTask(Task):
    def ddp_kwargs(self) -> dict:
        return {"find_unused_parameters": True, "broadcast_buffers": True}


def test_ddp_options_are_the_loops_then_the_tasks():
    assert Task().ddp_kwargs() == {}
    own = {"device_ids": None, "broadcast_buffers": False, "gradient_as_bucket_view": True}
    assert ddp_options(Task(), torch.device("cpu")) == own
    assert ddp_options(_SometimesUnusedTask(), torch.device("cuda", 1)) == {
        **own, "device_ids": [1], "find_unused_parameters": True, "broadcast_buffers": True}


def test_cli_trains_and_prints_a_summary(tmp_path):
    cmd = [sys.executable, "-m", "rftlib.train", "--method", "finetune", "--model", "rft-tiny", "--pretrained", "none",
           "--data-option", "size=tiny", "cache=false", "--set", "epochs=1", "batch_size=32", "warmup_steps=1",
           "--out-dir", str(tmp_path / "run"), "--results-db", str(tmp_path / "r.db"), "--progress", "off"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["method"] == "finetune" and set(summary["metrics"]) >= {"id_test", "test"}
    assert (tmp_path / "run" / "best.safetensors").exists()
    bad = subprocess.run([*cmd[:4], "nope"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode != 0 and "valid methods" in bad.stderr


def test_evaluation_runs_in_fp32_unless_bf16_is_asked_for(monkeypatch):
    """The references evaluate in fp32: every evaluation (final and per-epoch) asks for no autocast
    by default; ``amp=True`` / ``eval_amp=True`` opt into bf16 on CUDA."""
    import rftlib.evaluate as evaluation

    asked = []
    real = evaluation.autocast_for
    monkeypatch.setattr(evaluation, "autocast_for", lambda device, enabled=True: asked.append(enabled) or
                        real(device, enabled))
    torch.manual_seed(0)
    clip = load_clip("rft-tiny", None)
    data = get_dataset("synthwild", size="tiny", cache=False)
    task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    spec = ImageSpec.of(clip)
    fit(task, data, TrainConfig(epochs=1, batch_size=32, warmup_steps=1), spec=spec)  # one per-epoch evaluation
    evaluation.evaluate(task.classifier(), data, "test", spec)
    assert asked and not any(asked)
    evaluation.evaluate(task.classifier(), data, "test", spec, amp=True)
    assert asked[-1] is True
    assert real("cuda", False).__class__.__name__ == "nullcontext"
