"""Datasets: one registry, one contract (:class:`RFTDataset`), several adapters.

``get_dataset(name, root=...)`` returns an :class:`RFTDataset`. Registered names:

* ``synthwild`` -- the embedded procedurally generated camera-trap world (default; offline).
* ``iwildcam``, ``fmow`` -- WILDS benchmarks through the ``wilds`` package (official splits).
* ``imagenet`` -- ImageNet val as ID plus whichever shifts are present (V2, Sketch, R, A, ObjectNet).
* ``domains`` -- PACS/VLCS-style ``root/<domain>/<class>/<image>`` folders, leave-one-domain-out.
* ``folder`` -- a user's own data: ``root/<split>/<class>/<image>`` or a CSV.

Every dataset also takes ``shots=k`` (and ``shots_seed=s``): ``k`` training images per class,
seeded (:mod:`rftlib.data.fewshot`); ``--data-option shots=16`` on the command line.

Adapters are imported lazily so that, e.g., ``wilds`` is only needed for the WILDS datasets.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..registry import Registry
from .base import (
    ArrayImages,
    DataNotFoundError,
    FileImages,
    ImageReadError,
    RFTDataset,
    Split,
)
from .fewshot import apply_few_shot, pop_few_shot

DATASETS: Registry[str] = Registry("dataset")
for _name, _target in {
    "synthwild": "rftlib.data.synthwild.dataset:load_synthwild",
    "iwildcam": "rftlib.data.wilds_data:load_iwildcam",
    "fmow": "rftlib.data.wilds_data:load_fmow",
    "imagenet": "rftlib.data.imagenet:load_imagenet",
    "domains": "rftlib.data.folders:load_domains",
    "folder": "rftlib.data.folders:load_folder",
}.items():
    DATASETS.register(_name, _target)


IO_OPTIONS = ("download", "cache")
"""Loader options that change how data is fetched, not what it is (left out of a run's identity)."""


def default_data_root() -> Path:
    """``$RFT_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get("RFT_DATA_ROOT", "data"))


def list_datasets() -> list[str]:
    return DATASETS.names()


def identity_options(**kwargs) -> dict:
    """The ``dataset.options`` that :func:`get_dataset` would record for these options, without
    loading anything (what a run's identity holds; :mod:`rftlib.sweep` plans runs with it)."""
    options = dict(kwargs)
    sampling = pop_few_shot(options)
    options = {k: v for k, v in options.items() if k not in IO_OPTIONS}
    return {**options, **sampling.options()} if sampling is not None else options


def get_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> RFTDataset:
    """Load a dataset by name.

    Args:
        name: one of :func:`list_datasets` (case-insensitive).
        root: data directory (default :func:`default_data_root`); for ``synthwild`` the cache dir.
        **kwargs: adapter options (e.g. ``size="small"`` for synthwild, ``download=True`` for WILDS),
            and for every dataset ``shots=k`` / ``shots_seed=s``: keep ``k`` images per class of the
            train split, drawn with seed ``s`` (default 0; :mod:`rftlib.data.fewshot`). Every option
            but the I/O ones (:data:`IO_OPTIONS`) is recorded in ``dataset.options``.

    Raises:
        rftlib.registry.UnknownNameError: unknown name (the message lists the valid ones).
        DataNotFoundError: the data is missing (the message names the command that prepares it).
        ValueError: a bad ``shots`` / ``shots_seed`` (before any data is read).
    """
    sampling = pop_few_shot(kwargs)  # checked before anything loads
    module, func = DATASETS.get(name).split(":")
    loader = getattr(importlib.import_module(module), func)
    dataset = loader(root=Path(root) if root is not None else None, **kwargs)
    dataset.options = {k: v for k, v in kwargs.items() if k not in IO_OPTIONS}
    return apply_few_shot(dataset, sampling) if sampling is not None else dataset


__all__ = [
    "ArrayImages", "DATASETS", "DataNotFoundError", "FileImages", "ImageReadError", "RFTDataset", "Split",
    "default_data_root", "get_dataset", "identity_options", "list_datasets",
]
