"""Few-shot training sets: ``k`` training images per class, for any dataset.

``get_dataset(name, ..., shots=k, shots_seed=s)`` loads the dataset as usual and then keeps ``k``
images of each class in its ``train`` split (:func:`apply_few_shot`); every other split is left
as it is. From the command line: ``--data-option shots=16 shots_seed=1``.

* **Seeded and nested**: class ``c``'s images are a prefix of a permutation drawn from
  ``numpy.random.default_rng([shots_seed, c])``, so the same seed gives the same images on every
  machine, a class's draw does not depend on the other classes, and the 1-shot set is inside the
  16-shot set of the same seed. Kept images stay in their original order.
* **Short classes**: a class with fewer than ``k`` training images keeps all of them, and the
  load logs which classes those are (a class with none stays empty).
* **Recorded**: ``dataset.options`` gets ``shots`` and ``shots_seed`` (so they enter the run's
  identity: a 16-shot run never shares a folder with a full one), and ``dataset.info["few_shot"]``
  the train split's size before and after and the short classes.

Classes are the dataset's labels: for leave-one-domain-out ``domains`` data the sampler draws
``k`` per class over all training domains together (CoOp's per-class sampler), not per domain.
A prepared copy (:mod:`rftlib.data.prepared`) of the full train split does not fit a few-shot one
(its file list differs, and the loader says so); a few-shot split is small enough not to need one.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import RFTDataset

log = logging.getLogger(__name__)

OPTIONS = ("shots", "shots_seed")
"""The dataset options this module reads (every adapter accepts them through ``get_dataset``)."""


@dataclass(frozen=True)
class FewShot:
    """``shots`` training images per class, drawn with ``seed``."""

    shots: int
    seed: int = 0

    def __post_init__(self):
        for name, value, low in (("shots", self.shots, 1), ("shots_seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}")

    def options(self) -> dict[str, int]:
        """The dataset options that name this sampling."""
        return {"shots": int(self.shots), "shots_seed": int(self.seed)}


def pop_few_shot(options: MutableMapping[str, Any]) -> FewShot | None:
    """Remove ``shots`` / ``shots_seed`` from a ``get_dataset`` call's options and check them.

    ``shots=None`` (or absent) means the whole train split.

    Raises:
        ValueError: a bad value, or ``shots_seed`` without ``shots``.
    """
    shots, seed = options.pop("shots", None), options.pop("shots_seed", None)
    if shots is None:
        if seed is not None:
            raise ValueError(f"shots_seed={seed!r} needs shots=k (k training images per class)")
        return None
    return FewShot(shots, 0 if seed is None else seed)


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most ``shots`` examples per label (see the module docstring)."""
    labels = np.asarray(labels)
    keep = [np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))[:shots]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def apply_few_shot(dataset: RFTDataset, sampling: FewShot) -> RFTDataset:
    """Keep ``sampling.shots`` images per class in ``dataset``'s train split (in place; returned).

    Records the sampling in ``dataset.options`` and ``dataset.info["few_shot"]``. A dataset loaded
    without its train split (ImageNet without ``imagenet/train``) is left as it is: asking for that
    split still fails with the command that prepares it.
    """
    dataset.options = {**dataset.options, **sampling.options()}
    if "train" not in dataset.splits:
        log.info("%s: no train split loaded, so shots=%d has nothing to sample", dataset.name, sampling.shots)
        return dataset
    train = dataset.splits["train"]
    keep = few_shot_indices(train.labels, sampling.shots, sampling.seed)
    counts = np.bincount(train.labels, minlength=dataset.num_classes)
    short = {dataset.classnames[c]: int(n) for c, n in enumerate(counts) if n < sampling.shots}
    dataset.splits["train"] = train.subset(keep)
    dataset.info["few_shot"] = {**sampling.options(), "train_before": len(train), "train_after": len(keep),
                                "short_classes": short}
    if isinstance(dataset.info.get("sizes"), dict) and "train" in dataset.info["sizes"]:
        dataset.info["sizes"] = {**dataset.info["sizes"], "train": len(keep)}
    log.info("%s: %d-shot train split (shots_seed %d): %d of %d images", dataset.name, sampling.shots,
             sampling.seed, len(keep), len(train))
    if short:
        listed = ", ".join(f"{name} ({n})" for name, n in list(short.items())[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        log.warning("%s: %d of %d classes have fewer than %d training images and keep all of them: %s%s",
                    dataset.name, len(short), dataset.num_classes, sampling.shots, listed, more)
    return dataset
