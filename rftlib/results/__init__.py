"""Results: the SQLite store every run writes to, its schema, and the comparison of methods.

* :mod:`.store` -- :class:`ResultsStore`, :func:`load`, :func:`export`, where the store lives;
* :mod:`.schema` -- the tables, row kinds, schema version and the migration of older stores;
* :mod:`.compare` -- every method's headline ID/OOD numbers, knobs chosen on ID validation,
  seeds aggregated with confidence intervals (:func:`compare`).
"""

from .compare import Comparison, compare
from .schema import RESULT_COLUMNS, ROW_KINDS, RUN_COLUMNS, SCHEMA_VERSION
from .store import (
    ENV_VAR,
    LOADED_COLUMNS,
    RUNS_ENV_VAR,
    ResultsStore,
    default_path,
    export,
    knob_names,
    load,
    resolve_path,
    runs_dir,
)

__all__ = [
    "ENV_VAR", "LOADED_COLUMNS", "RESULT_COLUMNS", "ROW_KINDS", "RUNS_ENV_VAR", "RUN_COLUMNS", "SCHEMA_VERSION",
    "Comparison", "ResultsStore", "compare", "default_path", "export", "knob_names", "load", "resolve_path",
    "runs_dir",
]
