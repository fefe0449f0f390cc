"""Views of a split, made in worker processes: the one engine behind training input and evaluation.

A split's image source becomes a *reader* (example ``i`` -> ``uint8`` (3, H, W) at its stored
resolution: an in-memory array row, a decoded file, or a record of a prepared copy). A
:class:`ViewDataset` turns a :class:`Request` (which examples; for training also the step and their
positions in the global batch) into one stacked ``uint8`` batch of views: evaluation views (resize +
centre crop) or training views (a keyed random crop, :mod:`rftlib.data.augment`). A ``DataLoader``
with ``batch_size=None`` runs the dataset in worker processes: each request is one batch, decoded
and stacked in a worker and sent to the trainer as ``uint8`` (a quarter of float's bytes; the
trainer normalises on its device), in request order.

A view depends only on the request, never on the worker that makes it, so any number of workers
(or none) yields the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..progress import progress
from .augment import Augment
from .base import ArrayImages, FileImages, ImageReadError, ImageSource
from .images import center_view, crop_border, read_image, training_view


class ImageReader(Protocol):
    """Example ``i`` of a split at its stored resolution, as ``uint8`` (3, H, W); picklable, so that
    worker processes get their own (:class:`ArrayReader`, :class:`FileReader`,
    :class:`rftlib.data.prepared.PreparedReader`)."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> torch.Tensor: ...


class ArrayReader:
    """Rows of an in-memory ``uint8`` (N, H, W, 3) array (shared with forked workers, not copied)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.array[i]).permute(2, 0, 1)


@dataclass(frozen=True)
class CroppedFileImages(FileImages):
    """Image files whose outer ``border`` pixels are cut off (every side) as they are decoded,
    before any view is made: ObjectNet frames each photo with a 1-px red line and its reference
    evaluation crops 2 px (:mod:`rftlib.data.objectnet`)."""

    border: int = 0

    def __post_init__(self):
        if self.border < 0:
            raise ValueError(f"border must be >= 0, got {self.border}")


class FileReader:
    """Image files, decoded on demand (:func:`rftlib.data.images.read_image`), less ``border``
    pixels on every side."""

    def __init__(self, paths: tuple[str, ...], border: int = 0):
        self.paths, self.border = paths, border

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        image = read_image(self.paths[i])
        try:
            return crop_border(image, self.border)
        except ImageReadError as err:
            raise ImageReadError(f"cannot read image {self.paths[i]!r}: {err}") from err


def reader_for(images: ImageSource) -> ImageReader:
    """The reader of a split's image source."""
    if isinstance(images, ArrayImages):
        return ArrayReader(images.array)
    if isinstance(images, CroppedFileImages):
        return FileReader(images.paths, images.border)
    if isinstance(images, FileImages):
        return FileReader(images.paths)
    raise TypeError(f"no reader for image source {type(images).__name__}")


@dataclass(frozen=True)
class Request:
    """One batch of views to make.

    Attributes:
        indices: positions of the examples in the split.
        step: the training step (``-1``: evaluation views).
        positions: the examples' positions in the step's global batch (training only).
    """

    indices: np.ndarray
    step: int = -1
    positions: np.ndarray | None = None


class ViewDataset(Dataset):
    """``dataset[request]`` -> ``{"images": uint8 (n, 3, S, S), "indices", "positions", "skipped"}``.

    Args:
        reader: where example ``i`` comes from.
        size: the views' side length.
        augment: how training views are cut (evaluation requests ignore it).
        seed: the run's seed (the key of every random view, with step and position).
        skip_bad: drop unreadable images from their batch (named in ``skipped``) instead of raising.
    """

    def __init__(self, reader: ImageReader, size: int, augment: Augment = Augment(), seed: int = 0,
                 skip_bad: bool = False):
        self.reader, self.size, self.augment, self.seed, self.skip_bad = reader, size, augment, seed, skip_bad

    def __len__(self) -> int:
        return len(self.reader)

    def view(self, i: int, step: int, position: int) -> torch.Tensor:
        image = self.reader.read(int(i))
        if step < 0 or not self.augment.active:
            return center_view(image, self.size)
        view = self.augment.view(self.seed, step, position, image.shape[-2], image.shape[-1])
        return training_view(image, view.box, view.flip, self.size)

    def __getitem__(self, request: Request) -> dict:
        n = len(request.indices)
        positions = request.positions if request.positions is not None else np.full(n, -1, dtype=np.int64)
        out = torch.empty(n, 3, self.size, self.size, dtype=torch.uint8)
        kept, skipped = [], []
        for k in range(n):
            try:
                out[len(kept)] = self.view(request.indices[k], request.step, int(positions[k]))
            except ImageReadError as err:
                if not self.skip_bad or request.step < 0:
                    raise
                skipped.append(str(err))
                continue
            kept.append(k)
        if skipped and not kept:
            raise ImageReadError(f"every image of a batch at step {request.step} is unreadable: {'; '.join(skipped)}")
        keep = np.asarray(kept, dtype=np.int64)
        return {"images": out[:len(kept)], "indices": torch.as_tensor(request.indices[keep], dtype=torch.int64),
                "positions": torch.as_tensor(positions[keep], dtype=torch.int64), "skipped": skipped}


class _Requests(Sampler):
    """A sampler that hands the DataLoader a fixed sequence of :class:`Request`\\ s."""

    def __init__(self, requests: Callable[[], Iterator[Request]], count: int):
        self.requests, self.count = requests, count

    def __iter__(self) -> Iterator[Request]:
        return self.requests()

    def __len__(self) -> int:
        return self.count


def view_loader(dataset: ViewDataset, requests: Callable[[], Iterator[Request]], count: int, *, workers: int,
                prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that makes ``dataset[request]`` for every request, in order, in ``workers``
    processes (``0``: in this process).

    It gets a generator of its own: a DataLoader draws its workers' base seed when iterated, and
    drawing it from torch's global generator would shift every later random number of the training
    run (dropout, say) by one draw, differently in a resumed run than in an uninterrupted one.
    """
    return DataLoader(dataset, batch_size=None, sampler=_Requests(requests, count), num_workers=workers,
                      prefetch_factor=prefetch if workers > 0 else None, pin_memory=pin_memory,
                      collate_fn=_identity, generator=torch.Generator().manual_seed(0))


def _identity(batch):
    return batch


def chunk_requests(n: int, chunk: int) -> tuple[Callable[[], Iterator[Request]], int]:
    """Evaluation requests covering ``range(n)`` in order, ``chunk`` examples each."""
    def requests() -> Iterator[Request]:
        for start in range(0, n, chunk):
            yield Request(np.arange(start, min(n, start + chunk), dtype=np.int64))
    return requests, -(-n // chunk)


def stream_views(images: ImageSource, size: int, *, batch_size: int, workers: int, prefetch: int = 2,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Evaluation views of a whole split, in order, ``batch_size`` at a time (decoded in workers)."""
    requests, count = chunk_requests(len(images), batch_size)
    loader = view_loader(ViewDataset(reader_for(images), size), requests, count, workers=min(workers, count),
                         prefetch=prefetch, pin_memory=pin_memory)
    for batch in loader:
        yield batch["images"]


def decode_views(images: ImageSource, size: int, out: torch.Tensor, *, workers: int, chunk: int = 256,
                 on_chunk: Callable[[int, int], None] | None = None, progress_mode: str | None = None,
                 desc: str = "decode") -> torch.Tensor:
    """Fill ``out`` (N, 3, size, size) with the evaluation views of every image, decoding in
    ``workers`` processes; ``on_chunk(start, stop)`` is called as each chunk lands."""
    requests, count = chunk_requests(len(images), chunk)
    loader = view_loader(ViewDataset(reader_for(images), size), requests, count, workers=min(workers, count))
    start = 0
    for batch in progress(loader, total=count, desc=desc, mode=progress_mode):
        stop = start + len(batch["images"])
        out[start:stop] = batch["images"]
        if on_chunk is not None:
            on_chunk(start, stop)
        start = stop
    return out


def batches_of(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive slices of a decoded split."""
    return (images[start:start + batch_size] for start in range(0, len(images), batch_size))
