"""The open results schema: migration of a first-release store, row kinds, generic knobs,
idempotent logging, and the comparison rules (knobs chosen on ID validation, seeds with a
confidence interval, one entry per backbone and base method)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rftlib import results
from rftlib.results import ResultsStore, StoreError, compare
from rftlib.results.compare import half_width
from rftlib.results.schema import SCHEMA_VERSION

FIXTURE = Path(__file__).parent / "data" / "results_v1.db"
SPLITS = {"id_val": {"role": "id", "metric": "macro_f1", "use": "val"},
          "id_test": {"role": "id", "metric": "macro_f1", "use": "test"},
          "test": {"role": "ood", "metric": "macro_f1", "use": "test"}}


def _v1_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, run_id, split, metric, value, alpha, mask_ratio, beta, scale, epoch "
                            "FROM results ORDER BY id").fetchall()


@pytest.fixture
def v1_store(tmp_path) -> Path:
    path = tmp_path / "results.db"
    shutil.copy(FIXTURE, path)
    return path


def test_a_first_release_store_is_read_without_being_changed(v1_store):
    before = hashlib.sha256(v1_store.read_bytes()).hexdigest()
    frame = results.load(v1_store)
    assert len(frame) == len(_v1_rows(v1_store)) == 382
    assert hashlib.sha256(v1_store.read_bytes()).hexdigest() == before  # reading migrates a copy in memory
    assert set(frame["method"]) == {"zeroshot", "finetune", "wiseft", "drm", "dps", "radapter"}


def test_migration_keeps_every_row_and_infers_kinds(v1_store):
    old = _v1_rows(v1_store)
    ResultsStore(v1_store).log_metrics("new-run", {"accuracy": 1.0}, split="test")  # the first write migrates
    with sqlite3.connect(v1_store) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    frame = results.load(v1_store)
    migrated = frame[frame.run_id != "new-run"].set_index("id")
    assert len(migrated) == len(old)
    for row_id, run_id, split, metric, value, alpha, ratio, beta, scale, epoch in old:
        row = migrated.loc[row_id]
        assert (row.run_id, row.split, row.metric, row.value) == (run_id, split, metric, value)
        knobs = {k: v for k, v in zip(("alpha", "mask_ratio", "beta", "scale"), (alpha, ratio, beta, scale),
                                      strict=True) if v is not None}
        assert json.loads(row.knobs_json) == knobs
        assert (pd.isna(row.epoch) and epoch is None) or row.epoch == epoch
    kinds = migrated.groupby("method")["kind"].agg(set).to_dict()
    assert kinds["zeroshot"] == {"final"}
    assert kinds["finetune"] == {"epoch", "final"}  # each epoch's evaluation, then the final model
    assert kinds["wiseft"] == {"sweep"} and kinds["drm"] == {"epoch", "sweep"}
    assert "info" in kinds["dps"]  # the mask statistics
    runs = ResultsStore(v1_store).runs()
    assert set(runs.loc[runs.method == "wiseft", "base_method"]) == {"finetune"}


def test_the_comparison_of_a_first_release_store_shows_every_method(v1_store):
    table = compare(results.load(v1_store)).table
    assert set(table["method"]) == {"zeroshot", "finetune", "wiseft (finetune)", "drm", "dps", "radapter"}
    assert (table["n_seeds"] == 2).all()
    chosen = table.set_index("method")
    assert chosen.loc["drm", "selected_on"] == "id_val" and chosen.loc["drm", "knobs"].startswith("beta=")
    assert chosen.loc["zeroshot", "selected_on"] == "reported"


def test_a_store_from_a_newer_rftlib_is_refused(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.execute("CREATE TABLE results (id INTEGER)")
    before = path.read_bytes()
    for action in (lambda s: s.log_metrics("r", {"m": 1.0}, split="test"), lambda s: s.load()):
        with pytest.raises(StoreError, match=r"future\.db has schema version 3, newer than this rftlib"):
            action(ResultsStore(path))
    assert path.read_bytes() == before  # not even its journal mode was changed


def test_logging_is_idempotent_and_knobs_are_open(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    for _ in range(3):  # a resumed or re-run command logs the same rows again
        store.log_metrics("r", {"acc": 0.5}, split="test", kind="sweep", knobs={"temperature": 2.0, "alpha": 0.5})
        store.log_metrics("r", {"acc": 0.6}, split="test", kind="epoch", epoch=1)
    frame = store.load()
    assert len(frame) == 2
    assert frame.loc[frame.kind == "sweep", "temperature"].item() == 2.0  # a new knob needs no schema change
    store.log_metrics("r", {"acc": 0.7}, split="test", kind="epoch", epoch=2)
    assert len(store.load()) == 3
    for bad in ({"alpha": float("nan")}, {"alpha": "high"}, {"alpha": True}):
        with pytest.raises(ValueError, match="knob alpha"):
            store.log_metrics("r", {"acc": 0.1}, split="test", knobs=bad)
    with pytest.raises(ValueError, match="unknown row kind"):
        store.log_metrics("r", {"acc": 0.1}, split="test", kind="headline")
    assert len(store.load()) == 3


def _log(store: ResultsStore, run: str, method: str, seed: int, values: dict, *, kind="final", knobs=None,
         model="ViT-B-16", base=None, splits=SPLITS, status="done"):
    if run not in set(store.runs()["run_id"]):
        store.start_run(run, method=method, dataset="d", model=model, pretrained="openai", seed=seed,
                        base_method=base, splits=splits)
    for split, value in values.items():
        store.log_metrics(run, {"macro_f1": value, "accuracy": 1 - value}, split=split,
                          role=SPLITS[split]["role"], kind=kind, knobs=knobs)
    if status != "running":
        store.finish_run(run, status=status)


def test_knobs_are_chosen_on_id_validation_never_on_test(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    for seed in (0, 1):
        run = f"wise-{seed}"
        # alpha 0.3 is best on ID val; alpha 0.9 would be best on the OOD and ID test splits
        for alpha, (val, idt, ood) in {0.3: (0.80, 0.60, 0.50), 0.9: (0.70, 0.90, 0.90)}.items():
            _log(store, run, "wiseft", seed, {"id_val": val, "id_test": idt + seed / 100, "test": ood},
                 kind="sweep", knobs={"alpha": alpha}, base="flyp")
        _log(store, run, "wiseft", seed, {"id_val": 0.7, "id_test": 0.9, "test": 0.9}, kind="final",
             knobs={"alpha": 0.9})
    row = compare(store.load()).table.set_index("method").loc["wiseft (flyp)"]
    assert row["knobs"] == "alpha=0.3" and row["selected_on"] == "id_val"
    assert row["id_mean"] == pytest.approx(0.605) and row["ood_mean"] == pytest.approx(0.5)
    assert row["id_ci"] == pytest.approx(half_width(pd.Series([0.60, 0.61])))


def test_entries_per_backbone_and_base_method_and_the_interval_over_seeds(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    for seed, value in enumerate((0.5, 0.6, 0.7)):
        _log(store, f"ft-b16-{seed}", "finetune", seed, {"id_val": value, "id_test": value, "test": value})
        _log(store, f"ft-b32-{seed}", "finetune", seed, {"id_val": 0.1, "id_test": 0.1, "test": 0.1},
             model="ViT-B-32")
    for base in ("flyp", "finetune"):
        _log(store, f"wise-{base}", "wiseft", 0, {"id_val": 0.4, "id_test": 0.4, "test": 0.4}, base=base,
             knobs={"alpha": 0.5})
    table = compare(store.load()).table
    b16 = table[(table.model == "ViT-B-16") & (table.method == "finetune")].iloc[0]
    assert b16["n_seeds"] == 3 and b16["id_mean"] == pytest.approx(0.6)
    assert b16["id_ci"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    assert table[(table.model == "ViT-B-32")]["id_mean"].item() == pytest.approx(0.1)  # never averaged together
    assert {"wiseft (flyp)", "wiseft (finetune)"} <= set(table.method)
    assert np.isnan(table[table.method == "wiseft (flyp)"]["id_ci"].item())  # one seed: no interval


def test_the_ood_axis_is_each_splits_headline_metric_averaged_over_shifts(tmp_path):
    splits = {"id_test": {"role": "id", "metric": "accuracy", "use": "test"},
              "sketch": {"role": "ood", "metric": "accuracy", "use": "test"},
              "rendition": {"role": "ood", "metric": "accuracy", "use": "test"}}
    store = ResultsStore(tmp_path / "r.db")
    store.start_run("zs", method="zeroshot", dataset="imagenet", model="m", pretrained="p", seed=0, splits=splits)
    for split, value in {"id_test": 0.68, "sketch": 0.48, "rendition": 0.78}.items():
        role = splits[split]["role"]
        store.log_metrics("zs", {"accuracy": value, "macro_f1": 0.0}, split=split, role=role)
    store.finish_run("zs")
    found = compare(store.load())
    row = found.table.iloc[0]
    assert (row["id_mean"], row["ood_mean"]) == (pytest.approx(0.68), pytest.approx(0.63))
    assert found.axes == {"id": "ID accuracy (id_test)", "ood": "OOD accuracy (mean of 2 splits)"}


def test_unfinished_runs_are_left_out_of_the_comparison(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    values = {"id_val": 0.5, "id_test": 0.5, "test": 0.5}
    _log(store, "done", "finetune", 0, values)
    _log(store, "killed", "finetune", 0, {k: 0.9 for k in values}, status="running")  # same seed, never finished
    _log(store, "failed", "finetune", 1, {k: 0.1 for k in values}, status="failed")
    _log(store, "wise-running", "wiseft", 0, values, status="running")  # its only run: no entry at all
    store.log_rows([{"run_id": "ad-hoc", "method": "zeroshot", "dataset": "d", "split": split, "role": role,
                     "metric": "macro_f1", "value": 0.3, "seed": 0}
                    for split, role in (("id_test", "id"), ("test", "ood"))])  # no registered run: counts
    frame = store.load()
    statuses = dict(zip(frame["run_id"], frame["status"], strict=True))  # load() joins each row's run status
    assert pd.isna(statuses.pop("ad-hoc"))
    assert statuses == {"done": "done", "killed": "running", "failed": "failed", "wise-running": "running"}
    table = compare(frame).table.set_index("method")
    assert set(table.index) == {"finetune", "zeroshot"}
    row = table.loc["finetune"]
    assert (row["n_seeds"], row["id_mean"], row["ood_mean"]) == (1, pytest.approx(0.5), pytest.approx(0.5))
    assert table.loc["zeroshot", "id_mean"] == pytest.approx(0.3)
    store.finish_run("killed")  # resumed and finished: now it counts
    assert compare(store.load()).table.set_index("method").loc["finetune", "id_mean"] == pytest.approx(0.7)


def test_migration_stores_each_runs_config_once_and_loses_none(v1_store):
    with sqlite3.connect(v1_store) as conn:
        per_row = dict(conn.execute("SELECT id, config_json FROM results").fetchall())
        run_of = dict(conn.execute("SELECT id, run_id FROM results").fetchall())
        # two twists the fixture lacks: a row whose config differs from its run's, a run with no config
        odd_id, bare_run = min(per_row), run_of[max(per_row)]
        conn.execute("UPDATE results SET config_json = '{\"odd\": 1}' WHERE id = ?", (odd_id,))
        conn.execute("UPDATE runs SET config_json = NULL WHERE run_id = ?", (bare_run,))
    per_row[odd_id] = '{"odd": 1}'
    ResultsStore(v1_store).log_metrics("new-run", {"accuracy": 1.0}, split="test")  # migrates
    with sqlite3.connect(v1_store) as conn:
        kept = dict(conn.execute("SELECT id, config_json FROM results WHERE config_json IS NOT NULL").fetchall())
        run_configs = dict(conn.execute("SELECT run_id, config_json FROM runs").fetchall())
    assert kept == {odd_id: '{"odd": 1}'}  # only the row that differs from its run keeps a copy
    assert run_configs[bare_run] is not None  # the run took its rows' config
    loaded = results.load(v1_store).set_index("id")["config_json"]
    assert {row_id: loaded[row_id] for row_id in per_row} == per_row  # every row still reads its config
