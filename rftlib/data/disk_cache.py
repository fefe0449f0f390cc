"""Evaluation splits decoded once into an on-disk, memory-mapped ``uint8`` cache.

Every knob sweep evaluates the same images many times (11 WiSE-FT alphas, every DRM beta, every
epoch's validation). The first evaluation of a split of image files decodes it in worker processes
into ``<cache dir>/<split>-<S>px-<key>.u8`` (N x 3 x S x S bytes, the evaluation views) and every
later one maps that file: no decoding, and RAM that does not grow with the dataset (the pages are
the operating system's file cache, reclaimable at any time).

A cache file is never trusted blindly:

* its **key** covers the format version, the view geometry, and every source file's path, size and
  modification time, so a changed file list or a replaced image is a different cache;
* its **manifest** (``.json``, written last, atomically) records the key, the shape and a CRC-32
  per chunk of images; a missing or unreadable manifest, a file of the wrong length or a chunk whose
  checksum differs (verified once per process, in parallel threads) means the file is deleted and
  rebuilt, with a warning naming it;
* builds write to a temporary file renamed into place when complete, under a lock, so concurrent
  processes (DDP ranks, parallel notebooks) build a split once and a crash leaves no half file.

The cache folder is ``$RFT_CACHE_DIR/decoded`` (default ``~/.cache/rftlib/decoded``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomically, write_text_atomically
from .base import FileImages
from .views import CroppedFileImages, decode_views

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the bytes of a view change (decoder, geometry, resampling)
CHUNK = 256         # images per checksum (and per decoding request)
_VERIFIED: set[tuple] = set()


def decoded_cache_dir() -> Path:
    """``$RFT_CACHE_DIR/decoded``, default ``~/.cache/rftlib/decoded``."""
    base = os.environ.get("RFT_CACHE_DIR") or Path.home() / ".cache" / "rftlib"
    return Path(base) / "decoded"


def source_key(paths: tuple[str, ...], size: int, border: int = 0) -> str:
    """A digest of the view geometry (size; a decode-time border crop, when there is one) and every
    file's path, size and modification time."""
    cropped = f" border={border}" if border else ""  # caches of uncropped files keep their keys
    digest = hashlib.sha1(f"rftlib-decoded v{FORMAT_VERSION} size={size}{cropped}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path!r}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:  # a missing file fails later, when it is decoded, with its name
            digest.update(f"{path!r}\tmissing\n".encode())
    return digest.hexdigest()


def cached_views(images: FileImages, size: int, *, name: str, workers: int, cache_dir: str | Path | None = None,
                 progress_mode: str | None = None) -> torch.Tensor:
    """The evaluation views of ``images`` as a memory-mapped ``uint8`` (N, 3, size, size) tensor,
    decoded and cached on first use (see the module docstring)."""
    folder = Path(cache_dir) if cache_dir is not None else decoded_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = source_key(images.paths, size, images.border if isinstance(images, CroppedFileImages) else 0)
    base = folder / f"{_safe(name)}-{size}px-{key[:20]}"
    with _locked(base.with_suffix(".lock")):
        mapped = _open_verified(base, key, len(images), size)
        if mapped is None:
            _build(base, key, images, size, name, workers, progress_mode)
            mapped = _open_verified(base, key, len(images), size)
    if mapped is None:
        raise RuntimeError(f"the decoded cache {base}.u8 did not verify right after it was built")
    return mapped


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "split"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shape(count: int, size: int) -> tuple[int, int, int, int]:
    return count, 3, size, size


def _open_verified(base: Path, key: str, count: int, size: int) -> torch.Tensor | None:
    """The mapped cache if it exists and verifies; ``None`` (after deleting a bad one) otherwise."""
    data, manifest_path = base.with_suffix(".u8"), base.with_suffix(".json")
    if not data.exists() and not manifest_path.exists():
        return None
    problem = _problem(data, manifest_path, key, count, size)
    if problem is not None:
        log.warning("decoded cache %s is not valid (%s): rebuilding it", data, problem)
        data.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
        return None
    array = np.memmap(data, dtype=np.uint8, mode="c", shape=_shape(count, size))  # copy-on-write: never writes
    return torch.from_numpy(array)


def _problem(data: Path, manifest_path: Path, key: str, count: int, size: int) -> str | None:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        return f"manifest unreadable: {err}"
    expected = {"version": FORMAT_VERSION, "key": key, "count": count, "size": size, "chunk": CHUNK}
    wrong = [k for k, v in expected.items() if manifest.get(k) != v]
    if wrong:
        return f"manifest does not match ({', '.join(wrong)})"
    nbytes = int(np.prod(_shape(count, size)))
    try:
        stat = data.stat()
    except OSError as err:
        return f"data file unreadable: {err}"
    if stat.st_size != nbytes:
        return f"{stat.st_size} bytes instead of {nbytes}"
    identity = (str(data), stat.st_size, stat.st_mtime_ns, key)
    if identity in _VERIFIED:
        return None
    bad = _bad_chunks(data, manifest.get("crc32", []), count, size)
    if bad:
        return f"checksum mismatch in {len(bad)} chunk(s), first at image {bad[0] * CHUNK}"
    _VERIFIED.add(identity)
    return None


def _bad_chunks(data: Path, expected: list[int], count: int, size: int) -> list[int]:
    chunks = -(-count // CHUNK)
    if len(expected) != chunks:
        return list(range(chunks))
    array = np.memmap(data, dtype=np.uint8, mode="r", shape=_shape(count, size))

    def crc(i: int) -> int:
        return zlib.crc32(array[i * CHUNK:(i + 1) * CHUNK])  # zlib releases the GIL: threads run in parallel

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        actual = list(pool.map(crc, range(chunks)))
    return [i for i in range(chunks) if actual[i] != expected[i]]


def _build(base: Path, key: str, images: FileImages, size: int, name: str, workers: int,
           progress_mode: str | None) -> None:
    log.info("decoding %s (%d images) once into %s", name, len(images), base.with_suffix(".u8"))
    checksums: list[int] = []
    write_atomically(base.with_suffix(".u8"),
                     lambda tmp: checksums.extend(_decode_to_file(tmp, images, size, name, workers, progress_mode)))
    manifest = {"version": FORMAT_VERSION, "key": key, "count": len(images), "size": size, "chunk": CHUNK,
                "crc32": checksums, "split": name}
    write_text_atomically(base.with_suffix(".json"), json.dumps(manifest))  # last: it vouches for the data


def _decode_to_file(path: Path, images: FileImages, size: int, name: str, workers: int,
                    progress_mode: str | None) -> list[int]:
    """Decode every view into a new memory-mapped file; returns the CRC-32 of each chunk."""
    array = np.memmap(path, dtype=np.uint8, mode="w+", shape=_shape(len(images), size))
    checksums = [0] * -(-len(images) // CHUNK)

    def record(start: int, stop: int) -> None:
        checksums[start // CHUNK] = zlib.crc32(array[start:stop])

    decode_views(images, size, torch.from_numpy(array), workers=workers, chunk=CHUNK, on_chunk=record,
                 progress_mode=progress_mode, desc=f"decode {name}")
    array.flush()
    return checksums
