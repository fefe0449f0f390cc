"""From image sources to model-ready tensors.

Evaluation decodes a split once into a ``uint8`` tensor (N, 3, S, S) at the model's resolution
(resize the shorter side with bicubic antialiasing, then centre-crop, as CLIP's eval transform),
keeps it in memory and optionally on disk, and normalises batches on the device. Every later pass
over the split (each WiSE-FT alpha, each epoch's evaluation) reuses the decoded pixels: uint8 is
4x smaller than float and nothing is decoded twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress
from .base import ArrayImages, FileImages, ImageReadError, Split

log = logging.getLogger(__name__)
_MEMORY_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
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


def resize_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, 3, H, W) so the shorter side is ``size`` (bicubic), then centre-crop."""
    h, w = batch.shape[-2:]
    if (h, w) == (size, size):
        return batch
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(batch.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _decode_file(path: str, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def _source_key(split: Split, size: int) -> tuple:
    images = split.images
    if isinstance(images, ArrayImages):
        return ("array", id(images.array), images.array.shape, size)
    digest = hashlib.sha1("\n".join(images.paths).encode()).hexdigest()
    return ("files", digest, size)


def decode_split(
    split: Split, size: int, *, cache_dir: str | Path | None = None, batch_size: int = 512,
    progress_mode: str | None = None,
) -> torch.Tensor:
    """All images of ``split`` as uint8 (N, 3, size, size), decoded once and cached.

    Args:
        split: the split to decode.
        size: square output resolution (the model's input size).
        cache_dir: if given, file-based splits are also cached there as ``.npy`` (reused across
            processes; keyed by the file list and the size).
        batch_size: resize chunk for in-memory arrays.
        progress_mode: see :func:`rftlib.progress.progress`.

    Raises:
        ImageReadError: naming the first file that cannot be decoded.
    """
    key = _source_key(split, size)
    source = split.images.array if isinstance(split.images, ArrayImages) else split.images.paths
    if key in _MEMORY_CACHE and _MEMORY_CACHE[key][0] is source:
        _MEMORY_CACHE.move_to_end(key)
        return _MEMORY_CACHE[key][1]
    disk = Path(cache_dir) / f"{key[1]}-{size}.npy" if cache_dir and key[0] == "files" else None
    if disk is not None and disk.exists():
        out = torch.from_numpy(np.load(disk))
    else:
        out = _decode(split, size, batch_size, progress_mode)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(".tmp.npy")
            np.save(tmp, out.numpy())
            tmp.replace(disk)
    _MEMORY_CACHE[key] = (source, out)
    while len(_MEMORY_CACHE) > MEMORY_CACHE_ITEMS:
        _MEMORY_CACHE.popitem(last=False)
    return out


def _decode(split: Split, size: int, batch_size: int, progress_mode: str | None) -> torch.Tensor:
    images = split.images
    if isinstance(images, ArrayImages):
        arr = torch.from_numpy(images.array).permute(0, 3, 1, 2)
        chunks = [resize_center_crop(arr[i:i + batch_size], size) for i in range(0, len(arr), batch_size)]
        return torch.cat(chunks).contiguous() if chunks else torch.empty(0, 3, size, size, dtype=torch.uint8)
    assert isinstance(images, FileImages)
    paths = progress(images.paths, desc=f"decode {split.name}", mode=progress_mode)
    decoded = [_decode_file(p, size) for p in paths]
    return torch.stack(decoded) if decoded else torch.empty(0, 3, size, size, dtype=torch.uint8)


def find_unreadable(split: Split) -> list[int]:
    """Indices of images in a file-based split that PIL cannot open (for skip-and-count)."""
    from PIL import Image

    if isinstance(split.images, ArrayImages):
        return []
    bad = []
    for i, p in enumerate(split.images.paths):
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, ValueError):
            bad.append(i)
    return bad


def drop_unreadable(split: Split) -> tuple[Split, int]:
    """The split without unreadable images, and how many were dropped (logged as a warning)."""
    bad = set(find_unreadable(split))
    if not bad:
        return split, 0
    log.warning("split %s: dropping %d unreadable images", split.name, len(bad))
    return split.subset([i for i in range(len(split)) if i not in bad]), len(bad)


def normalize(batch: torch.Tensor, spec: ImageSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 normalised on ``device``."""
    x = batch.to(device=device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
