"""Results: the SQLite store every run writes to, its schema, and the comparison of methods.

* :mod:`.store` -- :class:`ResultsStore`, :func:`load`, :func:`export`, where the store lives, and
  :class:`StoreError` (a file that is not a usable store: it names the file and the fix);
* :mod:`.schema` -- the tables, row kinds, schema version and the migration of older stores;
* :mod:`.rows` -- what a caller may write, how each value is checked, how rows come back;
* :mod:`.compare` -- every method's headline ID/OOD numbers, knobs chosen on ID validation,
  seeds aggregated with confidence intervals (:func:`compare`).
"""

from .compare import Comparison, compare
from .rows import LOADED_COLUMNS, knob_names
from .schema import RESULT_COLUMNS, ROW_KINDS, RUN_COLUMNS, SCHEMA_VERSION
from .store import (
    ENV_VAR,
    RUNS_ENV_VAR,
    ResultsStore,
    StoreError,
    default_path,
    export,
    load,
    resolve_path,
    runs_dir,
)

__all__ = [
    "ENV_VAR", "LOADED_COLUMNS", "RESULT_COLUMNS", "ROW_KINDS", "RUNS_ENV_VAR", "RUN_COLUMNS", "SCHEMA_VERSION",
    "Comparison", "ResultsStore", "StoreError", "compare", "default_path", "export", "knob_names", "load",
    "resolve_path", "runs_dir",
]
