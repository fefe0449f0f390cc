"""Train-time augmentation as the papers run it, with randomness that resume and DDP cannot change.

Kinds (the ``augment`` knob of :class:`rftlib.train.TrainConfig`):

* ``none`` -- the evaluation view (resize the shorter side, centre crop); what rftlib trained on
  before augmentation existed, and what synthwild's presets keep.
* ``rrc`` -- ``RandomResizedCrop(S, scale, ratio=(3/4, 4/3), bicubic)``: the *only* augmentation of
  WiSE-FT, FLYP, DPS, DRM and R-Adapter, with ``scale=(0.9, 1.0)``.
* ``rrc_flip`` -- the same plus a horizontal flip with probability 1/2: CRoFT (Dassl/CoOp's
  ``random_resized_crop`` + ``random_flip``, whose default scale is ``(0.08, 1.0)``).

The crop follows torchvision's ``RandomResizedCrop.get_params`` exactly (ten tries of a uniform
area fraction and a log-uniform aspect ratio, rounded side lengths, a uniform position; then the
centre-crop fallback), so crops are distributed as in the reference code. What differs is where
the random numbers come from: each example's draws come from its own generator keyed by
``(seed, step, position in the global batch)``. So a view never depends on which worker process
decodes it, how many ranks share the batch, how many accumulation micro-steps split it, or whether
the run was killed and resumed: everything that decides it is in the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUGMENTS = ("none", "rrc", "rrc_flip")
_STREAM = 0x5EED_A06  # separates these draws from any other use of (seed, step, position)


@dataclass(frozen=True)
class View:
    """Where one training view comes from: a crop box of the source image and a mirror flag."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.top, self.left, self.height, self.width


@dataclass(frozen=True)
class Augment:
    """A training augmentation (see the module docstring).

    Attributes:
        kind: ``none``, ``rrc`` or ``rrc_flip``.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
    """

    kind: str = "none"
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.kind not in AUGMENTS:
            raise ValueError(f"unknown augment {self.kind!r}; valid: {', '.join(AUGMENTS)}")
        low, high = (float(v) for v in self.scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(self.scale)}")
        r_low, r_high = (float(v) for v in self.ratio)
        if not 0.0 < r_low <= r_high:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {tuple(self.ratio)}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        if not self.active:
            return "none (evaluation view)"
        flip = " + horizontal flip" if self.kind == "rrc_flip" else ""
        return f"RandomResizedCrop(scale {self.scale[0]:g}-{self.scale[1]:g}, bicubic){flip}"

    def view(self, seed: int, step: int, position: int, height: int, width: int) -> View:
        """The view of the example at ``position`` of step ``step``'s global batch, for a source
        image of ``height x width``."""
        rng = example_rng(seed, step, position)
        top, left, h, w = random_resized_crop_box(rng, height, width, self.scale, self.ratio)
        flip = self.kind == "rrc_flip" and bool(rng.random() < 0.5)
        return View(top, left, h, w, flip)


def example_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of one example's draws: a pure function of ``(seed, step, position)``."""
    return np.random.default_rng([_STREAM, seed & 0xFFFF_FFFF_FFFF_FFFF, step, position])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` by torchvision's ``RandomResizedCrop.get_params`` algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
