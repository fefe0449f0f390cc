"""Learning-rate schedules shared by every method: the lr at each optimiser step of a run.

``schedule="cosine"`` (the default; the WiSE-FT / FLYP recipe) is updated every step: linear warmup
for ``warmup`` steps, ``lr_t = base * (t + 1) / warmup``, then cosine decay
``lr_t = 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup))) * base``.

``schedule="epoch_cosine"`` (Dassl's, which CoOp and CRoFT train with) is updated once per epoch:
the first ``warmup_epochs`` epochs run at the constant ``warmup_lr`` (Dassl's ``constant`` warm-up,
``WARMUP_CONS_LR``), then epoch ``e`` runs at ``0.5 * (1 + cos(pi * (e - warmup_epochs) / epochs))
* base``: ``CosineAnnealingLR(T_max=epochs)`` restarted when the warm-up ends (Dassl's
``WARMUP_RECOUNT=True``), so the cosine's period is the whole run and it never reaches its floor
(with 30 epochs and one warm-up epoch the last epoch runs at ``0.5 * (1 + cos(28 pi / 30)) * base``).

FLYP adds ``min_lr`` on top of the cosine (so the post-warmup peak is ``base + min_lr`` and the
floor is ``min_lr``); that is the ``"flyp"`` semantics. ``"floor"`` instead decays from ``base``
to ``min_lr`` (``CosineAnnealingLR``'s ``eta_min``). Both schedules take both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_LR_MODES = ("flyp", "floor")
SCHEDULES = ("cosine", "epoch_cosine")


def _check_mode(mode: str) -> None:
    if mode not in MIN_LR_MODES:
        raise ValueError(f"unknown min_lr mode {mode!r}; valid modes: {', '.join(MIN_LR_MODES)}")


def _cosine(frac: float, base: float, min_lr: float, mode: str) -> float:
    """The cosine from ``base`` at ``frac = 0`` to its floor at ``frac = 1`` (``min_lr`` as ``mode`` says)."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    if mode == "flyp":
        return cosine * base + min_lr
    return min_lr + cosine * (base - min_lr)


def lr_at(step: int, *, base: float, warmup: int, total: int, min_lr: float = 0.0, mode: str = "flyp") -> float:
    """Learning rate at optimiser step ``step`` (0-based) of the per-step ``cosine`` schedule."""
    _check_mode(mode)
    if step < warmup:
        return base * (step + 1) / warmup
    return _cosine((step - warmup) / max(1, total - warmup), base, min_lr, mode)


def epoch_lr_at(epoch: int, *, base: float, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                min_lr: float = 0.0, mode: str = "flyp") -> float:
    """Learning rate during epoch ``epoch`` (0-based) of the per-epoch ``epoch_cosine`` schedule."""
    _check_mode(mode)
    if epoch < warmup_epochs:
        return warmup_lr
    return _cosine((epoch - warmup_epochs) / max(1, epochs), base, min_lr, mode)


def schedule_for(cfg, steps_per_epoch: int) -> Callable[[int], float]:
    """``step -> lr`` for a run with the settings of ``cfg`` (a :class:`rftlib.train.TrainConfig`:
    ``schedule``, ``lr``, ``epochs``, ``warmup_steps`` or ``warmup_epochs``/``warmup_lr``,
    ``min_lr``, ``min_lr_mode``) and ``steps_per_epoch`` optimiser steps per epoch.

    The step schedule's warmup is clipped to the run's length.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    mode, min_lr, per_epoch = cfg.min_lr_mode, cfg.min_lr, max(1, steps_per_epoch)
    if cfg.schedule == "epoch_cosine":
        return lambda step: epoch_lr_at(step // per_epoch, base=cfg.lr, epochs=cfg.epochs,
                                        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=min_lr,
                                        mode=mode)
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total)
    return lambda step: lr_at(step, base=cfg.lr, warmup=warmup, total=total, min_lr=min_lr, mode=mode)
