"""Files that are either complete or absent.

Every file rftlib writes for later runs to trust (checkpoints and their sidecars, training state,
``latest.json``, decoded caches and their manifests, prepared shards) is written to a temporary
sibling (``.<name>.tmp-<pid>``) and renamed into place when complete; a crash or a full disk
leaves the previous file (or none), never half of one, and the temporary file is removed when
writing fails. A full disk is reported as :class:`DiskFullError`, naming the folder.

Only a process killed in the middle of a write (SIGKILL, the out-of-memory killer, a power cut)
leaves its temporary behind; :func:`remove_stale_temporaries` removes those (for a run folder:
once its lock is taken).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
"""The name of a temporary sibling: ``.<target name>.tmp-<pid of the writer>``."""

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull")
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write failed because the device (or the user's quota) is full; the message names the folder.

    ``errno`` is ``ENOSPC`` (or ``EDQUOT``), so ``except OSError`` handlers keep working.
    """


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary sibling :func:`write_atomically` writes ``path`` to in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary sibling of ``path``, then rename it to ``path``.

    Raises:
        DiskFullError: the device holding ``path`` is full (or the quota is used up); the message
            names the folder; the previous ``path`` is untouched and no temporary file is left.
        Exception: whatever ``write`` raised otherwise (again without leaving a temporary file).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if not isinstance(err, DiskFullError) and _is_disk_full(err, path.parent):
            raise _disk_full_error(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that interrupted atomic writes left in ``folder``; return their paths.

    A temporary is a file named ``.<name>.tmp-<pid>`` (see :func:`write_atomically`). One is stale
    when its writer, process ``<pid>``, no longer runs: it was killed in the middle of a write, and
    the file (up to a whole checkpoint) only takes space. Temporaries of running processes are kept,
    so this is safe even in a folder other processes write to; the intended caller is the code that
    takes a run folder's lock, right after taking it. Sub-folders are not searched; a missing
    ``folder`` gives ``[]``.

    Args:
        folder: the folder to clean (a run folder, a cache folder).

    Returns:
        The removed files, sorted.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False) or _running(int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            path.unlink()
        except FileNotFoundError:  # its writer, or another cleaner, was faster
            continue
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in sorted(removed)))
    return sorted(removed)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without signalling)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or an exception it chains) is a full device or quota.

    Writers that are not plain Python I/O hide the errno (``torch.save`` reports "unexpected pos"),
    so a failed write on a device with (almost) no space left counts as well.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _disk_full_error(path: Path, err: BaseException) -> DiskFullError:
    code = err.errno if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS else errno.ENOSPC
    return DiskFullError(
        code, f"no space left in {path.parent} while writing {path.name} ({type(err).__name__}: {err}); "
              f"free space on that device (or write elsewhere), then run again -- the previous "
              f"{path.name}, if any, is unchanged and no temporary file was left behind",
    )
