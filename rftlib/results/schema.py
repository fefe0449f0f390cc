"""The results store's tables, their version, and the migration from older stores.

Version 2 (this one) keeps the store *open*: a method's knobs (WiSE-FT's ``alpha``, DRM's
``beta``, any future one) are not columns but one canonical JSON object per row
(``knobs_json``), so a new knob needs no schema change; each row has a ``kind`` saying what it is
(:data:`ROW_KINDS`), and a ``row_key`` that makes logging idempotent: writing the same result of
the same run twice (a resumed or re-run command) replaces the row instead of duplicating it.
Runs are content-addressed (:mod:`rftlib.runs`), so a re-run computes the same rows.

A run's configuration is stored once, in ``runs.config_json``; a result row carries its own
``config_json`` only when it differs from its run's (or the run is not registered), and loading
joins the two.

Version 1 (the first release, ``PRAGMA user_version = 0``) had four fixed knob columns and no
kinds, and repeated the run's config on every row. :func:`migrate` rewrites such a store in one
transaction without dropping a row; the kind of each old row is inferred (see :func:`legacy_kind`).

Which files are stores (:func:`version`): a file with no tables (a new or 0-byte file), or one with
a ``results`` table holding the columns :data:`STORE_MARKER_COLUMNS`. Anything else (another
application's SQLite database) is refused with :class:`SchemaError`, before anything is written,
and so is a store whose ``user_version`` is newer than :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import json
import math
import numbers
import sqlite3
from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 2
ROW_KINDS = ("final", "epoch", "sweep", "info")
"""``final``: the run's headline result (its selected model, at its reported knob values);
``epoch``: a per-epoch evaluation during training; ``sweep``: one point of a post-hoc knob sweep
(e.g. every WiSE-FT alpha); ``info``: other facts of the run (e.g. DPS's mask statistics)."""

RESULT_COLUMNS: dict[str, str] = {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "run_id": "TEXT NOT NULL",
    "method": "TEXT",
    "dataset": "TEXT",
    "model": "TEXT",
    "pretrained": "TEXT",
    "split": "TEXT",
    "role": "TEXT",
    "kind": "TEXT NOT NULL",
    "knobs_json": "TEXT NOT NULL",
    "metric": "TEXT NOT NULL",
    "value": "REAL",
    "epoch": "INTEGER",
    "step": "INTEGER",
    "seed": "INTEGER",
    "config_json": "TEXT",
    "created_at": "TEXT",
    "row_key": "TEXT NOT NULL",
}
"""Columns of the ``results`` table and their SQLite declarations."""

RUN_COLUMNS: dict[str, str] = {
    "run_id": "TEXT PRIMARY KEY",
    "method": "TEXT",
    "base_method": "TEXT",
    "dataset": "TEXT",
    "model": "TEXT",
    "pretrained": "TEXT",
    "seed": "INTEGER",
    "config_json": "TEXT",
    "splits_json": "TEXT",
    "status": "TEXT",
    "created_at": "TEXT",
    "finished_at": "TEXT",
}
"""Columns of the ``runs`` table. ``base_method`` names the run a post-hoc method was applied to
(WiSE-FT over ``flyp``); ``splits_json`` maps each evaluated split to its role, headline metric and
use (``{"test": {"role": "ood", "metric": "macro_f1", "use": "test"}}``), so a comparison reads
each dataset's headline numbers without loading the dataset."""

LEGACY_KNOBS = ("alpha", "mask_ratio", "beta", "scale")
"""The fixed knob columns of version 1."""

STORE_MARKER_COLUMNS = ("run_id", "metric", "value")
"""The columns a ``results`` table must have for the file to be taken as a results store (any version)."""


class SchemaError(ValueError):
    """The file is not a results store this rftlib can use: another application's database, or a
    store from a newer rftlib. The store layer adds the file's path and what to do."""


def create_statements() -> tuple[str, ...]:
    """The ``CREATE ... IF NOT EXISTS`` statements; idempotent, so racing processes may both run them."""
    results_cols = ",\n  ".join(f"{name} {decl}" for name, decl in RESULT_COLUMNS.items())
    run_cols = ",\n  ".join(f"{name} {decl}" for name, decl in RUN_COLUMNS.items())
    return (
        f"CREATE TABLE IF NOT EXISTS results (\n  {results_cols}\n)",
        "CREATE UNIQUE INDEX IF NOT EXISTS idx_results_run_key ON results (run_id, row_key)",
        "CREATE INDEX IF NOT EXISTS idx_results_method_dataset ON results (method, dataset)",
        f"CREATE TABLE IF NOT EXISTS runs (\n  {run_cols}\n)",
    )


def knobs_json(knobs: Mapping[str, Any] | None) -> str:
    """Canonical JSON of a row's knobs: sorted names, finite float values (``{}`` for none).

    Raises:
        ValueError: naming a knob whose value is not a finite real number.
    """
    clean = {}
    for name, value in (knobs or {}).items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"knob {name}={value!r} must be a finite number")
        clean[str(name)] = float(value)
    return json.dumps(clean, sort_keys=True)


def typed_value(column: str, declaration: str, value: Any) -> Any:
    """``value`` as the plain python type its column declares, or an error naming the column.

    TEXT columns take strings, INTEGER columns integers (not bools, not floats, however round),
    REAL columns real numbers (not bools; NaN and infinities are legitimate metric values, e.g. a
    macro-F1 over no samples); every column takes None. Numpy and torch scalars are unwrapped.

    Raises:
        ValueError: ``column 'epoch' must be an integer or None, got 'two' (str)``.
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError, RuntimeError):
            pass  # a non-scalar array or tensor: refused below, by its type
    if value is None:
        return None
    kind = declaration.split()[0]
    if kind == "TEXT" and isinstance(value, str):
        return str(value)
    if kind == "INTEGER" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind == "REAL" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    wanted = {"TEXT": "a string", "INTEGER": "an integer", "REAL": "a real number"}[kind]
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"column {column!r} must be {wanted} or None, got {shown} ({type(value).__name__})")


def row_key(kind: str, split: str | None, metric: str, knobs: str, epoch: Any, step: Any) -> str:
    """What makes a row unique within its run: its kind, split, metric, knobs, epoch and step."""
    if kind not in ROW_KINDS:
        raise ValueError(f"unknown row kind {kind!r}; valid kinds: {', '.join(ROW_KINDS)}")
    return f"{kind}|{split}|{metric}|{knobs}|{epoch}|{step}"


def version(conn: sqlite3.Connection) -> int:
    """The store's schema version: 2 for this one, 1 for a first-release store, 0 for a file with no
    tables yet (new or 0 bytes). Reads only.

    Raises:
        SchemaError: for a file that is not a results store (tables, but no ``results`` table with
            the columns :data:`STORE_MARKER_COLUMNS`), or a store newer than this rftlib.
    """
    declared = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = sorted(name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))
    if not tables:
        return 0
    if declared > SCHEMA_VERSION:
        raise SchemaError(f"has schema version {declared}, newer than this rftlib's {SCHEMA_VERSION}; "
                          "upgrade rftlib to read or write it")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    if not set(STORE_MARKER_COLUMNS) <= columns:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise SchemaError(f"is not an rftlib results store (another application's database? its tables: {shown}; "
                          f"no 'results' table with the columns {', '.join(STORE_MARKER_COLUMNS)}); "
                          "nothing was written to it")
    return declared or 1


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring the store behind ``conn`` (inside the caller's write transaction) to this version.

    Raises:
        SchemaError: see :func:`version`; nothing is changed then.
    """
    found = version(conn)
    if found == 1:
        migrate(conn)
    for statement in create_statements():
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def migrate(conn: sqlite3.Connection) -> int:
    """Rewrite a version-1 store as version 2, keeping every row; returns the number of rows moved.

    Each old row keeps its id, values and timestamps; its knob columns become ``knobs_json``, its
    kind is inferred by :func:`legacy_kind`, and its ``row_key`` is ``legacy:<id>`` so no two old
    rows can collide. Runs gain ``base_method`` (from the config's ``base_method`` when the run
    trained one) and an empty ``splits_json`` (comparisons then fall back to naming rules). The
    config each row repeated is stored once, on its run (:func:`store_configs_once`).
    """
    old = [dict(zip([c[0] for c in cursor.description], row)) for cursor in [conn.execute(
        "SELECT * FROM results ORDER BY id")] for row in cursor.fetchall()]
    conn.execute("ALTER TABLE results RENAME TO results_v1")
    conn.execute("DROP INDEX IF EXISTS idx_results_run_id")
    conn.execute("DROP INDEX IF EXISTS idx_results_method_dataset")
    for statement in create_statements()[:3]:
        conn.execute(statement)
    kinds = legacy_kinds(old)
    names = [c for c in RESULT_COLUMNS]
    rows = []
    for row in old:
        knobs = knobs_json({k: row[k] for k in LEGACY_KNOBS if row.get(k) is not None})
        rows.append({**{c: row.get(c) for c in names}, "kind": kinds[row["id"]], "knobs_json": knobs,
                     "row_key": f"legacy:{row['id']}"})
    conn.executemany(f"INSERT INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                     [[r[c] for c in names] for r in rows])
    conn.execute("DROP TABLE results_v1")
    _migrate_runs(conn)
    store_configs_once(conn)
    return len(rows)


def _migrate_runs(conn: sqlite3.Connection) -> None:
    """Add the version-2 run columns and fill ``base_method`` from the stored configs."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    if not have:
        return
    for name in ("base_method", "splits_json"):
        if name not in have:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} TEXT")
    for run_id, config in conn.execute("SELECT run_id, config_json FROM runs").fetchall():
        base = _config_base_method(config)
        if base is not None:
            conn.execute("UPDATE runs SET base_method = ? WHERE run_id = ?", (base, run_id))


def store_configs_once(conn: sqlite3.Connection) -> None:
    """Keep each run's config once, in ``runs``, instead of on every result row.

    A registered run without a config takes the config of its oldest row that has one; then every
    row whose config equals its run's drops its copy (loading joins it back). A row whose config
    differs from its run's keeps it, and so do the rows of unregistered runs: nothing is lost.
    """
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone():
        return
    conn.execute("UPDATE runs SET config_json = (SELECT r.config_json FROM results r WHERE r.run_id = runs.run_id "
                 "AND r.config_json IS NOT NULL ORDER BY r.id LIMIT 1) WHERE config_json IS NULL")
    conn.execute("UPDATE results SET config_json = NULL WHERE config_json = "
                 "(SELECT u.config_json FROM runs u WHERE u.run_id = results.run_id)")


def _config_base_method(config: str | None) -> str | None:
    """A first-release WiSE-FT config's base method (None when it merged a given checkpoint)."""
    try:
        parsed = json.loads(config) if config else {}
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("finetuned") is not None:
        return None
    base = parsed.get("base_method")
    return base if isinstance(base, str) else None


def legacy_kinds(rows: list[dict]) -> dict[int, str]:
    """Infer each version-1 row's kind (row id -> kind); see :func:`legacy_kind` for the rule."""
    last: dict[tuple, int] = {}
    settings: dict[str, set] = {}
    for row in rows:
        knobs = tuple(row.get(k) for k in LEGACY_KNOBS)
        last[(row["run_id"], row["split"], row["metric"], knobs)] = row["id"]
        if row.get("role") in ("id", "ood"):
            settings.setdefault(row["run_id"], set()).add(knobs)
    return {row["id"]: legacy_kind(row, last, settings) for row in rows}


def legacy_kind(row: dict, last: Mapping[tuple, int], settings: Mapping[str, set]) -> str:
    """The kind of one version-1 row.

    * a DPS mask-statistics row (``role == "mask"``) is ``info``;
    * a row followed later in its run by a row for the same split, metric and knob values was a
      per-epoch evaluation (``epoch``): the first release logged each epoch, then the final model;
    * of the remaining rows, those of a run that evaluated several knob values are ``sweep``
      points, the others ``final``.
    """
    if row.get("role") == "mask":
        return "info"
    knobs = tuple(row.get(k) for k in LEGACY_KNOBS)
    if last[(row["run_id"], row["split"], row["metric"], knobs)] != row["id"]:
        return "epoch"
    return "sweep" if len(settings.get(row["run_id"], ())) > 1 else "final"
