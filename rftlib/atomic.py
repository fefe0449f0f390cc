"""Files that are either complete or absent.

Every file rftlib writes for later runs to trust (checkpoints and their sidecars, training state,
``latest.json``, decoded caches and their manifests, prepared shards) is written to a temporary
sibling and renamed into place when complete; a crash or a full disk leaves the previous file (or
none), never half of one, and the temporary file is removed when writing fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
