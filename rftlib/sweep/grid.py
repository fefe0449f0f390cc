"""A sweep's grid: methods x datasets x seeds x override lists, expanded into named runs.

A grid comes from the command line or from a small TOML (or JSON) file::

    methods = ["finetune", "flyp", "wiseft"]
    datasets = ["iwildcam"]
    seeds = [0, 1, 2]
    model = "ViT-B-16"
    pretrained = "openai"

    [set]              # overrides every run gets (those a method's config lacks are skipped for it)
    epochs = 20

    [grid]             # overrides to cross: one run per combination
    lr = [1e-5, 3e-5]

    [data_options]     # the dataset loader's options (``--data-option``)
    download = false

Each grid point is a :class:`SweepRun` whose run id is the one :func:`rftlib.methods.run_method`
will give it (the content-addressed id of :mod:`rftlib.runs`), so its folder is known before it
starts and a finished one is recognised without running anything.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import applicable_overrides, get_method, plan_identity

TABLES = Path(__file__).resolve().parent / "tables"
"""Shipped sweep files: a paper table's grid each (``--file iwildcam-vitb16``)."""
FIELDS = ("methods", "datasets", "seeds", "set", "grid", "data_options", "model", "pretrained", "data_root")
MAPPINGS = ("set", "grid", "data_options")  # a file's tables, which given values extend rather than replace


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: what :func:`rftlib.methods.run_method` is called with, and its run id."""

    method: str
    dataset: str
    seed: int
    overrides: Mapping[str, Any]
    dataset_options: Mapping[str, Any]
    model: str
    pretrained: str | None
    data_root: str | None
    run_id: str

    def label(self) -> str:
        """``method dataset seed=0 lr=1e-05``: how the sweep's listing names the run."""
        knobs = " ".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.method} {self.dataset} seed={self.seed}" + (f" {knobs}" if knobs else "")

    def cli_args(self) -> list[str]:
        """The ``python -m rftlib.train`` arguments of this run (values as JSON, read back exactly)."""
        args = ["--method", self.method, "--dataset", self.dataset, "--seed", str(self.seed),
                "--model", self.model, "--pretrained", self.pretrained or "none"]
        if self.data_root is not None:
            args += ["--data-root", self.data_root]
        if self.overrides:
            args += ["--set", *(f"{k}={json.dumps(v)}" for k, v in self.overrides.items())]
        if self.dataset_options:
            args += ["--data-option", *(f"{k}={json.dumps(v)}" for k, v in self.dataset_options.items())]
        return args


@dataclass
class SweepSpec:
    """The grid (see the module docstring); :meth:`expand` lists its runs.

    Args:
        methods, datasets, seeds: crossed with each other and with ``grid``.
        set: overrides for every run (skipped for a method whose config has no such field).
        grid: override name -> list of values, crossed.
        data_options: the dataset loader's options.
        model, pretrained, data_root: as for ``python -m rftlib.train``.
    """

    methods: Sequence[str]
    datasets: Sequence[str] = ("synthwild",)
    seeds: Sequence[int] = (0,)
    set: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    data_options: Mapping[str, Any] = field(default_factory=dict)
    model: str = "synthclip"
    pretrained: str | None = "synthclip"
    data_root: str | None = None

    def __post_init__(self):
        if not self.methods:
            raise ValueError("a sweep needs at least one method (--methods NAME ...)")
        for method in self.methods:
            get_method(method)  # an unknown name lists the valid ones
        for name, values in self.grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"grid {name!r} must be a non-empty list of values, got {values!r}")
        if self.pretrained is not None and self.pretrained.lower() == "none":
            self.pretrained = None

    @classmethod
    def from_file(cls, path: str | Path, **replace: Any) -> SweepSpec:
        """Read a TOML (``.toml``) or JSON file, or a shipped table by name (:func:`list_tables`);
        keyword arguments that are not None replace its fields (``set``, ``grid``, ``data_options``:
        extend them)."""
        path = Path(path)
        if not path.is_file() and (TABLES / f"{path.name}.toml").is_file():
            path = TABLES / f"{path.name}.toml"
        if not path.is_file():
            raise FileNotFoundError(f"sweep file {path} does not exist (shipped tables: {', '.join(list_tables())})")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
        for key, value in replace.items():
            if value is not None:
                data[key] = {**data.get(key, {}), **value} if key in MAPPINGS else value
        return cls(**data)

    def expand(self) -> list[SweepRun]:
        """Every run of the grid, in order (method, dataset, seed, then the grid's combinations).

        Raises:
            ValueError / UnknownNameError: an override that no method of the sweep has, or a value
                a method's config refuses (named, before anything runs).
        """
        names = list(self.grid)
        combos = [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]
        runs, used = [], set()
        for method, dataset, seed, combo in itertools.product(self.methods, self.datasets, self.seeds, combos):
            overrides = applicable_overrides(method, dataset, {**self.set, **combo})
            used |= set(overrides)
            identity = plan_identity(method, dataset, model=self.model, pretrained=self.pretrained, seed=int(seed),
                                     overrides=overrides, dataset_options=self.data_options)
            runs.append(SweepRun(method, dataset.lower(), int(seed), overrides, dict(self.data_options), self.model,
                                 self.pretrained, self.data_root, identity.run_id()))
        unused = sorted((set(self.set) | set(names)) - used)
        if unused:
            raise ValueError(f"no method of the sweep ({', '.join(self.methods)}) has the setting(s) "
                             f"{', '.join(unused)}; see rftlib.methods.get_config(method) for each method's fields")
        unique = {run.run_id: run for run in reversed(runs)}  # a point that collapses onto another runs once
        return [run for run in runs if unique.get(run.run_id) is run]


def list_tables() -> list[str]:
    """The names of the shipped sweep files (a paper table's grid each)."""
    return sorted(p.stem for p in TABLES.glob("*.toml"))
