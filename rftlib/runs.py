"""Run identity: what makes two runs the same run, and the folder a run lives in.

A run is named by its content: the method, the dataset and the options it was loaded with, the
model and its pretrained weights, the fully resolved method config (presets and overrides
applied) and the seed. :func:`run_id_for` hashes exactly that, so

* running the same command again finds the same run id and the same folder
  (``<runs_dir>/<run_id>``): an interrupted run resumes from its last checkpoint (the exact-resume
  machinery of :func:`rftlib.train.fit`) and a finished one is not trained again;
* changing anything that changes the result (a learning rate, a dataset subset, a seed) gives a
  new run, never a resume of a different one.

What is *not* part of the identity: where the data lives, the device, the number of data-loading
workers, progress bars and callbacks. Those change how fast a run goes, not what it computes. The
number of ranks is recorded but not part of the identity either: data order and augmentation are
keyed by the global batch, so 1 and 2 ranks train the same run (tested bit-identical on CPU), and a
run started on 4 GPUs may be resumed on 2.

A run folder (:class:`RunFolder`) records its identity in ``run.json`` and is held by one live
process at a time (an exclusive ``flock`` on ``.lock`` that the OS releases when the process dies,
so a killed run never blocks its own resume). Resuming a folder with another identity (possible
with an explicit ``out_dir``) is refused with the differences listed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temporaries, write_text_atomically
from .results.journal import REPLACED_MARK

log = logging.getLogger(__name__)
ID_DIGITS = 12
IDENTITY_FILE = "run.json"
LOCK_FILE = ".lock"
MAX_DIFFERENCES = 12


class RunInUseError(RuntimeError):
    """Another live process holds the run folder; the message names its pid."""


class RunIdentityError(ValueError):
    """A run folder holds a different run; the message lists the differences and the ways on."""


@dataclass(frozen=True)
class RunIdentity:
    """Everything that decides a run's result (see the module docstring)."""

    method: str
    dataset: str
    model: str
    pretrained: str | None
    seed: int
    config: Mapping[str, Any]
    dataset_options: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> str:
        """The identity as canonical JSON (sorted keys; unknown objects as their ``str``)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def as_json(self) -> dict:
        """The identity as plain JSON data (what ``run.json`` records)."""
        return json.loads(self.canonical())

    def run_id(self) -> str:
        """``<method>-<dataset>-<12 hex digits of the identity's SHA-256>``, e.g.
        ``finetune-synthwild-3f9a1c0b7d2e``."""
        digest = hashlib.sha256(self.canonical().encode()).hexdigest()[:ID_DIGITS]
        return f"{self.method}-{self.dataset}-{digest}"


def identity_of(method: str, dataset: str, model: str, pretrained: str | None, seed: int, config: Any,
                dataset_options: Mapping[str, Any] | None = None) -> RunIdentity:
    """A :class:`RunIdentity` from a method config dataclass (or mapping) and the rest."""
    as_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return RunIdentity(method=method, dataset=dataset, model=model, pretrained=pretrained, seed=int(seed),
                       config=as_dict, dataset_options=dict(dataset_options or {}))


def differences(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``"key: recorded -> wanted"`` for every leaf where two JSON values differ (dotted keys)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        found = []
        for key in sorted(set(recorded) | set(wanted)):
            found += differences(recorded.get(key), wanted.get(key), f"{prefix}{key}.")
        return found
    return [] if recorded == wanted else [f"{prefix.rstrip('.')}: {recorded!r} -> {wanted!r}"]


class RunFolder:
    """A run's folder, held exclusively by one live process while the run uses it.

    Example::

        with RunFolder(out).acquire() as folder:
            folder.claim(identity, world_size=1)
            ...  # train, checkpoint into out

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RunFolder:
        """Take the folder's lock (released by :meth:`release` or when this process dies).

        Raises:
            RunInUseError: another live process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"run folder {self.path} is in use by pid {holder}; wait for that run to end, or "
                                "give this one another folder (out_dir / --out-dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        removed = remove_stale_temporaries(self.path)  # left by a killed writer; nobody else writes here now
        if removed:
            log.info("removed %d temporary file(s) of interrupted writes in %s", len(removed), self.path)
        return self

    def in_use(self) -> bool:
        """Whether a live process holds the folder's lock now (without taking it; a sweep asks this of
        runs another launch may be running)."""
        path = self.path / LOCK_FILE
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the lock if we took it
        return False

    def release(self) -> None:
        """Let go of the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def claim(self, identity: RunIdentity, *, world_size: int = 1) -> None:
        """Record ``identity`` in ``run.json``, or check that it is the one recorded there.

        Raises:
            RunIdentityError: the folder holds another run; the message lists what differs.
        """
        path = self.path / IDENTITY_FILE
        run_id, wanted = identity.run_id(), identity.as_json()
        if path.exists():
            try:
                recorded = json.loads(path.read_text())["identity"]
            except (ValueError, KeyError, TypeError) as err:
                raise RunIdentityError(f"{path} is not a readable run record ({err}); if the folder holds no run "
                                       "you need, delete it, or use another out_dir") from None
            found = differences(recorded, wanted)
            if found:
                listed = "; ".join(found[:MAX_DIFFERENCES]) + ("; ..." if len(found) > MAX_DIFFERENCES else "")
                raise RunIdentityError(
                    f"{self.path} holds another run ({len(found)} difference(s): {listed}). Resuming would mix "
                    "weights trained under both settings. Use another out_dir (--out-dir) for this run, or "
                    "force=True (--force) to replace the one in the folder")
        record = {"run_id": run_id, "identity": wanted, "world_size": world_size}
        write_text_atomically(path, json.dumps(record, indent=1, sort_keys=True))

    def clear(self, *, move_aside: bool) -> Path | None:
        """Empty a held folder for a fresh start: delete its contents (the default folders rftlib
        names), or (``move_aside``) move the whole folder to ``<path>.replaced-<UTC time>`` and hold
        a new empty one (a folder the user chose: nothing they put there is lost).

        Returns:
            Where the old contents went, or None when they were deleted.
        """
        import shutil
        from datetime import UTC, datetime

        if not move_aside:
            for child in self.path.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            return None
        aside = self.path.with_name(f"{self.path.name}{REPLACED_MARK}{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
        self.path.rename(aside)
        self.release()
        self.acquire()
        return aside
