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

The ``results`` table is *tidy*: one row per metric value, with the things you group and filter by
(run, method, dataset, split, metric, epoch, seed) as real columns, the row's ``kind`` (``final``,
``epoch``, ``sweep`` or ``info``; :data:`~rftlib.results.schema.ROW_KINDS`) and its knobs (any
names, any number: ``{"alpha": 0.5}``) as canonical JSON that :meth:`ResultsStore.load` expands
into one column per knob. A plot is then one ``load(...)`` plus a pandas ``pivot``. Logging is
idempotent: a row is unique per (run, kind, split, metric, knobs, epoch, step), so a resumed or
re-run command replaces its rows instead of duplicating them. The ``runs`` table registers each
run once (``start_run``/``finish_run``) so that crashed runs can be told apart from finished ones,
so that ``log_metrics`` can fill in a run's method, dataset, model and config without the caller
repeating them, and so that a comparison knows each split's headline metric.

The schema is versioned (:mod:`rftlib.results.schema`); a store written by an older release is
migrated on its first write, and read through an in-memory migrated copy until then.

The file lives at ``results.db`` in the runs folder (:func:`runs_dir`: ``$RFT_RUNS_DIR``, else
``rft_runs/`` under the current directory) unless the ``RFT_RESULTS_DB`` environment variable or an
explicit ``path`` argument says otherwise (explicit > env var > default).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from .schema import RESULT_COLUMNS, RUN_COLUMNS, SCHEMA_VERSION, knobs_json, row_key, upgrade, version

logger = logging.getLogger(__name__)

T = TypeVar("T")
ENV_VAR = "RFT_RESULTS_DB"
RUNS_ENV_VAR = "RFT_RUNS_DIR"
DEFAULT_RUNS_DIR = Path("rft_runs")
BUSY_TIMEOUT_MS = 60_000
LOCK_RETRIES = 5
RUN_STATUSES = ("running", "done", "failed")
EXPORT_SUFFIXES = (".csv", ".jsonl")

# results columns a caller may set (id is assigned by SQLite; knobs_json and row_key are derived)
_WRITABLE_RESULT_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != "id")
_CALLER_COLUMNS = tuple(c for c in _WRITABLE_RESULT_COLUMNS if c not in ("knobs_json", "row_key"))
# run fields that log_metrics inherits from the runs table when the caller leaves them out
_INHERITED_FIELDS = ("method", "dataset", "model", "pretrained", "seed", "config_json")
_DATETIME_COLUMNS = ("created_at", "finished_at")
LOADED_COLUMNS: dict[str, str] = {
    **{k: v for k, v in RESULT_COLUMNS.items() if k != "row_key"}, "base_method": "TEXT", "splits_json": "TEXT"}
"""The columns :meth:`ResultsStore.load` returns before the knob columns: the results table's
(without the internal ``row_key``) plus the run's ``base_method`` and ``splits_json``."""


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


def _utc_now() -> str:
    """The current UTC time as ISO-8601 with microseconds, e.g. ``2024-05-01T12:00:00.123456+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _config_json(config: Any) -> str | None:
    """Serialise a config for the ``config_json`` column (strings are assumed to be JSON already).

    Args:
        config: A dict or dataclass (or any JSON-able value), a JSON string, or None.

    Returns:
        Canonical JSON (sorted keys, unknown objects via ``str``) or None.
    """
    if config is None or isinstance(config, str):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.dumps(config, sort_keys=True, default=str)


def _is_lock_error(error: sqlite3.OperationalError) -> bool:
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


def _empty_frame(columns: Mapping[str, str]) -> pd.DataFrame:
    """A zero-row frame with the given table columns, typed like a loaded one."""
    return _typed_frame(pd.DataFrame({name: pd.Series([], dtype=object) for name in columns}), columns)


def _typed_frame(frame: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Give loaded columns stable dtypes whatever the rows (or lack of them) contain.

    REAL columns become float64, INTEGER columns nullable ``Int64``, the timestamps tz-aware UTC
    datetimes (microsecond unit), and TEXT columns pandas' default ``str`` dtype (missing = NaN).

    Args:
        frame: The raw frame from SQLite.
        columns: The table's column declarations.

    Returns:
        A new frame with converted columns.
    """
    converted = {}
    for name, decl in columns.items():
        series = frame[name]
        if name in _DATETIME_COLUMNS:
            converted[name] = pd.to_datetime(series, utc=True, format="ISO8601").dt.as_unit("us")
        elif decl.startswith("REAL"):
            converted[name] = pd.to_numeric(series).astype("float64")
        elif decl.startswith("INTEGER"):
            converted[name] = pd.to_numeric(series).astype("Int64")
        else:
            converted[name] = series.astype("str")
    return pd.DataFrame(converted, index=frame.index)


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
            params.extend(_sql_value(v) for v in values)
        else:
            clauses.append(f"{name} = ?")
            params.append(_sql_value(value))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _sql_value(value: Any) -> Any:
    """Unwrap numpy/torch scalars (anything with ``.item()``) into plain python values for sqlite3."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield a connection inside ``BEGIN IMMEDIATE``; commit on success, roll back on error.

        ``IMMEDIATE`` takes the write lock up front, so two writers queue on ``busy_timeout``
        instead of deadlocking on a read-to-write lock upgrade. The schema is (re)created inside
        the transaction, which makes the first write to a fresh file race-free.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._open()
        try:
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

        return _with_lock_retries(attempt, what)

    def _read_connection(self) -> sqlite3.Connection:
        """A connection to read from: the file itself, or, for a store an older release wrote (not
        migrated until its first write), an in-memory copy migrated to this schema."""
        conn = self._open()
        if version(conn) in (0, SCHEMA_VERSION):
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
            return _empty_frame(declared)
        order = columns["id"] if "id" in columns else columns["created_at"]
        sql = f"SELECT {', '.join(columns.values())} FROM {source}{where} ORDER BY {order}"

        def attempt() -> list[tuple]:
            conn = self._read_connection()
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()

        try:
            records = _with_lock_retries(attempt, f"load {source}")
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            return _empty_frame(declared)
        frame = pd.DataFrame.from_records(records, columns=list(columns), coerce_float=False)
        return _typed_frame(frame.astype(object), declared)

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
        keeps its rows: they are replaced one by one as the run logs them again).

        Args:
            run_id: The run's id.
            method: Method name (``"zeroshot"``, ``"finetune"``, ``"wiseft"``, ...).
            dataset: Dataset name.
            model: Model architecture, e.g. ``"ViT-B-32"``.
            pretrained: Pre-trained weights tag, e.g. ``"openai"``.
            seed: Random seed.
            config: The full run configuration; stored as canonical JSON.
            base_method: The method of the run this one builds on (WiSE-FT over ``"flyp"``).
            splits: Each evaluated split's facts, ``{split: {"role", "metric", "use"}}``
                (:meth:`rftlib.data.base.RFTDataset.split_facts`).
        """
        row = {
            "run_id": run_id, "method": method, "base_method": base_method, "dataset": dataset, "model": model,
            "pretrained": pretrained, "seed": seed, "config_json": _config_json(config),
            "splits_json": _config_json(splits), "status": "running", "created_at": _utc_now(), "finished_at": None,
        }
        names = ", ".join(row)
        kept = ("run_id", "created_at")  # a restarted run keeps its first creation time
        updates = ", ".join(f"{name} = excluded.{name}" for name in row if name not in kept)
        sql = (
            f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(row))}) "
            f"ON CONFLICT(run_id) DO UPDATE SET {updates}"
        )
        params = [_sql_value(v) for v in row.values()]
        self._write(f"start_run {run_id}", lambda conn: conn.execute(sql, params))
        logger.debug("started run %s", run_id)

    def set_base_method(self, run_id: str, base_method: str | None) -> None:
        """Record the method of the run that ``run_id`` builds on (known once the base is chosen)."""
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
            f"finish_run {run_id}", lambda conn: conn.execute(sql, (status, _utc_now(), run_id)).rowcount
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

        Fields left as None (method, dataset, model, pretrained, seed, config) are inherited from
        the run's :meth:`start_run` registration when there is one.

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
            config: Extra configuration, stored as canonical JSON.

        Returns:
            The number of rows written (``len(metrics)``).
        """
        shared = {
            "run_id": run_id, "method": method, "dataset": dataset, "model": model, "pretrained": pretrained,
            "split": split, "role": role, "kind": kind, "knobs": knobs, "epoch": epoch, "step": step, "seed": seed,
            "config": config,
        }
        now = _utc_now()
        rows = [_prepare_row({**shared, "metric": name, "value": value}, now) for name, value in metrics.items()]

        def work(conn: sqlite3.Connection) -> int:
            inherited = self._run_fields(conn, run_id)
            for row in rows:
                for name in _INHERITED_FIELDS:
                    if row[name] is None:
                        row[name] = inherited.get(name)
            return _insert_results(conn, rows)

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
        NULL. No run-registry fill-in happens here.

        Returns:
            The number of rows written.

        Raises:
            ValueError: If a row has unknown keys, lacks ``run_id``/``metric``, or has a bad kind or knob.
        """
        now = _utc_now()
        prepared = [_prepare_row(row, now) for row in rows]
        if not prepared:
            return 0
        return self._write(f"log_rows ({len(prepared)} rows)", lambda conn: _insert_results(conn, prepared)) or 0

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
        """
        columns = {name: f"r.{name}" for name in LOADED_COLUMNS}
        columns.update(base_method="u.base_method", splits_json="u.splits_json")
        column_filters = {k: v for k, v in filters.items() if k in columns}
        frame = self._read("results r LEFT JOIN runs u ON u.run_id = r.run_id", columns, column_filters)
        return _filter_knobs(with_knob_columns(frame), {k: v for k, v in filters.items() if k not in columns})

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


def with_knob_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with one float column per knob name in its ``knobs_json`` (sorted by name)."""
    parsed = [json.loads(text) if isinstance(text, str) else {} for text in frame["knobs_json"]]
    names = sorted({name for knobs in parsed for name in knobs} - set(frame.columns))
    extra = {name: pd.Series([knobs.get(name, np.nan) for knobs in parsed], index=frame.index, dtype="float64")
             for name in names}
    return frame.assign(**extra) if extra else frame


def knob_names(frame: pd.DataFrame) -> list[str]:
    """The knob columns of a loaded results frame (the columns after the fixed ones)."""
    return [c for c in frame.columns if c not in LOADED_COLUMNS]


def _filter_knobs(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """Keep the rows whose knobs match ``filters`` (None: the row lacks that knob).

    Raises:
        ValueError: for a filter that is neither a column nor a knob with numeric values.
    """
    for name, wanted in filters.items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        if not all(v is None or isinstance(_sql_value(v), (int, float)) for v in values):
            raise ValueError(f"unknown filter column {name!r} (a knob filter needs numbers); valid columns: "
                             f"{', '.join(LOADED_COLUMNS)}, or any knob name")
        values = frame[name] if name in frame else pd.Series(np.nan, index=frame.index)
        if wanted is None:
            keep = values.isna()
        elif isinstance(wanted, (list, tuple, set, frozenset)):
            keep = values.isin([float(v) for v in wanted])
        else:
            keep = values == float(wanted)
        frame = frame[keep.to_numpy()]
    return frame


def _prepare_row(row: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Validate one caller row and complete it with defaults, its canonical knobs and its key.

    Args:
        row: A caller-supplied row (``knobs`` and ``config`` as dicts).
        now: The timestamp to use when the row has no ``created_at``.

    Returns:
        A dict with every writable results column.
    """
    data = dict(row)
    if "config" in data:
        if data.get("config_json") is not None:
            raise ValueError("give either 'config' or 'config_json', not both")
        data["config_json"] = data.pop("config")
    knobs = knobs_json(data.pop("knobs", None))
    unknown = sorted(set(data) - set(_CALLER_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; valid columns: {', '.join(_CALLER_COLUMNS)}, knobs")
    missing = [name for name in ("run_id", "metric") if data.get(name) is None]
    if missing:
        raise ValueError(f"row is missing required column(s) {missing}: {row!r}")
    data["kind"] = data.get("kind") or "final"
    data["config_json"] = _config_json(data.get("config_json"))
    data.setdefault("created_at", now)
    data["knobs_json"] = knobs
    data["row_key"] = row_key(data["kind"], data.get("split"), data["metric"], knobs, data.get("epoch"),
                              data.get("step"))
    return {name: data.get(name) for name in _WRITABLE_RESULT_COLUMNS}


def _insert_results(conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write complete result rows through ``conn`` (inside the caller's transaction); a row with the
    key of an existing row of its run replaces it.

    Returns:
        The number of rows written.
    """
    names = _WRITABLE_RESULT_COLUMNS
    sql = f"INSERT OR REPLACE INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    conn.executemany(sql, [_row_values(row) for row in rows])
    return len(rows)


def _row_values(row: Mapping[str, Any]) -> list[Any]:
    """The SQL parameters of one result row, in column order, with ``value`` coerced to float."""
    values = {name: _sql_value(row.get(name)) for name in _WRITABLE_RESULT_COLUMNS}
    if values["value"] is not None:
        values["value"] = float(values["value"])
    return list(values.values())


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
    """Load results from the store at ``path`` (default: :func:`default_path`).

    Args:
        path: Database file.
        **filters: ``column=value`` filters, as for :meth:`ResultsStore.load`.

    Returns:
        The tidy results frame.
    """
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
