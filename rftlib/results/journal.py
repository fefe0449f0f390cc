"""Records that survive many nodes: each run's results as append-only files in its own folder.

The model, in one place:

* **A run writes only to its own folder.** Every results write a run makes (register, metric
  rows, finish) is appended to ``<run folder>/records/`` as one small JSON file,
  ``<sequence>-<op>.json``. A record is written to a temporary sibling, flushed to disk and then
  *linked* to its final name, which fails rather than overwrite: a record is either complete or
  absent, and never changes once written. The run folder's lock (:class:`rftlib.runs.RunFolder`)
  makes its run the only writer, so no two processes ever write one journal, and no file is
  shared between nodes: this is safe on a network filesystem, where SQLite's locking is not.
* **One process gathers.** :func:`gather` replays every run folder's records, in sequence order,
  into a SQLite store (:class:`~rftlib.results.store.ResultsStore`). Replaying is idempotent (a
  run is registered by id, a metric row replaces the row with the same key, a finish sets the
  status), so gathering again -- while runs are still writing, after a job died mid-run, after
  it was retried -- neither loses nor duplicates a row: it converges on what the journals say.
* **Where the SQLite store is written directly.** A run started on one machine (the notebooks,
  ``python -m rftlib.train``) writes its journal *and* the store, so results appear live. A run
  started by :mod:`rftlib.sweep` writes only its journal (``RFT_RESULTS_SINK=folder``), and the
  sweep gathers. :func:`rftlib.results.load` also reads a folder of runs directly.

A forced retrain empties the folder and starts its journal with a ``delete_run`` record, so a
store that gathered the old run forgets it before the new one is replayed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .rows import sql_value

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
REPLACED_MARK = ".replaced-"
"""In the name of a forced run's old folder, moved aside (:meth:`rftlib.runs.RunFolder.clear`)."""
SINK_ENV_VAR = "RFT_RESULTS_SINK"
SINKS = ("store", "folder")
"""``store``: a run writes its journal and the SQLite store; ``folder``: its journal only."""
OPS = ("start_run", "log_metrics", "log_rows", "set_base_method", "finish_run", "delete_run")
"""The store writes a journal records (each replayed as the :class:`ResultsStore` method of that name)."""


def resolve_sink(sink: str | None = None) -> str:
    """``sink``, else ``$RFT_RESULTS_SINK``, else ``store``; anything else is refused."""
    chosen = sink if sink is not None else os.environ.get(SINK_ENV_VAR) or "store"
    if chosen not in SINKS:
        raise ValueError(f"results sink {chosen!r} (from {'the argument' if sink is not None else SINK_ENV_VAR}) "
                         f"is not one of {', '.join(SINKS)}")
    return chosen


def _jsonable(value: Any) -> Any:
    """Plain JSON data for a record: dataclasses as dicts, numpy/torch scalars as numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    value = sql_value(value)  # numpy and torch scalars as Python numbers
    return value if isinstance(value, (str, bool, int, float, type(None))) else str(value)


class RunJournal:
    """The append-only records of one run, in ``<folder>/records``.

    Args:
        folder: the run's folder (its ``records`` subfolder is created on the first append).
        writer: whether appends reach the disk (False on the non-main ranks of a distributed run).
    """

    def __init__(self, folder: str | os.PathLike, *, writer: bool = True):
        self.folder = Path(folder) / RECORDS_DIR
        self.writer = writer
        self._next: int | None = None

    def __repr__(self) -> str:
        return f"RunJournal({str(self.folder)!r})"

    def files(self) -> list[Path]:
        """The complete records, in sequence order (temporary files of interrupted writes are skipped)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    def records(self) -> list[dict]:
        """Every complete record, in order; a file that is not a record names itself in the error."""
        found = []
        for path in self.files():
            try:
                record = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"{path} is not a readable results record ({err}); it was written by an older "
                                 "rftlib or by hand: move it out of the records folder") from None
            if record.get("op") not in OPS:
                raise ValueError(f"{path} holds an unknown op {record.get('op')!r}; valid: {', '.join(OPS)}")
            found.append(record)
        return found

    def append(self, op: str, **args: Any) -> Path | None:
        """Write one record (``op`` with the keyword arguments of the store method of that name)."""
        if op not in OPS:
            raise ValueError(f"unknown journal op {op!r}; valid: {', '.join(OPS)}")
        if not self.writer:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"op": op, "at": datetime.now(UTC).isoformat(timespec="microseconds"), "args": _jsonable(args)}
        data = json.dumps(record, sort_keys=True).encode()
        tmp = self.folder / f".record.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            while True:
                path = self.folder / f"{self._sequence():08d}-{op}.json"
                try:
                    os.link(tmp, path)  # never replaces a record
                    return path
                except FileExistsError:
                    self._next = None
                except OSError:  # a filesystem without hard links: the folder's lock makes us its only writer
                    if not path.exists():
                        os.replace(tmp, path)
                        return path
                    self._next = None
        finally:
            tmp.unlink(missing_ok=True)

    def _sequence(self) -> int:
        """The next record's number (one more than the last on disk)."""
        if self._next is None:
            last = self.files()
            self._next = int(last[-1].name.split("-", 1)[0]) + 1 if last else 1
        number, self._next = self._next, self._next + 1
        return number

    def status(self) -> str | None:
        """The run's status as its records tell it: None (never started), ``running``, ``done`` or
        ``failed`` (the last finish after the last start)."""
        status = None
        for record in self.records():
            if record["op"] == "start_run":
                status = "running"
            elif record["op"] == "finish_run":
                status = record["args"].get("status", "done")
            elif record["op"] == "delete_run":
                status = None
        return status


class RunRecorder:
    """Where a run's results go: its journal always, and the SQLite store when the sink is ``store``.

    It offers the write methods of :class:`~rftlib.results.store.ResultsStore` that a run uses, with
    the same arguments, so a method never knows which sink is in use.

    Args:
        store: the results store (its ``path`` is passed on to runs this one starts, e.g. a base run).
        journal: the run's journal.
        sink: ``store`` or ``folder`` (:func:`resolve_sink`).
    """

    def __init__(self, store, journal: RunJournal, sink: str = "store"):
        self.store, self.journal, self.sink = store, journal, resolve_sink(sink)

    @property
    def path(self) -> Path:
        return self.store.path

    def run_status(self, run_id: str) -> str | None:
        return self.store.run_status(run_id) if self.sink == "store" else self.journal.status()

    def _both(self, op: str, *args: Any, **kwargs: Any) -> Any:
        self.journal.append(op, **_named(op, args, kwargs))
        return getattr(self.store, op)(*args, **kwargs) if self.sink == "store" else None

    def start_run(self, run_id: str, **kwargs: Any) -> None:
        self._both("start_run", run_id, **kwargs)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], **kwargs: Any) -> int:
        return self._both("log_metrics", run_id, metrics, **kwargs) or len(metrics)

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = list(rows)
        return self._both("log_rows", rows) or len(rows)

    def set_base_method(self, run_id: str, base_method: str | None) -> None:
        self._both("set_base_method", run_id, base_method)

    def finish_run(self, run_id: str, status: str = "done") -> None:
        self._both("finish_run", run_id, status)

    def delete_run(self, run_id: str) -> int:
        """Forget the run in the store (its journal goes with the folder, which the caller empties)."""
        return self.store.delete_run(run_id) if self.sink == "store" else 0


_POSITIONAL = {"start_run": ("run_id",), "log_metrics": ("run_id", "metrics"), "log_rows": ("rows",),
               "set_base_method": ("run_id", "base_method"), "finish_run": ("run_id", "status"),
               "delete_run": ("run_id",)}


def _named(op: str, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """A store call's arguments, all by name (what a record holds)."""
    return {**dict(zip(_POSITIONAL[op], args)), **kwargs}


# ---------------------------------------------------------------------------------------- gathering
@dataclass
class GatherReport:
    """What one :func:`gather` found: run folders with records, records replayed, runs by status."""

    runs: int = 0
    records: int = 0
    statuses: dict | None = None

    def __str__(self) -> str:
        by = ", ".join(f"{n} {s}" for s, n in sorted((self.statuses or {}).items()))
        return f"{self.runs} run folder(s), {self.records} record(s) replayed ({by or 'none'})"


def run_folders(root: str | os.PathLike) -> list[Path]:
    """Every run folder under ``root`` that holds records, ``root`` itself included, sorted (a base
    run lives inside the run built on it: WiSE-FT's ``<run>/finetune``); a forced run's old folder,
    moved aside as ``<name>.replaced-<time>``, is not one."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        if RECORDS_DIR in subfolders:
            found.append(Path(folder))
        subfolders[:] = [d for d in subfolders if d != RECORDS_DIR and REPLACED_MARK not in d]
    return sorted(found)


def replay(records: Iterable[Mapping[str, Any]], store) -> int:
    """Apply records to ``store`` in order (idempotent); returns how many were applied."""
    count = 0
    for record in records:
        args = dict(record["args"])
        if record["op"] == "log_metrics":
            args["metrics"] = {k: (math.nan if v is None else v) for k, v in args["metrics"].items()}
        getattr(store, record["op"])(**args)
        count += 1
    return count


def gather(root: str | os.PathLike, store) -> GatherReport:
    """Replay the records of every run folder under ``root`` into ``store`` (one process does this;
    see the module docstring). Safe to repeat and to run while runs are still writing."""
    report = GatherReport(statuses={})
    for folder in run_folders(root):
        journal = RunJournal(folder, writer=False)
        records = journal.records()
        report.records += replay(records, store)
        report.runs += 1
        status = journal.status()
        report.statuses[status or "deleted"] = report.statuses.get(status or "deleted", 0) + 1
    log.info("gathered %s into %s", report, store.path)
    return report
