"""How images reach the model: worker processes, the memory budget, bad files, the caches.

:class:`LoaderSettings` describes the machine side of data loading. None of it changes what a run
computes (the pixels of every view are a pure function of the data, the config and the seed),
with two documented exceptions: ``on_bad_image="skip"`` drops unreadable training images, and
``prepared`` trains from a resized copy of the dataset (see ``data_scripts/prepare_cache.py``).

Defaults come from the environment, so a notebook, the CLI and a test all pick them up:

* ``RFT_WORKERS`` -- decoding processes per rank (default: the CPUs this process may use, divided
  among the ranks on this node, minus one for the training process, at most 16);
* ``RFT_MEMORY_BUDGET`` -- how much RAM a split decoded once may take, e.g. ``4G`` or ``512M``
  (default: an eighth of the machine's memory, at most 8 GiB);
* ``RFT_EVAL_CACHE`` -- ``0`` turns the on-disk evaluation cache off (evaluation then streams).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

BAD_IMAGE_POLICIES = ("raise", "skip")
INPUT_PATHS = ("auto", "memory", "stream")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``4G``, ``512M``, ``1.5G``, ``100000`` -> a number of bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a number with K, M, G or T, e.g. 4G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decoding processes per rank: this node's CPUs shared among its ranks, one left for training."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, available_cpus() // max(1, ranks_here) - 1))


def default_memory_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 16 * 2**30
    return min(8 * 2**30, total // 8)


@dataclass(frozen=True)
class LoaderSettings:
    """Data-loading settings (see the module docstring for the environment defaults).

    Attributes:
        workers: decoding processes per rank; ``0`` decodes in the training process.
        memory_budget: bytes (or ``"4G"``) that a training split decoded once may take in RAM;
            a larger split streams from its files instead.
        input_path: ``auto`` (the budget decides), ``memory`` or ``stream`` (forced; ``memory``
            above the budget is an error, never a silent overrun).
        prefetch: micro-batches each worker prepares ahead (2 keeps a GPU fed; each one is pinned
            memory: 256 views at 224 px take 38 MB).
        pin_memory: page-locked batches for fast copies to the GPU (``None``: when on CUDA).
        on_bad_image: ``raise`` stops at an unreadable training image, naming it; ``skip`` drops it
            from its batch, logs it and counts it in the step events (``skipped_images``).
        prepared: a folder written by ``data_scripts/prepare_cache.py``; training then reads the
            resized copy instead of the original files (``None``: the original files).
        eval_cache: decode evaluation splits of image files once into an on-disk memory-mapped
            cache (``$RFT_CACHE_DIR/decoded``) that every later evaluation reuses.
    """

    workers: int | None = None
    memory_budget: int | str | None = None
    input_path: str = "auto"
    prefetch: int = 2
    pin_memory: bool | None = None
    on_bad_image: str = "raise"
    prepared: str | None = None
    eval_cache: bool | None = None

    def __post_init__(self):
        workers = self.workers if self.workers is not None else _env_int("RFT_WORKERS", default_workers())
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        budget = self.memory_budget
        budget = parse_bytes(budget if budget is not None else os.environ.get("RFT_MEMORY_BUDGET")
                             or default_memory_budget())
        if budget < 0:
            raise ValueError(f"memory_budget must be >= 0, got {self.memory_budget!r}")
        if self.input_path not in INPUT_PATHS:
            raise ValueError(f"unknown input_path {self.input_path!r}; valid: {', '.join(INPUT_PATHS)}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"unknown on_bad_image {self.on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {self.prefetch!r}")
        cache = self.eval_cache if self.eval_cache is not None else os.environ.get("RFT_EVAL_CACHE", "1") != "0"
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "memory_budget", budget)
        object.__setattr__(self, "eval_cache", bool(cache))

    def replace(self, **changes) -> LoaderSettings:
        return dataclasses.replace(self, **changes)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer") from None
