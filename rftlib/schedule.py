"""Per-step learning-rate schedule shared by every method (the WiSE-FT / FLYP recipe).

Linear warmup for ``warmup`` steps, ``lr_t = base * (t + 1) / warmup``, then cosine decay
``lr_t = 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup))) * base``. FLYP adds ``min_lr`` on
top of the cosine (so the post-warmup peak is ``base + min_lr`` and the floor is ``min_lr``); that
is the ``"flyp"`` semantics. ``"floor"`` instead decays from ``base`` to ``min_lr``.
"""

from __future__ import annotations

import math

MIN_LR_MODES = ("flyp", "floor")


def lr_at(step: int, *, base: float, warmup: int, total: int, min_lr: float = 0.0, mode: str = "flyp") -> float:
    """Learning rate at optimiser step ``step`` (0-based)."""
    if mode not in MIN_LR_MODES:
        raise ValueError(f"unknown min_lr mode {mode!r}; valid modes: {', '.join(MIN_LR_MODES)}")
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    if mode == "flyp":
        return cosine * base + min_lr
    return min_lr + cosine * (base - min_lr)
