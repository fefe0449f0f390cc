"""The dataset contract shared by every adapter.

A dataset is a :class:`RFTDataset`: class names, prompt templates, an official metric and named
splits. Split names follow WILDS: ``train``, ``id_val``, ``id_test`` (in-distribution) and ``val``,
``test`` (out-of-distribution); other adapters add their own (``openset`` for held-out classes,
one split per ImageNet shift, one per held-out domain). Each :class:`Split` has a *role*
(``train``, ``id``, ``ood`` or ``openset``), integer labels, a per-example metadata table and an
image source: either decoded ``uint8`` arrays in memory (:class:`ArrayImages`, the fast path for
small datasets) or image files read lazily (:class:`FileImages`).

Metrics are computed by the dataset (:meth:`RFTDataset.compute_metrics`) so that each benchmark
keeps its official semantics (iWildCam macro-F1 over the classes present in the split, FMoW
worst-region accuracy without "Other", top-1 for ImageNet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

ROLES = ("train", "id", "ood", "openset")
SPLIT_USES = ("val", "test")


def split_use(name: str) -> str:
    """``val`` for a validation split (WILDS' ``id_val`` and ``val``, any ``*_val``), else ``test``.

    Validation splits choose models and knobs; test splits report them. A comparison never reads a
    test split to choose anything.
    """
    return "val" if name == "val" or name.endswith("_val") else "test"
ClassPrompts = Union[str, Sequence[str]]


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the command that prepares them."""


class ImageReadError(OSError):
    """An image file could not be decoded; the message names the file."""


@dataclass(frozen=True)
class ArrayImages:
    """Decoded images held in memory as a ``uint8`` array of shape (N, H, W, 3)."""

    array: np.ndarray

    def __post_init__(self):
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"ArrayImages needs uint8 (N, H, W, 3), got {a.dtype} {a.shape}")

    def __len__(self) -> int:
        return len(self.array)


@dataclass(frozen=True)
class FileImages:
    """Images stored as files, decoded with PIL on demand (RGB)."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


ImageSource = Union[ArrayImages, FileImages]


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        name: the split's name (``train``, ``id_test``, ``test``, ...).
        role: ``train``, ``id``, ``ood`` or ``openset`` (held-out classes for open-set detection;
            their labels are ``-1``).
        images: where the pixels come from.
        labels: int64 class indices, one per image.
        metadata: one row per image (e.g. ``location``, ``region``, ``year``, ``domain``).
    """

    name: str
    role: str
    images: ImageSource
    labels: np.ndarray
    metadata: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown split role {self.role!r}; valid roles: {', '.join(ROLES)}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"split {self.name!r}: {len(self.images)} images but {len(self.labels)} labels"
            )
        if len(self.metadata) and len(self.metadata) != len(self.labels):
            raise ValueError(
                f"split {self.name!r}: {len(self.metadata)} metadata rows for {len(self.labels)} images"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Split:
        """A new split holding only ``indices`` (images, labels and metadata stay aligned)."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, ArrayImages):
            images: ImageSource = ArrayImages(self.images.array[idx])
        else:
            images = dataclasses.replace(self.images, paths=tuple(self.images.paths[i] for i in idx))  # keeps a border
        meta = self.metadata.iloc[idx].reset_index(drop=True) if len(self.metadata) else self.metadata
        return Split(name or self.name, self.role, images, self.labels[idx], meta)


MetricFn = Callable[[np.ndarray, np.ndarray, pd.DataFrame], dict]


@dataclass
class RFTDataset:
    """A dataset as rftlib sees it.

    Attributes:
        name: registry name (``synthwild``, ``iwildcam``, ...).
        classnames: class names in label order (used in prompts).
        templates: prompt templates with one ``{}`` for the class name.
        splits: split name -> :class:`Split`.
        metric_fn: ``(y_true, y_pred, metadata) -> {metric: value}`` with the official semantics.
        primary_metric: the headline metric per role, e.g. ``{"id": "macro_f1", "ood": "macro_f1"}``.
        descriptions: optional per-class concept descriptions (DRM); one string or a list per class.
        root: where the data lives (``None`` for generated data).
        info: free-form facts about the dataset (version, seed, sizes); ``info["missing_splits"]``
            maps a split the adapter knows but did not find to the message that says how to get it.
        options: the options it was loaded with (``size="tiny"``, ``frac=0.1``): part of a run's
            identity, so two runs on different subsets never share a run folder.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, Split]
    metric_fn: MetricFn
    primary_metric: Mapping[str, str]
    descriptions: list[ClassPrompts] | None = None
    root: Path | None = None
    info: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Split:
        """The split called ``name``; unknown names list the valid ones, and a known split whose
        files are missing raises :class:`DataNotFoundError` with the command that prepares it."""
        if name not in self.splits and name in self.info.get("missing_splits", {}):
            raise DataNotFoundError(self.info["missing_splits"][name])
        if name not in self.splits:
            raise KeyError(
                f"dataset {self.name!r} has no split {name!r}; valid splits: {', '.join(self.splits)}"
            )
        return self.splits[name]

    def split_names(self, role: str) -> list[str]:
        """Names of the splits with the given role, in definition order."""
        return [n for n, s in self.splits.items() if s.role == role]

    def compute_metrics(self, split: str | Split, y_pred: np.ndarray) -> dict:
        """Official metrics of predictions on a split (dict of metric name -> float)."""
        s = self.split(split) if isinstance(split, str) else split
        return self.metric_fn(s.labels, np.asarray(y_pred), s.metadata)

    def headline_metric(self, split: str | Split) -> str:
        """The metric a split is reported in (its role's primary metric)."""
        s = self.split(split) if isinstance(split, str) else split
        return self.primary_metric.get(s.role, self.primary_metric.get("id", "accuracy"))

    def check_selection_split(self, name: str | None) -> None:
        """Refuse to choose models, epochs or knobs on a split that reports results.

        Selection may use a validation split (``id_val``, ``val``) or ``train``; an ID test split
        or any OOD/open-set split would leak the test set into the number it reports.

        Raises:
            ValueError: naming the split and the valid choices (an unknown name lists the splits).
        """
        if name is None:
            return
        role = self.split(name).role
        if role == "train" or (role in ("id", "ood") and split_use(name) == "val"):
            return
        valid = [n for n, s in self.splits.items() if s.role == "train" or
                 (s.role in ("id", "ood") and split_use(n) == "val")]
        raise ValueError(f"select_split={name!r} is a {role} test split: choosing on it would leak the test set "
                         f"into the reported result; choose on one of {', '.join(valid) or 'train'} "
                         "(or null: the last epoch)")

    def split_facts(self) -> dict[str, dict[str, str]]:
        """What a results store needs to compare runs without loading the data: each ID/OOD
        split's role, headline metric and use, ``{"test": {"role": "ood", "metric": "macro_f1",
        "use": "test"}}``."""
        return {name: {"role": s.role, "metric": self.headline_metric(s), "use": split_use(name)}
                for name, s in self.splits.items() if s.role in ("id", "ood")}
