"""The results store: every metric of every run, in one SQLite file.

Why SQLite: it is a single file that needs no server, ships with python, and gives real
transactions. Several training or evaluation processes can append to the same store at once, and a
process killed in the middle of a write (OOM, pre-emption, Ctrl-C) loses at most the transaction it
was writing, never the file.

How that is achieved:

* **WAL journal mode**: writers append to a write-ahead log, so readers never block writers and a
  crash leaves the database consistent; ``synchronous=NORMAL`` is durable against process crashes
  (only a power cut can drop the very last commits) and much faster than ``FULL``.
* **One transaction per ``log_*`` call** (``BEGIN IMMEDIATE`` ... ``COMMIT``), a 60 s
  ``busy_timeout`` so concurrent writers queue instead of failing, and a few retries with back-off
  for the rare "database is locked" that slips through.
* **A fresh connection per operation**, so a store object can be pickled into worker processes and
  no connection outlives a ``fork``.
* **Read-only media**: reading a WAL store needs its ``-shm`` file, which cannot be created in a
  read-only folder; there the store is opened read-only and immutable (a left-over ``-wal`` of
  unfinished checkpoints is read through a temporary copy, so no committed row is missed).
* **Nothing wrong goes in**: every column is checked against its declared type before the
  transaction starts (:func:`~rftlib.results.schema.typed_value`); one bad row refuses its whole
  batch, so ``load()`` cannot be broken through this API. A file that is not a store (another
  application's database, random bytes, a damaged or truncated store, a newer rftlib's store)
  raises :class:`StoreError`, naming the file and what to do, and is never written to.

The ``results`` table is *tidy*: one row per metric value, with the things you group and filter by
(run, method, dataset, split, metric, epoch, seed) as real columns, the row's ``kind`` (``final``,
``epoch``, ``sweep`` or ``info``; :data:`~rftlib.results.schema.ROW_KINDS`) and its knobs (any
names, any number: ``{"alpha": 0.5}``) as canonical JSON that :meth:`ResultsStore.load` expands
into one column per knob. A plot is then one ``load(...)`` plus a pandas ``pivot``. Logging is
idempotent: a row is unique per (run, kind, split, metric, knobs, epoch, step), so a resumed or
re-run command replaces its rows instead of duplicating them. The ``runs`` table registers each
run once (``start_run``/``finish_run``) so that crashed runs can be told apart from finished ones,
so that ``log_metrics`` can fill in a run's method, dataset, model and seed without the caller
repeating them, and so that a comparison knows each split's headline metric. The run's config is
stored there once (a result row holds a config only when it differs from its run's, or has no
registered run); :meth:`ResultsStore.load` joins it back, with the run's ``status``.

The schema is versioned (:mod:`rftlib.results.schema`); a store written by an older release is
migrated on its first write, and read through an in-memory migrated copy until then.

The file lives at ``results.db`` in the runs folder (:func:`runs_dir`: ``$RFT_RUNS_DIR``, else
``rft_runs/`` under the current directory) unless the ``RFT_RESULTS_DB`` environment variable or an
explicit ``path`` argument says otherwise (explicit > env var > default).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from .rows import (
    LOADED_COLUMNS,
    WRITABLE_RESULT_COLUMNS,
    checked_run,
    config_json,
    empty_frame,
    filter_knobs,
    prepare_row,
    row_values,
    sql_value,
    typed_frame,
    utc_now,
    with_knob_columns,
)
from .schema import (
    RESULT_COLUMNS,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    SchemaError,
    typed_value,
    upgrade,
    version,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
ENV_VAR = "RFT_RESULTS_DB"
RUNS_ENV_VAR = "RFT_RUNS_DIR"
DEFAULT_RUNS_DIR = Path("rft_runs")
BUSY_TIMEOUT_MS = 60_000
LOCK_RETRIES = 5
RUN_STATUSES = ("running", "done", "failed")
EXPORT_SUFFIXES = (".csv", ".jsonl")

# run fields that log_metrics inherits from the runs table when the caller leaves them out (the
# config is not copied: it stays on the run, and load() joins it)
_INHERITED_FIELDS = ("method", "dataset", "model", "pretrained", "seed")
_ELSEWHERE = f"use another file (pass path= or set ${ENV_VAR})"


class StoreError(ValueError):
    """A results store file that cannot be read or written as it is; the message names the file,
    what is wrong and what to do (move it aside, or use another file)."""


def runs_dir() -> Path:
    """The folder for run outputs (checkpoints under ``<run_id>/``, and the default results store).

    Returns:
        ``$RFT_RUNS_DIR`` if set and non-empty, else ``rft_runs`` under the current working
        directory; always absolute.
    """
    env = os.environ.get(RUNS_ENV_VAR)
    return Path(env).expanduser().absolute() if env else Path.cwd() / DEFAULT_RUNS_DIR


def default_path() -> Path:
    """Where the store lives when no explicit path is given.

    Returns:
        ``$RFT_RESULTS_DB`` if that environment variable is set and non-empty, else
        ``results.db`` in :func:`runs_dir`; always absolute, so a later ``chdir`` does not move
        the store.
    """
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().absolute() if env else runs_dir() / "results.db"


def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """Apply the precedence explicit path > ``$RFT_RESULTS_DB`` > default.

    Args:
        path: An explicit database path, or None.

    Returns:
        The database path to use, made absolute so that a later ``chdir`` does not move it.
    """
    return Path(path).expanduser().absolute() if path is not None else default_path()






def _folder_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (SQLite's ``-wal``/``-shm`` next to the store);
    False on read-only media, a read-only mount or a folder without write permission."""
    return os.access(folder, os.W_OK | os.X_OK)


def _explain(path: Path, doing: str, error: BaseException) -> str:
    """The :class:`StoreError` message for ``error``, raised while ``doing`` (``read``/``write``)
    the store at ``path``: what went wrong, in SQLite's words, and what to do about it."""
    if isinstance(error, SchemaError):
        return f"results store {path} {error}. To go on, {_ELSEWHERE}"
    message = str(error)
    lower = message.lower()
    if path.is_dir():
        return f"results store {path} is a folder, not a file. To go on, {_ELSEWHERE}"
    if isinstance(error, OSError):
        return f"cannot {doing} results store {path}: {message}. To go on, {_ELSEWHERE}"
    if "not a database" in lower or "malformed" in lower or "corrupt" in lower:
        return (f"results store {path} is damaged or not a SQLite file ({message}). Move it aside "
                f"(mv '{path}' '{path}.broken'; the next write starts a new store) or {_ELSEWHERE}; "
                f"`sqlite3 '{path}' .recover` may rescue its rows")
    if "readonly" in lower or "read-only" in lower or ("unable to open" in lower and doing == "write"):
        return (f"cannot write results store {path} ({message}): the file or its folder is read-only "
                f"(reading it still works). To record results, {_ELSEWHERE}")
    if "unable to open" in lower:
        return f"cannot open results store {path} ({message}): is it a file you may read? Or {_ELSEWHERE}"
    if "is full" in lower:
        return f"cannot write results store {path} ({message}): free disk space there, or {_ELSEWHERE}"
    if _is_lock_error(error):
        return (f"results store {path} stayed locked by another process ({message}); retry when the other "
                f"writer is done, or {_ELSEWHERE}")
    return f"cannot {doing} results store {path} ({type(error).__name__}: {message}). To go on, {_ELSEWHERE}"


def _is_lock_error(error: BaseException) -> bool:
    """True for the transient "database is locked/busy" errors worth retrying."""
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _with_lock_retries(operation: Callable[[], T], what: str) -> T:
    """Run ``operation``, retrying with exponential back-off while the database is locked.

    ``busy_timeout`` already makes SQLite wait for the lock; this catches the cases it cannot
    (e.g. a lock upgrade that would deadlock, which SQLite fails immediately).

    Args:
        operation: A callable doing one complete transaction.
        what: A description for the log.

    Returns:
        Whatever ``operation`` returns.
    """
    for attempt in range(LOCK_RETRIES):
        try:
            return operation()
        except sqlite3.OperationalError as error:
            if not _is_lock_error(error) or attempt == LOCK_RETRIES - 1:
                raise
            delay = 0.05 * 2**attempt
            logger.warning("%s: database locked (%s); retry %d in %.2f s", what, error, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")












def _where_clause(filters: Mapping[str, Any], allowed: Mapping[str, str]) -> tuple[str, list[Any]]:
    """Turn ``column=value`` filters into a parameterised SQL ``WHERE`` clause.

    A list/tuple/set value means ``IN (...)``, None means ``IS NULL``, anything else ``=``.

    Args:
        filters: Column names mapped to the wanted values.
        allowed: The column names that may be filtered on (guards against SQL injection), each
            mapped to its SQL expression (e.g. ``"r.method"``).

    Returns:
        ``(sql, params)``; ``sql`` is empty when there are no filters.

    Raises:
        ValueError: On a column name not in ``allowed``.
    """
    unknown = sorted(set(filters) - set(allowed))
    if unknown:
        raise ValueError(f"unknown filter column(s) {unknown}; valid columns: {', '.join(allowed)}")
    clauses, params = [], []
    for key, value in filters.items():
        name = allowed[key]
        if value is None:
            clauses.append(f"{name} IS NULL")
        elif isinstance(value, (list, tuple, set, frozenset)):
            values = list(value)
            clauses.append(f"{name} IN ({', '.join('?' * len(values))})" if values else "0")
            params.extend(sql_value(v) for v in values)
        else:
            clauses.append(f"{name} = ?")
            params.append(sql_value(value))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params




class ResultsStore:
    """A handle on one results database; cheap to create, safe to share across processes.

    Example:
        >>> store = ResultsStore("/tmp/demo.db")
        >>> run = store.new_run_id("wiseft", "iwildcam")
        >>> store.start_run(run, method="wiseft", dataset="iwildcam", model="ViT-B-16", seed=0)
        >>> store.log_metrics(run, {"accuracy": 0.71, "macro_f1": 0.38}, split="test", kind="sweep",
        ...                   knobs={"alpha": 0.5})
        2
        >>> store.finish_run(run)
        >>> store.load(method="wiseft", metric="macro_f1")[["alpha", "value"]]  # doctest: +SKIP

    Args:
        path: Database file; defaults to :func:`default_path`. Nothing is created until the first
            write, so pointing a store at a missing file to read it is harmless.
        writer: whether writes reach the file. Default: in a single process, yes; in a distributed
            job (``torchrun``), only on the main rank, so each run is recorded once (the other
            ranks' writes are no-ops; reads work everywhere).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, writer: bool | None = None):
        self.path = resolve_path(path)
        if writer is None:
            from ..dist import current

            writer = current().is_main
        self.writer = writer

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # ------------------------------------------------------------------ connections
    def _open(self) -> sqlite3.Connection:
        """Open a connection in autocommit mode with the store's pragmas applied."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _open_for_reading(self) -> sqlite3.Connection:
        """A connection to read the file: the usual one, or, where the folder is read-only (no
        ``-shm`` can be created there), a read-only immutable one; if a ``-wal`` with commits not
        yet checkpointed lies next to it, an in-memory copy of the store with those commits."""
        if _folder_writable(self.path.parent):
            return self._open()
        wal = Path(f"{self.path}-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            return _snapshot(self.path, wal)
        return sqlite3.connect(f"{self.path.as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)

    @contextmanager
    def _named_errors(self, doing: str) -> Iterator[None]:
        """Turn what a damaged, foreign or unreachable file raises into a :class:`StoreError` that
        names the file and what to do."""
        try:
            yield
        except (SchemaError, sqlite3.DatabaseError, OSError) as error:
            raise StoreError(_explain(self.path, doing, error)) from error

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield a connection inside ``BEGIN IMMEDIATE``; commit on success, roll back on error.

        ``IMMEDIATE`` takes the write lock up front, so two writers queue on ``busy_timeout``
        instead of deadlocking on a read-to-write lock upgrade. The schema is (re)created inside
        the transaction, which makes the first write to a fresh file race-free. A file that is not
        a store is refused before anything (not even its journal mode) is changed.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not _folder_writable(self.path.parent):
            raise StoreError(f"cannot write results store {self.path}: its folder is read-only (reading the "
                             f"store still works). To record results, {_ELSEWHERE}")
        conn = self._open()
        try:
            version(conn)  # reads only: refuses another application's database, or a newer store
            conn.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
            conn.execute("BEGIN IMMEDIATE")
            try:
                upgrade(conn)
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _write(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run ``work(conn)`` as one transaction, retried while the database is locked (nothing on a
        store that is not the writer)."""
        if not self.writer:
            return None

        def attempt() -> T:
            with self._transaction() as conn:
                return work(conn)

        with self._named_errors("write"):
            return _with_lock_retries(attempt, what)

    def _read_connection(self) -> sqlite3.Connection:
        """A connection to read from: the file itself, or, for a store an older release wrote (not
        migrated until its first write), an in-memory copy migrated to this schema."""
        conn = self._open_for_reading()
        try:
            found = version(conn)
        except BaseException:
            conn.close()
            raise
        if found in (0, SCHEMA_VERSION):
            return conn
        try:
            memory = sqlite3.connect(":memory:", isolation_level=None)
            conn.backup(memory)
        finally:
            conn.close()
        memory.execute("BEGIN")
        upgrade(memory)
        memory.execute("COMMIT")
        return memory

    def _read(self, source: str, columns: Mapping[str, str], filters: Mapping[str, Any]) -> pd.DataFrame:
        """Select ``columns`` (name -> SQL expression) from ``source`` matching ``filters`` as a typed
        frame, oldest first (empty if there is no file or no table yet)."""
        declared = {name: {**RESULT_COLUMNS, **RUN_COLUMNS, **LOADED_COLUMNS}[name] for name in columns}
        where, params = _where_clause(filters, columns)
        if not self.path.exists():
            return empty_frame(declared)
        order = columns["id"] if "id" in columns else columns["created_at"]
        sql = f"SELECT {', '.join(columns.values())} FROM {source}{where} ORDER BY {order}"

        def attempt() -> list[tuple]:
            conn = self._read_connection()
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()

        with self._named_errors("read"):
            try:
                records = _with_lock_retries(attempt, f"load {source}")
            except sqlite3.OperationalError as error:
                if "no such table" not in str(error):
                    raise
                return empty_frame(declared)
        frame = pd.DataFrame.from_records(records, columns=list(columns), coerce_float=False)
        try:
            return typed_frame(frame.astype(object), declared)
        except ValueError as error:
            raise StoreError(f"results store {self.path}: {error} (e.g. with `sqlite3 '{self.path}'`)") from error

    # ------------------------------------------------------------------ runs
    @staticmethod
    def new_run_id(method: str, dataset: str) -> str:
        """A readable, unique run id such as ``wiseft-iwildcam-20240501T120000Z-3f9a1c``, for ad-hoc
        logging; :func:`rftlib.methods.run_method` names its runs by content instead
        (:func:`rftlib.runs.run_id_for`), so the same command finds the same run.

        Returns:
            ``method-dataset-<UTC timestamp>-<6 random hex digits>``.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{method}-{dataset}-{stamp}-{secrets.token_hex(3)}"

    def start_run(
        self,
        run_id: str,
        *,
        method: str,
        dataset: str,
        model: str | None = None,
        pretrained: str | None = None,
        seed: int | None = None,
        config: Mapping[str, Any] | None = None,
        base_method: str | None = None,
        splits: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """Register a run with status ``running`` (re-registering an id resets it to ``running`` and
        keeps its rows: they are replaced one by one as the run logs them again; if the config
        changed, the rows logged so far keep the old one).

        Args:
            run_id: The run's id.
            method: Method name (``"zeroshot"``, ``"finetune"``, ``"wiseft"``, ...).
            dataset: Dataset name.
            model: Model architecture, e.g. ``"ViT-B-32"``.
            pretrained: Pre-trained weights tag, e.g. ``"openai"``.
            seed: Random seed.
            config: The full run configuration; stored once, as canonical JSON.
            base_method: The method of the run this one builds on (WiSE-FT over ``"flyp"``).
            splits: Each evaluated split's facts, ``{split: {"role", "metric", "use"}}``
                (:meth:`rftlib.data.base.RFTDataset.split_facts`).
        """
        row = checked_run({
            "run_id": run_id, "method": method, "base_method": base_method, "dataset": dataset, "model": model,
            "pretrained": pretrained, "seed": seed, "config_json": config_json(config),
            "splits_json": config_json(splits), "status": "running", "created_at": utc_now(), "finished_at": None,
        })
        names = ", ".join(row)
        kept = ("run_id", "created_at")  # a restarted run keeps its first creation time
        updates = ", ".join(f"{name} = excluded.{name}" for name in row if name not in kept)
        sql = (
            f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(row))}) "
            f"ON CONFLICT(run_id) DO UPDATE SET {updates}"
        )
        params = [sql_value(v) for v in row.values()]

        def work(conn: sqlite3.Connection) -> None:
            found = conn.execute("SELECT config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if found and found[0] is not None and found[0] != row["config_json"]:
                # re-registered with another config: the rows logged so far keep the one they were made under
                conn.execute("UPDATE results SET config_json = ? WHERE run_id = ? AND config_json IS NULL",
                             (found[0], run_id))
            conn.execute(sql, params)

        self._write(f"start_run {run_id}", work)
        logger.debug("started run %s", run_id)

    def set_base_method(self, run_id: str, base_method: str | None) -> None:
        """Record the method of the run that ``run_id`` builds on (known once the base is chosen)."""
        base_method = typed_value("base_method", RUN_COLUMNS["base_method"], base_method)
        sql = "UPDATE runs SET base_method = ? WHERE run_id = ?"
        self._write(f"set_base_method {run_id}", lambda conn: conn.execute(sql, (base_method, run_id)))

    def finish_run(self, run_id: str, status: str = "done") -> None:
        """Mark a registered run as finished.

        Args:
            run_id: The id given to :meth:`start_run`.
            status: ``"done"`` or ``"failed"`` (or ``"running"`` to reopen it).

        Raises:
            ValueError: On an unknown status.
            KeyError: If the run was never registered.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(RUN_STATUSES)}")
        sql = "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?"
        updated = self._write(
            f"finish_run {run_id}", lambda conn: conn.execute(sql, (status, utc_now(), run_id)).rowcount
        )
        if updated == 0:
            raise KeyError(f"run {run_id!r} was never registered with start_run")
        logger.debug("run %s -> %s", run_id, status)

    def delete_run(self, run_id: str) -> int:
        """Forget a run: its registration and every row it logged (e.g. before retraining it).

        Returns:
            The number of result rows deleted.
        """
        def work(conn: sqlite3.Connection) -> int:
            deleted = conn.execute("DELETE FROM results WHERE run_id = ?", (run_id,)).rowcount
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            return deleted

        return self._write(f"delete_run {run_id}", work) or 0

    def runs(self, **filters: Any) -> pd.DataFrame:
        """The run registry, oldest first.

        Args:
            **filters: ``column=value`` equality filters (a list means "any of").

        Returns:
            One row per run with the columns of :data:`RUN_COLUMNS`.
        """
        return self._read("runs", {name: name for name in RUN_COLUMNS}, filters)

    def run_status(self, run_id: str) -> str | None:
        """``running``, ``done`` or ``failed`` for a registered run; None for an unknown one."""
        found = self.runs(run_id=run_id)
        return None if found.empty else str(found["status"].iloc[0])

    # ------------------------------------------------------------------ results
    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        *,
        split: str,
        role: str | None = None,
        kind: str = "final",
        knobs: Mapping[str, float] | None = None,
        method: str | None = None,
        dataset: str | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
        seed: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> int:
        """Write one row per metric, all in one transaction, replacing the run's earlier rows with
        the same kind, split, metric, knobs, epoch and step.

        Fields left as None (method, dataset, model, pretrained, seed) are inherited from the run's
        :meth:`start_run` registration when there is one; so is its config, which stays on the run
        (:meth:`load` joins it).

        Args:
            run_id: The run the numbers belong to.
            metrics: Metric names mapped to values (numpy/torch scalars are fine).
            split: The evaluation split, e.g. ``"id_test"`` or ``"test"``.
            role: What the split plays in the study, e.g. ``"id"``, ``"ood"`` or ``"val"``.
            kind: What the rows are: ``final`` (the run's headline result), ``epoch``, ``sweep`` or
                ``info`` (:data:`~rftlib.results.schema.ROW_KINDS`).
            knobs: The method's knob values these numbers were measured at, any names
                (``{"alpha": 0.5}``); finite numbers only.
            method, dataset, model, pretrained: The run's identity (default: its registration's).
            epoch: Training epoch.
            step: Optimisation step.
            seed: Random seed.
            config: The configuration these numbers were measured under, when it is not the run's
                own (the run's config is never copied onto its rows).

        Returns:
            The number of rows written (``len(metrics)``).

        Raises:
            ValueError: naming the column, the value and the metric of the first value of a wrong
                type (a string for ``value``, a float for ``epoch``, ...); nothing is written then.
        """
        shared = {
            "run_id": run_id, "method": method, "dataset": dataset, "model": model, "pretrained": pretrained,
            "split": split, "role": role, "kind": kind, "knobs": knobs, "epoch": epoch, "step": step, "seed": seed,
            "config": config,
        }
        now = utc_now()
        rows = [prepare_row({**shared, "metric": name, "value": value}, now) for name, value in metrics.items()]

        def work(conn: sqlite3.Connection) -> int:
            inherited = self._run_fields(conn, run_id)
            for row in rows:
                for name in _INHERITED_FIELDS:
                    if row[name] is None:
                        row[name] = inherited.get(name)
            return _insert_results(conn, _without_run_configs(conn, rows))

        return self._write(f"log_metrics {run_id}", work) or 0

    @staticmethod
    def _run_fields(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
        """The inheritable fields of a registered run, or ``{}`` for an unregistered one."""
        cursor = conn.execute(f"SELECT {', '.join(_INHERITED_FIELDS)} FROM runs WHERE run_id = ?", (run_id,))
        found = cursor.fetchone()
        return dict(zip(_INHERITED_FIELDS, found, strict=True)) if found else {}

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Bulk-write already-tidy rows in one transaction (idempotent, like :meth:`log_metrics`).

        Each row maps column names (see :data:`RESULT_COLUMNS`; ``knobs`` is a dict of knob values,
        ``config`` a dict alias of ``config_json``) to values; ``run_id`` and ``metric`` are
        required, ``kind`` defaults to ``final``, ``created_at`` to now, and missing columns are
        NULL. No run-registry fill-in happens here; a row's config is kept only when it differs
        from its registered run's (ad-hoc rows of unregistered runs keep theirs).

        Returns:
            The number of rows written.

        Raises:
            ValueError: If a row has unknown keys, lacks ``run_id``/``metric``, or has a bad kind, knob
                or a value of the wrong type for its column (named with the row's metric); one bad
                row writes nothing of the batch.
        """
        now = utc_now()
        prepared = [prepare_row(row, now) for row in rows]
        if not prepared:
            return 0
        return self._write(f"log_rows ({len(prepared)} rows)",
                           lambda conn: _insert_results(conn, _without_run_configs(conn, prepared))) or 0

    def load(self, **filters: Any) -> pd.DataFrame:
        """Read results as a tidy DataFrame, in insertion order.

        Args:
            **filters: ``column=value`` equality filters, e.g. ``method="wiseft", kind="sweep"``;
                a list/tuple value means "any of", None means "is missing". A name that is not a
                column filters on a knob (``alpha=0.5``; ``alpha=None``: rows without that knob).

        Returns:
            One row per metric value with the columns of :data:`LOADED_COLUMNS`, then one float
            column per knob name found (NaN where a row lacks that knob); an empty frame with the
            fixed columns if the database does not exist yet.

        Raises:
            StoreError: if the file is not a results store or is damaged (naming it and the fix).
        """
        columns = {name: f"r.{name}" for name in LOADED_COLUMNS}
        columns.update(config_json="COALESCE(r.config_json, u.config_json)", base_method="u.base_method",
                       splits_json="u.splits_json", status="u.status")
        column_filters = {k: v for k, v in filters.items() if k in columns}
        frame = self._read("results r LEFT JOIN runs u ON u.run_id = r.run_id", columns, column_filters)
        return filter_knobs(with_knob_columns(frame), {k: v for k, v in filters.items() if k not in columns})

    def export(self, out_path: str | os.PathLike, **filters: Any) -> Path:
        """Write (filtered) results to ``.csv`` or ``.jsonl`` (one JSON object per line).

        Args:
            out_path: Destination file; the suffix picks the format.
            **filters: As for :meth:`load`.

        Returns:
            The written path.

        Raises:
            ValueError: On an unsupported suffix.
        """
        return _write_frame(self.load(**filters), Path(out_path))














def _without_run_configs(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows``, where a row's config equals its registered run's, without that copy (the run keeps
    it once; :meth:`ResultsStore.load` joins it back). Runs inside the caller's transaction."""
    run_ids = sorted({row["run_id"] for row in rows if row["config_json"] is not None})
    if not run_ids:
        return rows
    found = conn.execute(f"SELECT run_id, config_json FROM runs WHERE run_id IN ({', '.join('?' * len(run_ids))})",
                         run_ids)
    configs = dict(found.fetchall())
    return [{**row, "config_json": None} if row["config_json"] is not None and configs.get(row["run_id"]) ==
            row["config_json"] else row for row in rows]


def _insert_results(conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write complete result rows through ``conn`` (inside the caller's transaction); a row with the
    key of an existing row of its run replaces it.

    Returns:
        The number of rows written.
    """
    names = WRITABLE_RESULT_COLUMNS
    sql = f"INSERT OR REPLACE INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    conn.executemany(sql, [row_values(row) for row in rows])
    return len(rows)




def _snapshot(path: Path, wal: Path) -> sqlite3.Connection:
    """An in-memory copy of the store at ``path`` with the commits in its ``-wal`` (for a read-only
    folder, where SQLite cannot open the WAL in place): both files are copied to a temporary
    folder, opened there (which replays the WAL), and backed up into memory."""
    with tempfile.TemporaryDirectory(prefix="rft-store-") as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, Path(f"{copy}-wal"))
        source = sqlite3.connect(copy, isolation_level=None)
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            source.backup(memory)
        finally:
            source.close()
    return memory


def _write_frame(frame: pd.DataFrame, out_path: Path) -> Path:
    """Write a results frame as CSV or JSON lines according to the file suffix.

    Args:
        frame: The frame to write.
        out_path: Destination; ``.csv`` or ``.jsonl``.

    Returns:
        ``out_path``.
    """
    suffix = out_path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"cannot export to {out_path.name!r}; valid suffixes: {', '.join(EXPORT_SUFFIXES)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(out_path, index=False)
    else:
        frame.to_json(out_path, orient="records", lines=True, date_format="iso", date_unit="us")
    logger.info("exported %d rows to %s", len(frame), out_path)
    return out_path


def load(path: str | os.PathLike | None = None, **filters: Any) -> pd.DataFrame:
    """Load results from the store at ``path`` (default: :func:`default_path`), or straight from a
    folder of run folders (their records, :mod:`rftlib.results.journal`, gathered into a throw-away
    store first: e.g. a sweep's runs before or without gathering them into the SQLite file).

    Args:
        path: Database file, or a folder of runs (``rft_runs``) or one run's folder.
        **filters: ``column=value`` filters, as for :meth:`ResultsStore.load`.

    Returns:
        The tidy results frame.
    """
    if path is not None and Path(path).is_dir():
        import tempfile

        from .journal import gather

        with tempfile.TemporaryDirectory(prefix="rft-gather-") as tmp:
            store = ResultsStore(Path(tmp) / "results.db", writer=True)
            gather(path, store)
            return store.load(**filters)
    return ResultsStore(path).load(**filters)


def export(out_path: str | os.PathLike, path: str | os.PathLike | None = None, **filters: Any) -> Path:
    """Export results from the store at ``path`` to a ``.csv`` or ``.jsonl`` file.

    Args:
        out_path: Destination file.
        path: Database file (default: :func:`default_path`).
        **filters: ``column=value`` filters, as for :meth:`ResultsStore.load`.

    Returns:
        The written path.
    """
    return ResultsStore(path).export(out_path, **filters)
