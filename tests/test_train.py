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
from rftlib.schedule import epoch_lr_at, lr_at, schedule_for
from rftlib.task import Batch, Task
from rftlib.train import NonFiniteLossError, TrainConfig, build_optimizer, ddp_options, fit

from .fakes import write_image_folder
from .helpers import launch_two_ranks, python_path

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


def test_epoch_cosine_schedule_values():
    """Dassl's schedule (CoOp, CRoFT): constant warm-up epochs, then a per-epoch cosine of period
    ``epochs`` restarted after the warm-up; every step of an epoch has the same lr. Hand-computed:
    0.5 * (1 + cos(pi * k / 5)) = 1, 0.904508, 0.654508, 0.345492 for k = 0..3."""
    cfg = TrainConfig(schedule="epoch_cosine", lr=2e-3, epochs=5, warmup_epochs=1, warmup_lr=1e-5)
    lr_of = schedule_for(cfg, steps_per_epoch=3)
    table = [1e-5, 2e-3, 1.809017e-3, 1.309017e-3, 0.690983e-3]
    assert [lr_of(step) for step in range(15)] == pytest.approx([lr for lr in table for _ in range(3)], rel=1e-6)
    # two warm-up epochs shift the cosine by one epoch; min_lr works as in the step schedule
    assert [epoch_lr_at(e, base=1.0, epochs=4, warmup_epochs=2, warmup_lr=0.01) for e in range(4)] == \
        pytest.approx([0.01, 0.01, 1.0, 0.5 * (1 + math.cos(math.pi / 4))])
    assert epoch_lr_at(2, base=1.0, epochs=4, warmup_epochs=0, min_lr=0.1, mode="floor") == pytest.approx(0.55)
    assert epoch_lr_at(0, base=1.0, epochs=4, warmup_epochs=0) == 1.0  # no warm-up: the cosine's start
    # the default per-step schedule is what it was
    step_cfg = TrainConfig(lr=1.0, epochs=11, warmup_steps=10)
    assert [schedule_for(step_cfg, 10)(t) for t in (0, 9, 60, 109)] == \
        [lr_at(t, base=1.0, warmup=10, total=110) for t in (0, 9, 60, 109)]


class _DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ``ConstantWarmupScheduler`` (dassl/optim/lr_scheduler.py) around its successor."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


@pytest.mark.parametrize("warmup_epochs", [1, 2])
def test_epoch_cosine_matches_dassls_schedulers(warmup_epochs):
    """Dassl's build_lr_scheduler for CoOp/CRoFT configs (cosine, constant warm-up, WARMUP_RECOUNT),
    stepped after the last batch of every epoch: the lr each epoch runs at."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30.0)
    scheduler = _DasslConstantWarmup(opt, cosine, warmup_epochs, 1e-5)
    dassl = []
    for _ in range(30):
        dassl.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = [epoch_lr_at(e, base=2e-3, epochs=30, warmup_epochs=warmup_epochs, warmup_lr=1e-5) for e in range(30)]
    assert ours == pytest.approx(dassl, rel=1e-9)


class _Groups:
    def __init__(self, weight):
        self.weight = weight

    def param_groups(self, weight_decay):
        return [{"params": [self.weight], "weight_decay": weight_decay}]


def test_optimizer_choice():
    """AdamW (the default: decoupled decay) or SGD with momentum and coupled L2 decay, as Dassl's."""
    cfg = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.5, momentum=0.9)
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    opt = build_optimizer(_Groups(weight), cfg, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["dampening"], group["weight_decay"]) == (0.9, False, 0.0, 0.5)
    for _ in range(2):
        weight.grad = torch.tensor([1.0])
        opt.step()
    # step 1: buf = 1 + 0.5 * 2 = 2, w = 2 - 0.1 * 2 = 1.8; step 2: buf = 0.9 * 2 + (1 + 0.5 * 1.8) = 3.7
    assert weight.item() == pytest.approx(1.8 - 0.1 * 3.7)
    adamw = build_optimizer(_Groups(torch.nn.Parameter(torch.ones(1))), TrainConfig(), torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and not adamw.defaults["fused"]


def test_sgd_and_epoch_cosine_resume_exactly(tmp_path):
    """A run stopped mid-epoch and resumed from its last checkpoint (SGD's momentum buffers in the
    train state) ends with the same weights as an uninterrupted one; the loop runs the per-epoch
    schedule (one lr per epoch)."""
    data = get_dataset("synthwild", size="tiny", cache=False)
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, schedule="epoch_cosine", warmup_epochs=1,
                      warmup_lr=0.01, checkpoint_every=4, restore_best=False, select_split=None, eval_splits=())

    def train(out, callbacks=()):
        torch.manual_seed(0)
        clip = load_clip("rft-tiny", None)
        task = FinetuneTask(clip, build_zeroshot_head(clip, data.classnames, data.templates))
        fit(task, data, cfg, spec=ImageSpec.of(clip), out_dir=out, callbacks=callbacks)
        return task.checkpoint_state()

    lrs = []
    clean = train(tmp_path / "clean", [lambda e: lrs.append(e.data["lr"]) if e.kind == "step" else None])
    assert lrs == [0.01] * 6 + [0.05] * 6  # 200 images, batch 32: 6 steps per epoch

    def stop(event):
        if event.kind == "step" and event.step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", [stop])
    assert json.loads((tmp_path / "resumed" / "latest.json").read_text())["step"] == 8
    state = torch.load(tmp_path / "resumed" / "state-00000008.pt", weights_only=True)
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    steps = []
    resumed = train(tmp_path / "resumed", [lambda e: steps.append(e.step) if e.kind == "step" else None])
    assert steps[0] == 9  # it went on from step 8, not from the start
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)


def _run(args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": python_path(ROOT), **(env or {})}
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
                            env={**os.environ, "PYTHONPATH": python_path(ROOT)}, cwd=ROOT)
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
                            {**os.environ, "PYTHONPATH": python_path(ROOT)}, ROOT)
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
    env = {**os.environ, "PYTHONPATH": python_path(ROOT), "RFT_RUNS_DIR": str(tmp_path / "runs")}
    assert launch_two_ranks(cmd, env, ROOT)
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
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; valid: adamw, sgd"),
    ({"schedule": "step"}, "unknown schedule 'step'; valid: cosine, epoch_cosine"),
    ({"momentum": 1.0}, r"momentum=1.0 is invalid: it must be a number in \[0, 1\)"),
    ({"warmup_epochs": -1}, "warmup_epochs=-1 is invalid"),
    ({"warmup_lr": float("inf")}, "warmup_lr=inf is invalid"),
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
                         env={**os.environ, "PYTHONPATH": python_path(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["method"] == "finetune" and set(summary["metrics"]) >= {"id_test", "test"}
    assert (tmp_path / "run" / "best.safetensors").exists()
    bad = subprocess.run([*cmd[:4], "nope"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": python_path(ROOT)})
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
