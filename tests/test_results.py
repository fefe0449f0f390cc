"""Tests for rftlib.results: round trips, path precedence, run registry, concurrency and crashes."""

from __future__ import annotations

import json
import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rftlib import results
from rftlib.results import LOADED_COLUMNS, ResultsStore

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path) -> ResultsStore:
    return ResultsStore(tmp_path / "sub" / "results.db")


def _row_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


# --------------------------------------------------------------------------------------------------
# basics
# --------------------------------------------------------------------------------------------------
def test_load_of_missing_database_is_empty_and_creates_nothing(tmp_path):
    path = tmp_path / "nothing" / "here.db"
    frame = results.load(path)
    assert frame.empty
    assert list(frame.columns) == list(LOADED_COLUMNS)
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    assert frame["value"].dtype == "float64" and frame["epoch"].dtype == "Int64"
    assert ResultsStore(path).runs().empty
    assert not path.exists() and not path.parent.exists()


def test_log_load_and_filter_round_trip(store):
    written = store.log_metrics(
        "run-a", {"accuracy": np.float32(0.5), "macro_f1": 0.25, "ece": 0.1}, split="test", role="ood",
        method="wiseft", dataset="iwildcam", kind="sweep", knobs={"alpha": np.float64(0.3)}, epoch=np.int64(2),
        config={"lr": 1e-5, "b": [1]},
    )
    assert written == 3
    store.log_metrics("run-b", {"accuracy": 0.7}, split="id_test", method="finetune", dataset="iwildcam")

    frame = store.load()
    assert len(frame) == 4 and list(frame.columns) == [*LOADED_COLUMNS, "alpha"]
    first = frame.iloc[0]
    assert (first["metric"], first["value"], first["alpha"], first["epoch"]) == ("accuracy", 0.5, 0.3, 2)
    assert (first["kind"], first["knobs_json"]) == ("sweep", '{"alpha": 0.3}')
    assert np.isnan(frame.iloc[3]["alpha"]) and frame.iloc[3]["kind"] == "final"
    assert json.loads(first["config_json"]) == {"b": [1], "lr": 1e-5}
    assert first["created_at"].tzinfo is not None
    assert frame["id"].is_monotonic_increasing

    assert set(store.load(method="wiseft")["metric"]) == {"accuracy", "macro_f1", "ece"}
    assert len(store.load(method="wiseft", metric=["accuracy", "ece"])) == 2
    assert store.load(split="id_test")["value"].tolist() == [0.7]
    assert store.load(alpha=None)["run_id"].tolist() == ["run-b"]
    assert store.load(alpha=0.3)["metric"].tolist() == ["accuracy", "macro_f1", "ece"]
    assert store.load(kind="final")["run_id"].tolist() == ["run-b"]
    assert len(store.load(epoch=np.int64(2))) == 3  # numpy scalars work as filter values
    assert store.load(metric=[]).empty
    with pytest.raises(ValueError, match="unknown filter"):
        store.load(colour="red")


def test_export_csv_and_jsonl_round_trip(store, tmp_path):
    store.log_metrics("run-a", {"accuracy": 0.5, "macro_f1": 0.25}, split="test", method="wiseft",
                      knobs={"alpha": 0.5})
    store.log_metrics("run-b", {"accuracy": 0.9}, split="test", method="zeroshot")

    csv_path = store.export(tmp_path / "out" / "all.csv")
    from_csv = pd.read_csv(csv_path)
    assert list(from_csv.columns) == [*LOADED_COLUMNS, "alpha"]
    assert from_csv["value"].tolist() == [0.5, 0.25, 0.9]

    jsonl_path = results.export(tmp_path / "wiseft.jsonl", path=store.path, method="wiseft")
    from_jsonl = pd.read_json(jsonl_path, lines=True)
    assert from_jsonl["metric"].tolist() == ["accuracy", "macro_f1"]
    assert from_jsonl["alpha"].tolist() == [0.5, 0.5]

    with pytest.raises(ValueError, match=r"\.csv, \.jsonl"):
        store.export(tmp_path / "out.parquet")


def test_path_precedence_explicit_then_env_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(results.ENV_VAR, raising=False)
    monkeypatch.delenv(results.RUNS_ENV_VAR, raising=False)
    assert results.default_path() == tmp_path / "rft_runs" / "results.db"
    assert ResultsStore().path == tmp_path / "rft_runs" / "results.db"

    monkeypatch.setenv(results.RUNS_ENV_VAR, str(tmp_path / "elsewhere"))  # moves checkpoints and the store
    assert results.runs_dir() == tmp_path / "elsewhere"
    assert ResultsStore().path == tmp_path / "elsewhere" / "results.db"

    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "env.db"))
    assert ResultsStore().path == tmp_path / "env.db"
    ResultsStore().log_metrics("r", {"m": 1.0}, split="test")
    assert (tmp_path / "env.db").exists()
    assert results.load()["metric"].tolist() == ["m"]

    assert ResultsStore(tmp_path / "explicit.db").path == tmp_path / "explicit.db"


# --------------------------------------------------------------------------------------------------
# run registry
# --------------------------------------------------------------------------------------------------
def test_new_run_id_is_readable_and_unique():
    ids = {ResultsStore.new_run_id("wiseft", "fmow") for _ in range(50)}
    assert len(ids) == 50
    assert all(run_id.startswith("wiseft-fmow-") for run_id in ids)


def test_log_metrics_fills_fields_from_the_run_registry(store):
    run_id = store.new_run_id("wiseft", "iwildcam")
    store.start_run(
        run_id, method="wiseft", dataset="iwildcam", model="ViT-B-32", pretrained="openai", seed=3,
        config={"lr": 3e-5},
    )
    store.log_metrics(run_id, {"accuracy": 0.5}, split="test", knobs={"alpha": 0.5})
    store.log_metrics(run_id, {"accuracy": 0.6}, split="test", model="override")
    frame = store.load(run_id=run_id)
    assert frame["method"].tolist() == ["wiseft", "wiseft"]
    assert frame["pretrained"].tolist() == ["openai", "openai"]
    assert frame["seed"].tolist() == [3, 3]
    assert frame["model"].tolist() == ["ViT-B-32", "override"]
    assert json.loads(frame["config_json"].iloc[0]) == {"lr": 3e-5}  # the run's, joined: rows hold no copy
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(config_json) FROM results").fetchone() == (0,)

    assert store.runs()["status"].tolist() == ["running"]
    store.finish_run(run_id, status="failed")
    run = store.runs(run_id=run_id).iloc[0]
    assert run["status"] == "failed" and pd.notna(run["finished_at"])


def test_the_config_is_stored_once_per_run(store):
    config = {"blob": "x" * 1_000_000, "lr": 1e-5}  # a 1 MB config
    store.start_run("big", method="m", dataset="d", config=config)
    for epoch in range(10):
        store.log_metrics("big", {f"m{i}": 0.1 * i for i in range(5)}, split="test", kind="epoch", epoch=epoch)
    with sqlite3.connect(store.path) as conn:
        conn.execute("VACUUM")
        size = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
        assert conn.execute("SELECT COUNT(*), COUNT(config_json) FROM results").fetchone() == (50, 0)
    assert size < 2_000_000  # was 51 MB: every row repeated the config
    frame = store.load()
    assert len(frame) == 50 and (frame["config_json"] == json.dumps(config, sort_keys=True)).all()


def test_a_rows_own_config_is_kept_only_when_it_is_not_its_runs(store):
    store.start_run("reg", method="m", dataset="d", config={"lr": 1})
    store.log_metrics("reg", {"same": 1.0}, split="test", config={"lr": 1})  # equal to the run's: not copied
    store.log_metrics("reg", {"other": 1.0}, split="test", config={"lr": 2})  # differs: kept
    store.log_rows([{"run_id": "ad-hoc", "metric": "m", "value": 1.0, "config": {"lr": 3}},  # no run: kept
                    {"run_id": "reg", "metric": "bulk", "value": 1.0, "config": {"lr": 1}}])
    with sqlite3.connect(store.path) as conn:
        stored = dict(conn.execute("SELECT metric, config_json FROM results").fetchall())
    assert stored == {"same": None, "other": '{"lr": 2}', "m": '{"lr": 3}', "bulk": None}
    loaded = dict(zip(store.load()["metric"], store.load()["config_json"], strict=True))
    assert loaded == {"same": '{"lr": 1}', "other": '{"lr": 2}', "m": '{"lr": 3}', "bulk": '{"lr": 1}'}


def test_rows_logged_under_an_earlier_config_keep_it_when_the_run_is_re_registered(store):
    store.start_run("r", method="m", dataset="d", config={"lr": 1})
    store.log_metrics("r", {"acc": 0.5}, split="test", kind="epoch", epoch=0)
    store.start_run("r", method="m", dataset="d", config={"lr": 2})  # e.g. resumed with an explicit override
    store.log_metrics("r", {"acc": 0.6}, split="test", kind="epoch", epoch=1)
    frame = store.load()
    assert frame["config_json"].tolist() == ['{"lr": 1}', '{"lr": 2}']
    store.start_run("r", method="m", dataset="d", config={"lr": 2})  # the same config again: nothing to keep
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT config_json FROM results ORDER BY id").fetchall() == [('{"lr": 1}',), (None,)]


def test_values_of_every_legitimate_type_are_accepted(store):
    import torch

    store.log_metrics("r", {"f32": np.float32(0.5), "i": 3, "i64": np.int64(4), "nan": float("nan"),
                            "inf": np.inf, "none": None, "tensor": torch.tensor(0.25)}, split="test",
                      epoch=np.int32(1), step=torch.tensor(2), seed=0, method=np.str_("m"))
    frame = store.load().set_index("metric")
    assert frame.loc["f32", "value"] == 0.5 and frame.loc["i64", "value"] == 4.0
    assert np.isnan(frame.loc["nan", "value"]) and np.isinf(frame.loc["inf", "value"])
    assert np.isnan(frame.loc["none", "value"])  # None was accepted before, and still is
    assert frame.loc["tensor", "value"] == 0.25 and frame.loc["tensor", "step"] == 2
    assert frame["epoch"].tolist() == [1] * 7 and frame["method"].tolist() == ["m"] * 7
    store.log_rows([{"run_id": "t", "metric": "m", "value": 1.0, "created_at": "2024-05-01T12:00:00+02:00"}])
    assert store.load(run_id="t")["created_at"].iloc[0] == pd.Timestamp("2024-05-01T10:00:00Z")


def test_a_value_of_the_wrong_type_is_refused_before_anything_is_written(store):
    store.log_metrics("r", {"acc": 0.5}, split="test")
    with pytest.raises(ValueError, match=r"column 'epoch' must be an integer or None, got 'two' \(str\) "
                                         r"\(in the row of metric 'acc', run 'r'\); nothing was written"):
        store.log_metrics("r", {"acc": 0.5}, split="test", epoch="two")
    with pytest.raises(ValueError, match="column 'value' must be a real number.*metric 'f1'"):
        store.log_metrics("r", {"acc": 0.5, "f1": "0.3"}, split="test", step=1)
    with pytest.raises(ValueError, match="column 'seed' must be an integer.*registering run 's'"):
        store.start_run("s", method="m", dataset="d", seed="zero")
    frame = store.load()
    assert frame["metric"].tolist() == ["acc"] and frame["step"].isna().all()
    assert store.runs().empty


def test_finish_run_rejects_unknown_runs_and_statuses(store):
    store.start_run("r1", method="m", dataset="d")
    with pytest.raises(ValueError, match="unknown status"):
        store.finish_run("r1", status="exploded")
    with pytest.raises(KeyError, match="never registered"):
        store.finish_run("nope")


def test_log_rows_bulk_insert_and_validation(store):
    rows = [{"run_id": "bulk", "metric": f"m{i}", "value": i, "split": "val", "config": {"k": i}} for i in range(5)]
    assert store.log_rows(rows) == 5
    assert store.load(run_id="bulk")["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert store.log_rows([]) == 0

    with pytest.raises(ValueError, match="colour"):
        store.log_rows([{"run_id": "bulk", "metric": "m", "value": 1.0, "colour": "red"}])
    with pytest.raises(ValueError, match="metric"):
        store.log_rows([{"run_id": "bulk", "value": 1.0}])
    assert len(store.load()) == 5  # a rejected batch writes nothing


# --------------------------------------------------------------------------------------------------
# concurrency and crash safety
# --------------------------------------------------------------------------------------------------
def _concurrent_writer(path: str, worker: int, barrier) -> None:
    """Child process body: wait for all writers, then make 50 three-metric log_metrics calls."""
    store = ResultsStore(path)
    barrier.wait(timeout=120)
    for step in range(50):
        store.log_metrics(
            f"worker-{worker}", {"a": step, "b": step * 2.0, "c": -1.0}, split="test", step=step, seed=worker
        )


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "concurrent.db"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_concurrent_writer, args=(str(path), worker, barrier)) for worker in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=180)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]

    frame = results.load(path)
    assert len(frame) == 600
    assert frame.groupby("run_id").size().tolist() == [150, 150, 150, 150]
    assert frame["id"].is_unique


_CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from rftlib.results import ResultsStore

    store = ResultsStore(sys.argv[1])
    def rows(step):
        return [{"run_id": "crash", "metric": f"m{i}", "value": float(i), "split": "test", "step": step}
                for i in range(10)]

    store.log_rows(rows(0))
    print("ready", flush=True)
    step = 1
    while True:
        store.log_rows(rows(step))
        step += 1
    """
)


def test_killed_writer_leaves_a_valid_database(tmp_path):
    path = tmp_path / "crash.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_WRITER, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = _row_count(path)
    assert count > 10 and count % 10 == 0  # only whole transactions survive

    ResultsStore(path).log_metrics("after", {"accuracy": 1.0}, split="test")
    assert _row_count(path) == count + 1
