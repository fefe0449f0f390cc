"""The one shared training loop.

:func:`fit` trains any :class:`rftlib.task.Task` with AdamW (the default; fused on CUDA) or SGD with
momentum (CRoFT's Dassl recipe; :func:`build_optimizer`) under a schedule of :mod:`rftlib.schedule`
(per-step warmup + cosine by default, or Dassl's per-epoch cosine after constant warm-up epochs);
optional gradient clipping, accumulation and gradient checkpointing; bf16 autocast on CUDA (fp32 on
CPU); DDP under ``torchrun``; evaluation on the ID validation split after every epoch with model
selection on it (never on test); and crash-safe checkpoints with exact resume.

Data order is a pure function of ``(seed, epoch)``: epoch ``e`` visits a fixed permutation of the
training split in global batches of ``batch_size`` (the last incomplete batch is dropped); with
``W`` ranks and ``A`` accumulation steps each rank sees ``batch_size / (W * A)`` examples per
micro-step. Augmented views are keyed by ``(seed, step, position in the global batch)``. Images
reach the model through :class:`rftlib.data.train_input.TrainInput` (decoded once in memory, or
streamed by worker processes; the run's log says which and why). Because of all that, and because
checkpoints store the optimizer, the step and the RNG state, a run killed at any point and resumed
from its last checkpoint ends with exactly the same weights as an uninterrupted run (bit-identical
on CPU), whatever the number of loader workers.

Logged scalars are averaged over the accumulation micro-steps and the ranks with one collective per
step, on the training device; a non-finite loss on any rank stops every rank before the optimiser
step.

Checkpoints (``out_dir``): ``ckpt-<step>.safetensors`` (+ JSON sidecar) holds the weights,
``state-<step>.pt`` the optimizer/step/RNG/selection state (plain tensors, read with
``weights_only=True``), and ``latest.json`` names the newest pair; it is replaced atomically after
both files are complete, so a crash mid-write never corrupts the last good checkpoint.
``best.safetensors`` holds the weights selected on ID val.

What the loop asks of a task (and when) is :mod:`rftlib.task`'s contract. The command line,
``python -m rftlib.train``, is :mod:`rftlib.cli` (it runs a method, which calls :func:`fit`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import dist as rdist
from .atomic import write_atomically, write_text_atomically
from .data.augment import Augment
from .data.base import RFTDataset
from .data.loading import LoaderSettings
from .data.pipeline import ImageSpec, normalize
from .data.train_input import StepLayout, TrainInput
from .evaluate import autocast_for, evaluate
from .models.checkpoint import load_checkpoint, load_train_state, read_latest, save_checkpoint
from .progress import progress
from .schedule import MIN_LR_MODES, SCHEDULES, schedule_for
from .task import Batch, Task

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every trainable method (methods embed one of these)."""

    epochs: int = 3                 # passes over the training split
    batch_size: int = 128           # global batch per optimiser step (all ranks, all micro-steps)
    lr: float = 1e-5                # peak learning rate
    optimizer: str = "adamw"        # "adamw" (WiSE-FT/FLYP; fused on CUDA) | "sgd" (with momentum: CRoFT/Dassl)
    momentum: float = 0.9           # SGD momentum (no Nesterov, no dampening; ignored by AdamW)
    weight_decay: float = 0.1       # on the task's param_groups: AdamW's decoupled decay, SGD's coupled L2 term
    schedule: str = "cosine"        # "cosine": per-step warmup + cosine | "epoch_cosine": Dassl's per-epoch cosine
    warmup_steps: int = 500         # cosine: linear warmup steps (clipped to the run length)
    warmup_epochs: int = 1          # epoch_cosine: epochs at the constant warmup_lr before the cosine
    warmup_lr: float = 1e-5         # epoch_cosine: the constant warm-up learning rate (Dassl's WARMUP_CONS_LR)
    min_lr: float = 0.0             # learning-rate floor; see min_lr_mode
    min_lr_mode: str = "flyp"       # "flyp": cosine*lr + min_lr; "floor": cosine from lr to min_lr
    grad_clip: float | None = None  # global gradient-norm clip (WiSE-FT uses 1.0; FLYP none)
    accum_steps: int = 1            # micro-steps per optimiser step
    amp: bool = True                # bf16 autocast on CUDA while training (ignored on CPU)
    eval_amp: bool = False          # bf16 for the per-epoch evaluations too (default fp32, as the papers)
    grad_checkpointing: bool = False  # recompute activations in the towers to save memory
    seed: int = 0                   # data order, initialisation of any new parameters
    select_split: str | None = "id_val"  # selection split (ID validation, never test); None = last epoch
    eval_splits: tuple[str, ...] = ("id_val",)  # splits evaluated after every epoch
    eval_batch_size: int = 256
    checkpoint_every: int = 0       # extra checkpoints every N steps (0: only at epoch ends)
    keep_checkpoints: int = 1       # how many step checkpoints to keep
    restore_best: bool = True       # end with the weights selected on select_split
    augment: str = "rrc"            # train views: "rrc" (the papers), "rrc_flip" (CRoFT), "none" (eval view)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (papers: 0.9-1; Dassl: 0.08-1)

    def __post_init__(self):
        _check_train_config(self)
        self.augmentation()  # an unknown augment or a bad crop_scale fails where it is set

    def augmentation(self) -> Augment:
        """The :class:`~rftlib.data.augment.Augment` these settings describe."""
        return Augment(self.augment, tuple(self.crop_scale))


OPTIMIZERS = ("adamw", "sgd")
_LOWEST = {"epochs": 1, "batch_size": 1, "accum_steps": 1, "eval_batch_size": 1, "warmup_steps": 0, "seed": 0,
           "checkpoint_every": 0, "keep_checkpoints": 0, "warmup_epochs": 0}  # integer settings, lowest valid value
_RATES = ("lr", "weight_decay", "min_lr", "warmup_lr")  # real settings >= 0
_SWITCHES = ("amp", "eval_amp", "grad_checkpointing", "restore_best")


def _check_train_config(cfg: TrainConfig) -> None:
    """Refuse a setting of the wrong type or out of range where it is set, so that a bad override
    fails while the config is resolved, naming the setting, and not some steps into a run."""
    values = vars(cfg)
    for name, low in _LOWEST.items():
        if isinstance(values[name], bool) or not isinstance(values[name], int) or values[name] < low:
            raise ValueError(f"{name}={values[name]!r} is invalid: it must be an integer >= {low}")
    for name in (*_RATES, *(("grad_clip",) if cfg.grad_clip is not None else ())):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r} is invalid: it must be a finite number >= 0")
    for name in _SWITCHES:
        if not isinstance(values[name], bool):
            raise ValueError(f"{name}={values[name]!r} is invalid: it must be true or false")
    if isinstance(cfg.momentum, bool) or not isinstance(cfg.momentum, numbers.Real) or not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum={cfg.momentum!r} is invalid: it must be a number in [0, 1)")
    for name, value, valid in (("optimizer", cfg.optimizer, OPTIMIZERS), ("schedule", cfg.schedule, SCHEDULES),
                               ("min_lr_mode", cfg.min_lr_mode, MIN_LR_MODES)):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if not (cfg.select_split is None or isinstance(cfg.select_split, str)):
        raise ValueError(f"select_split={cfg.select_split!r} is invalid: it must be a split name or null")
    if not isinstance(cfg.eval_splits, (list, tuple)) or not all(isinstance(n, str) for n in cfg.eval_splits):
        raise ValueError(f"eval_splits={cfg.eval_splits!r} is invalid: it must be a list of split names")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class Event:
    """Something the loop reports to callbacks: ``kind`` is ``step``, ``eval``, ``epoch`` or ``end``
    (and ``point`` for a method's knob-sweep point, sent by its run: ``step`` is then the point's
    index and ``data`` holds ``knobs``, ``split`` and ``metrics``)."""

    kind: str
    step: int
    epoch: int
    data: dict = field(default_factory=dict)


Callback = Callable[[Event], None]


@dataclass
class FitResult:
    steps: int
    best_epoch: int | None
    best_metric: float | None
    history: list[dict]
    best_checkpoint: Path | None
    last_checkpoint: Path | None


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 17)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Checkpointer:
    """Writes and finds step checkpoints in ``out_dir`` (main rank only)."""

    def __init__(self, out_dir: Path | None, task: Task, dataset: RFTDataset, keep: int):
        self.out_dir, self.task, self.dataset, self.keep = out_dir, task, dataset, keep

    def _save_weights(self, path: Path, extra: dict) -> Path:
        return save_checkpoint(path, self.task.checkpoint_state(), clip=self.task.clip,
                               classnames=self.dataset.classnames, method=self.task.method_name or None,
                               method_config=self.task.method_config, extra=extra)

    def save(self, step: int, train_state: dict) -> Path | None:
        if self.out_dir is None or not rdist.current().is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = self._save_weights(self.out_dir / f"ckpt-{step:08d}.safetensors", {"step": step})
        state_path = write_atomically(self.out_dir / f"state-{step:08d}.pt", lambda tmp: torch.save(train_state, tmp))
        latest = {"step": step, "weights": weights.name, "state": state_path.name}
        write_text_atomically(self.out_dir / "latest.json", json.dumps(latest))
        self._prune(step)
        return weights

    def save_best(self, extra: dict) -> Path | None:
        if self.out_dir is None or not rdist.current().is_main:
            return None
        return self._save_weights(self.out_dir / "best.safetensors", extra)

    def _prune(self, step: int) -> None:
        steps = sorted(int(p.stem.split("-")[1]) for p in self.out_dir.glob("ckpt-*.safetensors"))
        for old in steps[:-self.keep] if self.keep > 0 else []:
            for p in (f"ckpt-{old:08d}.safetensors", f"ckpt-{old:08d}.json", f"state-{old:08d}.pt"):
                (self.out_dir / p).unlink(missing_ok=True)

    def latest(self) -> tuple[Path, Path] | None:
        return read_latest(self.out_dir) if self.out_dir is not None else None


def _evaluate_epoch(task, dataset, cfg, spec, device, epoch, step, emit, settings) -> dict[str, dict]:
    model = task.classifier()
    results = {}
    for name in cfg.eval_splits:
        res = evaluate(model, dataset, name, spec, device=device, batch_size=cfg.eval_batch_size, amp=cfg.eval_amp,
                       settings=settings)
        results[name] = res.metrics
        emit(Event("eval", step, epoch, {"split": name, "role": res.role, "metrics": res.metrics}))
    return results


def fit(
    task: Task, dataset: RFTDataset, cfg: TrainConfig, *, spec: ImageSpec, device: str | torch.device = "cpu",
    out_dir: str | Path | None = None, resume: bool = True, callbacks: Sequence[Callback] = (),
    progress_mode: str | None = None, loader: LoaderSettings | None = None,
) -> FitResult:
    """Train ``task`` on ``dataset``'s ``train`` split. See the module docstring for the contract.

    Args:
        task: the method's task (owns the model and the objective).
        dataset: provides ``train``, the selection split and the evaluation splits.
        cfg: optimisation settings.
        spec: input geometry/normalisation of the model (``ImageSpec.of(clip)``).
        device: where to train.
        out_dir: checkpoint folder (``None``: no checkpoints, no resume).
        resume: continue from ``out_dir``'s latest checkpoint if there is one.
        callbacks: called with every :class:`Event` (live plots, results logging).
        loader: how images are read (workers, memory budget, bad images); default: the environment's.
    """
    device = torch.device(device)
    info = rdist.current()
    out = Path(out_dir) if out_dir is not None else None
    settings = loader or LoaderSettings()
    dataset.check_selection_split(cfg.select_split)
    if cfg.select_split is not None and cfg.select_split not in cfg.eval_splits:
        raise ValueError(f"select_split {cfg.select_split!r} must be one of eval_splits {cfg.eval_splits}")
    train = dataset.split("train")
    layout = StepLayout(len(train), cfg.batch_size, info.world_size, info.rank, cfg.accum_steps, cfg.seed)
    total = cfg.epochs * layout.steps_per_epoch
    lr_of = schedule_for(cfg, layout.steps_per_epoch)
    source = TrainInput(train, spec.size, layout, cfg.augmentation(), settings, pin_memory=device.type == "cuda")

    task.to(device)
    if cfg.grad_checkpointing and hasattr(task.clip.model, "set_grad_checkpointing"):
        task.clip.model.set_grad_checkpointing(True)
    opt = build_optimizer(task, cfg, device)
    runner: nn.Module = task
    if info.enabled:
        runner = nn.parallel.DistributedDataParallel(task, **ddp_options(task, device))
    ckpt = _Checkpointer(out, task, dataset, cfg.keep_checkpoints)
    emit = _emitter(callbacks)

    step, best, history, last_path = 0, {"metric": None, "epoch": None, "state": None}, [], None
    found = ckpt.latest() if resume else None
    if found is not None:
        weights, state_path = found
        state, _ = load_checkpoint(weights)
        task.load_checkpoint_state(state)
        train_state = load_train_state(state_path)
        opt.load_state_dict(train_state["optimizer"])
        _set_rng_state(train_state["rng"])
        step, history, last_path = train_state["step"], train_state["history"], weights
        best.update(metric=train_state["best_metric"], epoch=train_state["best_epoch"])
        if best["epoch"] is not None and (out / "best.safetensors").exists():
            best["state"] = load_checkpoint(out / "best.safetensors")[0]
        log.info("resumed from %s at step %d", weights.name, step)
    else:
        torch.manual_seed(cfg.seed)

    task.train()
    bar = progress(range(step, total), total=total - step, desc=f"train {task.method_name}", mode=progress_mode)
    batches = source.steps(step, total)
    skipping = settings.on_bad_image == "skip"
    uneven = info.enabled and skipping  # ranks may lose different numbers of images from a batch
    try:
        for step, micro_batches in zip(bar, batches):
            epoch = step // layout.steps_per_epoch
            lr = lr_of(step)
            for group in opt.param_groups:
                group["lr"] = lr
            scalars = _optimizer_step(runner, task, opt, micro_batches, spec, device, cfg, step, epoch, uneven,
                                      last_path)
            if skipping:
                scalars["skipped_images"] = source.skipped
            emit(Event("step", step + 1, epoch, {"lr": lr, **scalars}))
            end_of_epoch = (step + 1) % layout.steps_per_epoch == 0
            saving = end_of_epoch or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            if saving:  # every rank checks (their weights are equal), so none waits on a rank that raised
                require_finite_weights(task, step + 1, last_path)
            if end_of_epoch:
                task.eval()
                metrics = _evaluate_epoch(task, dataset, cfg, spec, device, epoch, step + 1, emit, settings)
                task.train()
                history.append({"epoch": epoch, "step": step + 1, "metrics": metrics})
                score = (metrics[cfg.select_split][dataset.headline_metric(cfg.select_split)]
                         if cfg.select_split else 0.0)
                if best["metric"] is None or score > best["metric"] or not cfg.select_split:
                    best.update(metric=score, epoch=epoch,
                                state={k: v.detach().cpu().clone() for k, v in task.checkpoint_state().items()})
                    ckpt.save_best({"epoch": epoch, "select_split": cfg.select_split, "score": score})
                emit(Event("epoch", step + 1, epoch, {"metrics": metrics, "best_epoch": best["epoch"]}))
            if saving:
                train_state = {"optimizer": opt.state_dict(), "step": step + 1, "rng": _rng_state(),
                               "history": history, "best_metric": best["metric"], "best_epoch": best["epoch"]}
                last_path = ckpt.save(step + 1, train_state) or last_path
    finally:
        batches.close()  # stops the loader's worker processes
    if cfg.restore_best and best["state"] is not None:
        task.load_checkpoint_state(best["state"])
    task.eval()
    emit(Event("end", total, cfg.epochs - 1, {"best_epoch": best["epoch"], "best_metric": best["metric"]}))
    return FitResult(total, best["epoch"], best["metric"], history,
                     out / "best.safetensors" if out and best["epoch"] is not None else None, last_path)


def build_optimizer(task: Task, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names over ``task.param_groups(cfg.weight_decay)``.

    ``adamw``: ``torch.optim.AdamW`` (decoupled decay; fused on CUDA). ``sgd``: ``torch.optim.SGD``
    with ``cfg.momentum`` (no dampening, no Nesterov) and each group's ``weight_decay`` as SGD's
    coupled L2 term (``g + wd * w``), as Dassl builds it for CoOp and CRoFT. The learning rate is set
    by the loop before every step (:func:`rftlib.schedule.schedule_for`).
    """
    groups = task.param_groups(cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, nesterov=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def require_finite_weights(task: Task, step: int, last_path: Path | None) -> None:
    """Refuse to evaluate or checkpoint weights that are not finite: the error names the last
    checkpoint that is (every saved checkpoint passed this check), so a resume never starts from NaN.

    Raises:
        NonFiniteLossError: naming the first non-finite tensor, the step and the last finite checkpoint.
    """
    for name, tensor in task.checkpoint_state().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = (f"the last finite checkpoint is {last_path}" if last_path
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(f"weights became non-finite by step {step} (first: {name}); nothing was "
                                     f"saved for this step and {where}. Lower lr or set grad_clip and start a "
                                     "new run")


def ddp_options(task: Task, device: torch.device) -> dict:
    """The ``DistributedDataParallel`` options for ``task`` on ``device``: the loop's own (this rank's
    GPU; buffers are not re-broadcast every step; gradients live in the communication buckets), then
    whatever :meth:`Task.ddp_kwargs` adds or overrides."""
    own = {"device_ids": [device.index] if device.type == "cuda" else None, "broadcast_buffers": False,
           "gradient_as_bucket_view": True}
    return {**own, **task.ddp_kwargs()}


def _emitter(callbacks: Sequence[Callback]) -> Callable[[Event], None]:
    def emit(event: Event) -> None:
        for cb in callbacks:
            cb(event)
    return emit


def _optimizer_step(runner, task, opt, micro_batches, spec, device, cfg, step, epoch, uneven, last_path):
    """Forward/backward over this rank's accumulation micro-steps, then one optimiser step.

    The logged scalars stay on the device until one all-reduce (over ranks) and one host copy at the
    end of the step; a non-finite mean loss raises on every rank before the weights change.
    """
    totals: dict[str, torch.Tensor] = {}
    for micro, mb in enumerate(micro_batches):
        batch = Batch(normalize(mb.images, spec, device), mb.labels.to(device, non_blocking=True), mb.indices,
                      step, epoch, mb.positions, cfg.batch_size, _step_generator(cfg.seed, step), uneven)
        sync = micro == cfg.accum_steps - 1 or runner is task
        with runner.no_sync() if not sync else _null():
            with autocast_for(device, cfg.amp):
                out = runner(batch)
            (out["loss"].float() / cfg.accum_steps).backward()
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float() / cfg.accum_steps
    if cfg.grad_clip:
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(list(task.trainable_parameters()), cfg.grad_clip)
    keys = list(totals)
    values = rdist.all_reduce_mean(torch.stack([totals[k].to(device).float().reshape(()) for k in keys]))
    scalars = dict(zip(keys, values.tolist()))
    if not math.isfinite(scalars["loss"]):
        where = f"the last good checkpoint is {last_path}" if last_path else "no checkpoint was written yet"
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss became {scalars['loss']} at step {step} (epoch {epoch}); {where}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    task.after_optimizer_step()
    return scalars


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":  # ``python -m rftlib.train ...``: the command line lives in rftlib.cli
    from .cli import main  # imported here, so that importing the loop never imports the methods layer

    main()
