"""From a split to model-ready batches for evaluation: decode once, reuse, normalise on the device.

Evaluation sees every image in its evaluation view (:func:`rftlib.data.images.center_view`: the
shorter side resized to the model's input size, then a centre crop), as ``uint8``; the model's
device turns it into normalised floats (:func:`normalize`), so a batch crosses to the GPU at a
quarter of float's bytes.

Where the views live:

* in-memory arrays (synthwild) are resized once and kept in memory (a small LRU);
* splits of image files are decoded once, in worker processes, into the on-disk memory-mapped cache
  of :mod:`rftlib.data.disk_cache` (the default; RAM stays bounded however large the split);
* with the cache off (``LoaderSettings(eval_cache=False)`` or ``RFT_EVAL_CACHE=0``), and for
  single passes over a training split (features for a probe, DRM's soft labels), views stream from
  the files through the worker processes instead, each decoded once per pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import ArrayImages, FileImages, Split
from .disk_cache import cached_views
from .images import center_view
from .loading import LoaderSettings
from .views import batches_of, decode_views, stream_views

_MEMORY_CACHE: OrderedDict[tuple, tuple[object, torch.Tensor]] = OrderedDict()
MEMORY_CACHE_ITEMS = 16


@dataclass(frozen=True)
class ImageSpec:
    """Input geometry and normalisation of a model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, clip) -> ImageSpec:
        """The spec of a :class:`rftlib.models.ClipModel`."""
        return cls(clip.image_size, tuple(clip.mean), tuple(clip.std))


def decode_split(
    split: Split, size: int, *, cache_dir: str | Path | None = None, settings: LoaderSettings | None = None,
    progress_mode: str | None = None,
) -> torch.Tensor:
    """All evaluation views of ``split`` as ``uint8`` (N, 3, size, size), decoded once.

    Arrays are resized in memory (and kept in a small LRU); image files go to the on-disk cache
    (``cache_dir``, default ``$RFT_CACHE_DIR/decoded``) and come back memory-mapped, or, with the
    cache off, are decoded into RAM.

    Raises:
        ImageReadError: naming the first file that cannot be decoded.
    """
    settings = settings or LoaderSettings()
    images = split.images
    if len(images) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    if isinstance(images, ArrayImages):
        return _array_views(images, size)
    assert isinstance(images, FileImages)
    if settings.eval_cache:
        return cached_views(images, size, name=split.name, workers=settings.workers, cache_dir=cache_dir,
                            progress_mode=progress_mode)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    return decode_views(images, size, out, workers=settings.workers, progress_mode=progress_mode,
                        desc=f"decode {split.name}")


def _array_views(images: ArrayImages, size: int, chunk: int = 512) -> torch.Tensor:
    key = (id(images.array), images.array.shape, size)
    hit = _MEMORY_CACHE.get(key)
    if hit is not None and hit[0] is images.array:  # ids of freed arrays are reused: check identity
        _MEMORY_CACHE.move_to_end(key)
        return hit[1]
    array = torch.from_numpy(images.array).permute(0, 3, 1, 2)
    out = torch.cat([center_view(array[i:i + chunk], size) for i in range(0, len(array), chunk)]).contiguous()
    _MEMORY_CACHE[key] = (images.array, out)
    while len(_MEMORY_CACHE) > MEMORY_CACHE_ITEMS:
        _MEMORY_CACHE.popitem(last=False)
    return out


def eval_batches(split: Split, size: int, *, batch_size: int, settings: LoaderSettings | None = None,
                 pin_memory: bool = False, progress_mode: str | None = None) -> Iterable[torch.Tensor]:
    """The evaluation views of ``split`` in order, ``batch_size`` at a time (see the module docstring:
    decoded once and reused where that pays, streamed through workers otherwise)."""
    settings = settings or LoaderSettings()
    reuse = isinstance(split.images, ArrayImages) or (settings.eval_cache and split.role != "train")
    if reuse or len(split) == 0:
        return batches_of(decode_split(split, size, settings=settings, progress_mode=progress_mode), batch_size)
    return stream_views(split.images, size, batch_size=batch_size, workers=settings.workers,
                        prefetch=settings.prefetch, pin_memory=pin_memory)


def normalize(batch: torch.Tensor, spec: ImageSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 normalised on ``device``."""
    x = batch.to(device=device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
