"""Rows of the results store: what a caller may write, how it is checked, and how rows come back.

Every value a caller gives is checked against its column's declared type before a transaction
starts (:func:`rftlib.results.schema.typed_value`), so one bad value writes nothing and can never
poison later reads; loaded columns get stable dtypes whatever the rows hold; knobs, stored as one
JSON object per row, come back as one float column per knob name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from .schema import RESULT_COLUMNS, RUN_COLUMNS, knobs_json, row_key, typed_value

# results columns a caller may set (id is assigned by SQLite; knobs_json and row_key are derived)
WRITABLE_RESULT_COLUMNS = tuple(c for c in RESULT_COLUMNS if c != "id")
CALLER_COLUMNS = tuple(c for c in WRITABLE_RESULT_COLUMNS if c not in ("knobs_json", "row_key"))
_DATETIME_COLUMNS = ("created_at", "finished_at")
LOADED_COLUMNS: dict[str, str] = {
    **{k: v for k, v in RESULT_COLUMNS.items() if k != "row_key"}, "base_method": "TEXT", "splits_json": "TEXT",
    "status": "TEXT"}
"""The columns :meth:`ResultsStore.load` returns before the knob columns: the results table's
(without the internal ``row_key``; ``config_json`` is the row's own or else its run's) plus the
run's ``base_method``, ``splits_json`` and ``status`` (missing for a row without a registered run)."""


def utc_now() -> str:
    """The current UTC time as ISO-8601 with microseconds, e.g. ``2024-05-01T12:00:00.123456+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def config_json(config: Any) -> str | None:
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


def empty_frame(columns: Mapping[str, str]) -> pd.DataFrame:
    """A zero-row frame with the given table columns, typed like a loaded one."""
    return typed_frame(pd.DataFrame({name: pd.Series([], dtype=object) for name in columns}), columns)


def typed_frame(frame: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Give loaded columns stable dtypes whatever the rows (or lack of them) contain.

    REAL columns become float64, INTEGER columns nullable ``Int64``, the timestamps tz-aware UTC
    datetimes (microsecond unit), and TEXT columns pandas' default ``str`` dtype (missing = NaN).

    Args:
        frame: The raw frame from SQLite.
        columns: The table's column declarations.

    Returns:
        A new frame with converted columns.

    Raises:
        ValueError: naming a column whose values (written outside this API) do not convert, and
            the ids of those rows.
    """
    converted = {}
    for name, decl in columns.items():
        try:
            converted[name] = _typed_column(name, decl, frame[name])
        except (ValueError, TypeError) as error:
            key = "id" if "id" in frame else "run_id"
            bad = [row_id for row_id, value in zip(frame[key], frame[name], strict=True)
                   if not _converts(name, decl, value)]
            raise ValueError(f"column {name!r} holds values that are not of its type {decl.split()[0]} "
                             f"(rows with {key} {bad[:10]}; {error}); they were written outside rftlib's API: "
                             f"fix or delete those rows") from error
    return pd.DataFrame(converted, index=frame.index)


def _typed_column(name: str, decl: str, series: pd.Series) -> pd.Series:
    """One loaded column converted to its stable dtype (see :func:`typed_frame`)."""
    if name in _DATETIME_COLUMNS:
        return pd.to_datetime(series, utc=True, format="ISO8601").dt.as_unit("us")
    if decl.startswith("REAL"):
        return pd.to_numeric(series).astype("float64")
    if decl.startswith("INTEGER"):
        return pd.to_numeric(series).astype("Int64")
    return series.astype("str")


def _converts(name: str, decl: str, value: Any) -> bool:
    """Whether one stored value converts to its column's dtype (to name the rows that do not)."""
    try:
        _typed_column(name, decl, pd.Series([value], dtype=object))
    except (ValueError, TypeError):
        return False
    return True


def _timestamp(value: Any) -> str:
    """A caller's ``created_at`` (an ISO-8601 string or a datetime; naive means UTC) as the UTC
    ISO-8601 text the store keeps.

    Raises:
        ValueError: naming the column, for anything else.
    """
    if isinstance(value, (str, datetime)):
        try:
            stamp = pd.to_datetime(value, utc=True, format="ISO8601")
        except (ValueError, TypeError):
            stamp = None
        if isinstance(stamp, pd.Timestamp):
            return stamp.isoformat(timespec="microseconds")
    raise ValueError(f"column 'created_at' must be an ISO-8601 timestamp (a string or a datetime), got {value!r}")


def sql_value(value: Any) -> Any:
    """Unwrap numpy/torch scalars (anything with ``.item()``) into plain python values for sqlite3."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


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


def filter_knobs(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """Keep the rows whose knobs match ``filters`` (None: the row lacks that knob).

    Raises:
        ValueError: for a filter that is neither a column nor a knob with numeric values.
    """
    for name, wanted in filters.items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        if not all(v is None or isinstance(sql_value(v), (int, float)) for v in values):
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


def prepare_row(row: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Validate one caller row and complete it with defaults, its canonical knobs and its key.

    Args:
        row: A caller-supplied row (``knobs`` and ``config`` as dicts).
        now: The timestamp to use when the row has no ``created_at``.

    Returns:
        A dict with every writable results column, each value of its column's type.

    Raises:
        ValueError: naming the row's metric and run, for unknown or missing columns, a bad kind or
            knob, or a value of the wrong type for its column.
    """
    try:
        return _checked_row(row, now)
    except ValueError as error:
        metric, run_id = row.get("metric"), row.get("run_id")
        raise ValueError(f"{error} (in the row of metric {metric!r}, run {run_id!r}); nothing was written") from None


def _checked_row(row: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The body of :func:`prepare_row`, raising without the row's context."""
    data = dict(row)
    if "config" in data:
        if data.get("config_json") is not None:
            raise ValueError("give either 'config' or 'config_json', not both")
        data["config_json"] = data.pop("config")
    knobs = knobs_json(data.pop("knobs", None))
    unknown = sorted(set(data) - set(CALLER_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; valid columns: {', '.join(CALLER_COLUMNS)}, knobs")
    for name in CALLER_COLUMNS:
        if name not in ("config_json", "created_at"):
            data[name] = typed_value(name, RESULT_COLUMNS[name], data.get(name))
    missing = [name for name in ("run_id", "metric") if not data.get(name)]
    if missing:
        raise ValueError(f"row is missing required column(s) {missing}")
    data["kind"] = data.get("kind") or "final"
    data["config_json"] = config_json(data.get("config_json"))
    data["created_at"] = now if data.get("created_at") is None else _timestamp(data["created_at"])
    data["knobs_json"] = knobs
    data["row_key"] = row_key(data["kind"], data.get("split"), data["metric"], knobs, data.get("epoch"),
                              data.get("step"))
    return {name: data.get(name) for name in WRITABLE_RESULT_COLUMNS}


def checked_run(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``runs`` row with every value of its column's type (``run_id``, ``method`` and ``dataset``
    required).

    Raises:
        ValueError: naming the run and the column.
    """
    try:
        checked = {name: typed_value(name, RUN_COLUMNS[name], value) for name, value in row.items()}
        missing = [name for name in ("run_id", "method", "dataset") if not checked.get(name)]
        if missing:
            raise ValueError(f"missing required field(s) {missing}")
    except ValueError as error:
        raise ValueError(f"{error} (registering run {row.get('run_id')!r}); nothing was written") from None
    return checked


def row_values(row: Mapping[str, Any]) -> list[Any]:
    """The SQL parameters of one (checked) result row, in column order."""
    return [row.get(name) for name in WRITABLE_RESULT_COLUMNS]
