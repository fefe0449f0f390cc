"""The training input: which examples each rank sees at each step, and how their pixels get there.

**Which examples** (:class:`StepLayout`) is a pure function of ``(seed, epoch)``: epoch ``e``
visits a fixed permutation of the training split in global batches of ``batch_size`` (the last
incomplete batch is dropped); with ``W`` ranks and ``A`` accumulation micro-steps, rank ``r`` gets
the ``r``-th of ``W`` equal parts of each global batch, cut into ``A`` micro-batches. A rank only
ever reads and decodes its own part.

**How the pixels get there** (:class:`TrainInput`) is decided once per run by
:func:`plan_train_input`, and logged:

* ``memory`` -- the split is decoded once (evaluation views) and training indexes into it. Taken
  when no augmentation is asked for and the decoded split fits the memory budget; also for
  in-memory arrays (synthwild) with augmentation, whose views are cut from the arrays already in
  RAM, in this process.
* ``stream`` -- worker processes read, decode and augment each micro-batch from the files (or the
  prepared copy) as training goes, a few batches ahead, and send ``uint8`` views; RAM does not grow
  with the dataset and the first step waits for one batch, not for the whole split.

Either way a view is a pure function of ``(seed, step, position in the global batch)``, so a run
killed and resumed sees the very same pixels, and 2 ranks see the same crops as 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .augment import Augment
from .base import ArrayImages, Split
from .loading import LoaderSettings, format_bytes
from .pipeline import decode_split
from .prepared import open_prepared
from .views import Request, ViewDataset, reader_for, view_loader

log = logging.getLogger(__name__)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` training examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass(frozen=True)
class StepLayout:
    """Which examples rank ``rank`` sees at every step (see the module docstring)."""

    n: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    accum_steps: int = 1
    seed: int = 0

    def __post_init__(self):
        parts = self.world_size * self.accum_steps
        if self.batch_size < 1 or self.batch_size % parts:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of world_size x accum_steps "
                             f"({self.world_size} x {self.accum_steps})")
        if self.n < self.batch_size:
            raise ValueError(f"the train split has {self.n} examples, fewer than batch_size {self.batch_size}")

    @property
    def per_micro(self) -> int:
        return self.batch_size // (self.world_size * self.accum_steps)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def requests(self, start: int, stop: int) -> Iterator[Request]:
        """This rank's micro-batch requests for steps ``start .. stop - 1``, in order."""
        shape = (self.world_size, self.accum_steps, self.per_micro)
        positions = np.arange(self.batch_size).reshape(shape)[self.rank]
        epoch, order = None, None
        for step in range(start, stop):
            e, b = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, epoch_permutation(self.seed, e, self.n).numpy()
            mine = order[b * self.batch_size:(b + 1) * self.batch_size].reshape(shape)[self.rank]
            for micro in range(self.accum_steps):
                yield Request(mine[micro], step, positions[micro])


@dataclass(frozen=True)
class InputPlan:
    """How the training images reach the model, and why."""

    path: str  # "memory" or "stream"
    workers: int
    reason: str

    def describe(self) -> str:
        where = "in this process" if self.workers == 0 else f"{self.workers} worker process(es)"
        return f"{self.path}, {where}: {self.reason}"


def plan_train_input(split: Split, size: int, augment: Augment, settings: LoaderSettings,
                     prepared: bool = False) -> InputPlan:
    """Choose the ``memory`` or ``stream`` path (see the module docstring).

    Raises:
        ValueError: ``input_path="memory"`` was forced for a split over the memory budget.
    """
    decoded = len(split) * 3 * size * size
    budget = f"{format_bytes(decoded)} decoded vs a memory budget of {format_bytes(settings.memory_budget)}"
    arrays = isinstance(split.images, ArrayImages)
    if settings.input_path == "stream" or prepared:
        why = "reading the prepared copy" if prepared else "input_path=stream was asked for"
        return InputPlan("stream", settings.workers, why)
    if augment.active and arrays:
        return InputPlan("memory", 0, f"views cut in this process from the in-memory arrays ({augment.describe()})")
    if augment.active:
        if settings.input_path == "memory":
            raise ValueError("input_path='memory' holds evaluation views only, but augment="
                             f"{augment.kind!r} cuts its views from the original images; use input_path='stream' "
                             "or 'auto'")
        return InputPlan("stream", settings.workers, f"{augment.describe()} needs the original images")
    if decoded <= settings.memory_budget:
        return InputPlan("memory", 0, f"decoded once; {budget}")
    if settings.input_path == "memory":
        raise ValueError(f"input_path='memory' but the training split does not fit: {budget}; raise memory_budget "
                         "(RFT_MEMORY_BUDGET) or use input_path='stream' or 'auto'")
    return InputPlan("stream", settings.workers, budget)


@dataclass
class MicroBatch:
    """One micro-batch of this rank: ``uint8`` views and where they sit in the split and the batch."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor


class _DecodedDataset(torch.utils.data.Dataset):
    """Requests served from a split decoded once (the ``memory`` path without augmentation)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, request: Request) -> dict:
        index = torch.as_tensor(request.indices, dtype=torch.int64)
        return {"images": self.images[index], "indices": index,
                "positions": torch.as_tensor(request.positions, dtype=torch.int64), "skipped": []}


class TrainInput:
    """This rank's training micro-batches (see the module docstring).

    Args:
        split: the training split.
        size: the model's input size.
        layout: which examples each rank and micro-step sees.
        augment: how training views are cut.
        settings: workers, memory budget, bad-image policy, prepared copy.
        pin_memory: page-locked batches (for a CUDA device).
    """

    def __init__(self, split: Split, size: int, layout: StepLayout, augment: Augment,
                 settings: LoaderSettings | None = None, pin_memory: bool = False):
        self.split, self.size, self.layout, self.augment = split, size, layout, augment
        self.settings = settings or LoaderSettings()
        self.pin_memory = pin_memory if self.settings.pin_memory is None else self.settings.pin_memory
        self.prepared = open_prepared(self.settings.prepared, split, size) if self.settings.prepared else None
        self.plan = plan_train_input(split, size, augment, self.settings, prepared=self.prepared is not None)
        self.labels = torch.as_tensor(split.labels)
        self.skipped = 0
        log.info("train input: %d images, augment %s; %s", len(split), augment.describe(), self.plan.describe())

    def _dataset(self) -> torch.utils.data.Dataset:
        if self.plan.path == "memory" and not self.augment.active:
            return _DecodedDataset(decode_split(self.split, self.size, settings=self.settings))
        reader = self.prepared if self.prepared is not None else reader_for(self.split.images)
        return ViewDataset(reader, self.size, self.augment, self.layout.seed,
                           skip_bad=self.settings.on_bad_image == "skip")

    def steps(self, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        """For each step ``start .. stop - 1``, this rank's ``accum_steps`` micro-batches."""
        layout = self.layout
        count = (stop - start) * layout.accum_steps
        loader = view_loader(self._dataset(), lambda: layout.requests(start, stop), count,
                             workers=min(self.plan.workers, count), prefetch=self.settings.prefetch,
                             pin_memory=self.pin_memory)
        batches = iter(loader)
        try:
            for _ in range(start, stop):
                yield [self._micro(next(batches)) for _ in range(layout.accum_steps)]
        finally:
            del batches  # shuts the worker processes down, also when training stops early

    def _micro(self, batch: dict) -> MicroBatch:
        if batch["skipped"]:
            self.skipped += len(batch["skipped"])
            for message in batch["skipped"]:
                log.warning("skipped an unreadable training image (%d so far): %s", self.skipped, message)
        return MicroBatch(batch["images"], self.labels[batch["indices"]], batch["indices"], batch["positions"])

