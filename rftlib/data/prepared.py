"""A one-off resized copy of a split that streams faster than its original files.

``prepare(split, folder, short_side=256)`` resizes every image once so that its shorter side is
``short_side`` (bicubic, antialiased; images already smaller are kept as they are) and stores the
results in shards: ``shard-NNNNN.bin`` (the images back to back, re-encoded as JPEG or raw
``uint8``) with ``shard-NNNNN.idx.npy`` (per image: offset, length, height, width, CRC-32). A
``manifest.json`` written last lists the shards and a digest of the split's file list.

* **Parallel**: one worker process per shard at a time; **resumable**: a shard is written to a
  temporary name and renamed when complete, and a new run keeps every complete shard (its index
  present, its data file of the indexed length) and writes the rest.
* **Read** (:class:`PreparedReader`, ``LoaderSettings(prepared=folder)``): a worker maps a shard
  and decodes one record; each record's CRC-32 is checked as it is read, so a damaged copy fails
  with its folder and the original file's name instead of training on garbage.
* **What changes**: training crops come from the resized copy instead of the original image
  (``RandomResizedCrop`` picks the same *fraction* of the picture, then resamples from 256 px
  instead of, e.g., 448 px). With JPEG there is a second lossy encode (quality 95 by default).
  Evaluation never uses the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from ..atomic import write_atomically, write_text_atomically
from ..progress import progress
from .base import FileImages, ImageReadError, Split
from .images import BICUBIC, TF, decode_bytes, read_image, resize_geometry

log = logging.getLogger(__name__)
FORMATS = ("jpeg", "raw")
VERSION = 1
_INDEX_COLUMNS = 5  # offset, length, height, width, crc32


def paths_digest(paths: tuple[str, ...]) -> str:
    """A digest of a split's file list (order included)."""
    digest = hashlib.sha1()
    for path in paths:
        digest.update(repr(path).encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class PrepareSettings:
    """What :func:`prepare` writes.

    Attributes:
        short_side: the shorter side of every stored image (at least the model's input size).
        format: ``jpeg`` (small; one more lossy encode) or ``raw`` (``uint8``; no decoding at all,
            about 10x larger).
        quality: JPEG quality.
        shard_size: images per shard.
    """

    short_side: int = 256
    format: str = "jpeg"
    quality: int = 95
    shard_size: int = 2048

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.short_side < 1 or self.shard_size < 1 or not 1 <= self.quality <= 100:
            raise ValueError(f"short_side and shard_size must be >= 1 and quality in 1..100, got {self}")


def prepare(split: Split, folder: str | Path, settings: PrepareSettings = PrepareSettings(), *,
            workers: int = 1, progress_mode: str | None = None) -> Path:
    """Write (or finish writing) the resized copy of ``split`` into ``folder``; returns the folder."""
    if not isinstance(split.images, FileImages):
        raise TypeError(f"split {split.name!r} holds in-memory arrays; only image files need preparing")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = split.images.paths
    _check_same_job(folder, paths, settings)
    shards = [(i, paths[start:start + settings.shard_size])
              for i, start in enumerate(range(0, len(paths), settings.shard_size))]
    todo = [(i, chunk) for i, chunk in shards if not _shard_complete(folder, i, len(chunk))]
    log.info("prepare %s: %d images in %d shards, %d to write, into %s", split.name, len(paths), len(shards),
             len(todo), folder)
    bar = progress(range(sum(len(c) for _, c in todo)), total=sum(len(c) for _, c in todo),
                   desc=f"prepare {split.name}", mode=progress_mode)
    ticks = iter(bar)
    if workers <= 0:
        for i, chunk in todo:
            _write_shard(folder, i, chunk, settings)
            _advance(ticks, len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_write_shard, folder, i, chunk, settings): len(chunk) for i, chunk in todo}
            for future in as_completed(futures):
                future.result()
                _advance(ticks, futures[future])
    manifest = {"version": VERSION, "paths_sha1": paths_digest(paths), "count": len(paths), "split": split.name,
                "short_side": settings.short_side, "format": settings.format, "quality": settings.quality,
                "shard_size": settings.shard_size, "shards": len(shards)}
    write_text_atomically(folder / "manifest.json", json.dumps(manifest))
    return folder


def _advance(ticks, n: int) -> None:
    for _ in range(n):
        next(ticks, None)


def _check_same_job(folder: Path, paths: tuple[str, ...], settings: PrepareSettings) -> None:
    """Refuse to mix two different jobs' shards in one folder."""
    job = {"paths_sha1": paths_digest(paths), "short_side": settings.short_side, "format": settings.format,
           "quality": settings.quality, "shard_size": settings.shard_size}
    job_file = folder / "job.json"
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if previous != job:
            diff = sorted(k for k in job if previous.get(k) != job[k])
            raise ValueError(f"{folder} holds a preparation of another job (different {', '.join(diff)}); "
                             "use another folder or delete this one")
    else:
        write_text_atomically(job_file, json.dumps(job))


def _shard_names(folder: Path, i: int) -> tuple[Path, Path]:
    return folder / f"shard-{i:05d}.bin", folder / f"shard-{i:05d}.idx.npy"


def _shard_complete(folder: Path, i: int, count: int) -> bool:
    data, index_path = _shard_names(folder, i)
    try:
        index = np.load(index_path, allow_pickle=False)
    except (OSError, ValueError):
        return False
    if index.shape != (count, _INDEX_COLUMNS) or not data.exists():
        return False
    return data.stat().st_size == int(index[-1, 0] + index[-1, 1])


def _encode(path: str, settings: PrepareSettings) -> tuple[bytes, int, int]:
    image = read_image(path)
    height, width = image.shape[-2:]
    if min(height, width) > settings.short_side:
        height, width = resize_geometry(height, width, settings.short_side)
        image = TF.resize(image, [height, width], interpolation=BICUBIC, antialias=True)
    if settings.format == "raw":
        return image.permute(1, 2, 0).contiguous().numpy().tobytes(), height, width
    return encode_jpeg(image, quality=settings.quality).numpy().tobytes(), height, width


def _write_shard(folder: Path, i: int, paths: tuple[str, ...], settings: PrepareSettings) -> None:
    torch.set_num_threads(1)
    data, index_path = _shard_names(folder, i)
    index = np.zeros((len(paths), _INDEX_COLUMNS), dtype=np.int64)

    def write_data(tmp: Path) -> None:
        offset = 0
        with open(tmp, "wb") as out:
            for k, path in enumerate(paths):
                payload, height, width = _encode(path, settings)
                out.write(payload)
                index[k] = (offset, len(payload), height, width, zlib.crc32(payload))
                offset += len(payload)

    def write_index(tmp: Path) -> None:
        with open(tmp, "wb") as out:  # a file object: np.save would add .npy to a temporary name
            np.save(out, index)

    write_atomically(data, write_data)
    write_atomically(index_path, write_index)  # last: an index marks its shard complete


class PreparedReader:
    """Reads example ``i`` of a prepared copy as ``uint8`` (3, H, W); checks each record's CRC-32.

    Args:
        folder: the folder :func:`prepare` wrote.
        paths: the split's file list (must be the one the copy was made from).
    """

    def __init__(self, folder: str | Path, paths: tuple[str, ...]):
        self.folder, self.paths = Path(folder), paths
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{self.folder} holds no complete prepared copy (no manifest.json); run "
                                    "data_scripts/prepare_cache.py for this split (it resumes where it stopped)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != VERSION or self.manifest.get("paths_sha1") != paths_digest(paths):
            raise ValueError(f"{self.folder} was prepared from another file list ({self.manifest.get('count')} "
                             f"images; this split has {len(paths)}) or by another version; prepare this split again")
        indices = [np.load(_shard_names(self.folder, i)[1], allow_pickle=False)
                   for i in range(self.manifest["shards"])]
        self.index = np.concatenate(indices)
        self.shard_of = np.repeat(np.arange(len(indices)), [len(x) for x in indices])
        self._maps: dict[int, np.memmap] = {}

    @property
    def short_side(self) -> int:
        return int(self.manifest["short_side"])

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        return {**self.__dict__, "_maps": {}}

    def read(self, i: int) -> torch.Tensor:
        shard = int(self.shard_of[i])
        if shard not in self._maps:
            self._maps[shard] = np.memmap(_shard_names(self.folder, shard)[0], dtype=np.uint8, mode="r")
        offset, length, height, width, crc = (int(v) for v in self.index[i])
        payload = self._maps[shard][offset:offset + length].tobytes()
        if zlib.crc32(payload) != crc:
            raise ImageReadError(f"prepared copy {self.folder} is damaged at image {i} ({self.paths[i]!r}): "
                                 f"checksum mismatch; delete its shard-{shard:05d} files and prepare it again")
        if self.manifest["format"] == "raw":
            return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
        return decode_bytes(payload, f"{self.paths[i]} (prepared copy in {self.folder})")


def open_prepared(folder: str | Path, split: Split, size: int) -> PreparedReader:
    """The reader of ``split``'s prepared copy in ``folder``, checked against the split and the model."""
    if not isinstance(split.images, FileImages):
        raise ValueError(f"split {split.name!r} holds in-memory arrays; a prepared copy is for image files")
    reader = PreparedReader(folder, split.images.paths)
    if reader.short_side < size:
        raise ValueError(f"{folder} stores a shorter side of {reader.short_side} px, smaller than the model's "
                         f"{size} px input; prepare it again with --short-side {size} or more")
    log.info("training images come from the prepared copy %s (shorter side %d px, %s)", folder,
             reader.short_side, reader.manifest["format"])
    return reader
