"""Per-run records (rftlib.results.journal): every run writes its own append-only journal, one
process gathers journals into the SQLite store, and nothing is lost or duplicated on retry, on
concurrent writers or when a writer dies mid-write."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from rftlib.methods import run_method
from rftlib.results import ResultsStore, load
from rftlib.results.journal import SINK_ENV_VAR, RunJournal, RunRecorder, gather, resolve_sink, run_folders

from .helpers import python_path, tiny_clip

ROOT = Path(__file__).resolve().parents[1]
KEY = ["run_id", "split", "metric", "kind", "knobs_json", "epoch", "step"]


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    """A results frame without row ids and write times (a replayed row replaces its earlier copy), in a stable
    order (what must agree across sinks)."""
    return frame.drop(columns=["id", "created_at"]).sort_values(KEY).reset_index(drop=True)


def test_a_run_journals_what_it_writes_to_the_store(data, tmp_path):
    db = tmp_path / "results.db"
    result = run_method("zeroshot", data=data, clip=tiny_clip(), results_db=str(db), out_dir=tmp_path / "runs" / "zs")
    direct = load(db)
    assert len(direct) > 0 and set(direct.run_id) == {result.run_id}
    pd.testing.assert_frame_equal(_rows(load(tmp_path / "runs")), _rows(direct))
    assert RunJournal(tmp_path / "runs" / "zs").status() == "done"


def test_the_folder_sink_writes_no_store_and_gathering_is_idempotent(data, tmp_path, monkeypatch):
    reference = run_method("zeroshot", data=data, clip=tiny_clip(), results_db=str(tmp_path / "direct.db"),
                           out_dir=tmp_path / "direct")
    monkeypatch.setenv(SINK_ENV_VAR, "folder")
    db = tmp_path / "sweep.db"
    run_method("zeroshot", data=data, clip=tiny_clip(), results_db=str(db), out_dir=tmp_path / "runs" / "zs")
    assert not db.exists()
    store = ResultsStore(db)
    first = gather(tmp_path / "runs", store)
    assert (first.runs, first.statuses) == (1, {"done": 1})
    once = _rows(store.load())
    gather(tmp_path / "runs", store)
    pd.testing.assert_frame_equal(_rows(store.load()), once)
    pd.testing.assert_frame_equal(once, _rows(load(tmp_path / "direct.db")))
    assert store.runs().status.tolist() == ["done"] and reference.run_id == store.runs().run_id.iloc[0]


def test_a_retried_run_and_a_dead_writer_lose_and_duplicate_nothing(tmp_path):
    folder = tmp_path / "runs" / "r1"
    recorder = RunRecorder(ResultsStore(tmp_path / "unused.db"), RunJournal(folder), sink="folder")
    recorder.start_run("r1", method="finetune", dataset="synthwild", seed=0)
    recorder.log_metrics("r1", {"accuracy": 0.5}, split="id_val", kind="epoch", epoch=1)
    recorder.finish_run("r1", status="failed")
    (folder / "records" / ".record.tmp-999").write_bytes(b'{"op": "log_met')  # a writer killed mid-record
    retry = RunRecorder(ResultsStore(tmp_path / "unused.db"), RunJournal(folder), sink="folder")  # the job again
    retry.start_run("r1", method="finetune", dataset="synthwild", seed=0)
    retry.log_metrics("r1", {"accuracy": 0.5}, split="id_val", kind="epoch", epoch=1)
    retry.log_metrics("r1", {"accuracy": 0.7}, split="id_val", kind="epoch", epoch=2)
    retry.log_metrics("r1", {"accuracy": 0.6, "macro_f1": 0.4}, split="test")
    retry.finish_run("r1")
    names = [p.name for p in RunJournal(folder).files()]
    assert names[0] == "00000001-start_run.json" and names[-1] == "00000008-finish_run.json" and len(names) == 8
    store = ResultsStore(tmp_path / "gathered.db")
    gather(tmp_path / "runs", store)
    rows = store.load()
    assert len(rows) == 4 and not rows.duplicated(["split", "metric", "epoch"]).any()
    assert store.run_status("r1") == "done"


def test_a_forced_retrain_forgets_the_old_rows_in_a_store_that_gathered_them(data, tmp_path, monkeypatch):
    monkeypatch.setenv(SINK_ENV_VAR, "folder")
    runs, store = tmp_path / "runs", ResultsStore(tmp_path / "g.db")
    first = run_method("zeroshot", data=data, clip=tiny_clip(), out_dir=runs / "zs", results_db=str(store.path))
    gather(runs, store)
    store.log_metrics(first.run_id, {"stale": 1.0}, split="test")  # a row the new run will not write
    run_method("zeroshot", data=data, clip=tiny_clip(), out_dir=runs / "zs", results_db=str(store.path), force=True)
    assert [p.name for p in run_folders(runs)] == ["zs"]  # the old folder, moved aside, is not gathered
    assert RunJournal(runs / "zs").records()[0]["op"] == "delete_run"
    gather(runs, store)
    assert "stale" not in set(store.load().metric) and store.run_status(first.run_id) == "done"


WRITER = textwrap.dedent("""
    import sys
    from rftlib.results import ResultsStore
    from rftlib.results.journal import RunJournal, RunRecorder

    folder, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rec = RunRecorder(ResultsStore(folder + "/unused.db"), RunJournal(folder), sink="folder")
    rec.start_run(run_id, method="finetune", dataset="synthwild", seed=0)
    for step in range(count):
        rec.log_metrics(run_id, {"loss": float(step), "lr": 0.1}, split="train", kind="epoch", step=step)
    rec.finish_run(run_id)
""")


def test_eight_jobs_writing_records_at_once_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    runs, count = tmp_path / "runs", 40
    env = {"PYTHONPATH": python_path(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    jobs = [subprocess.Popen([sys.executable, str(script), str(runs / f"job{i}"), f"job{i}", str(count)], env=env)
            for i in range(8)]
    store = ResultsStore(tmp_path / "g.db")
    while any(job.poll() is None for job in jobs):
        gather(runs, store)  # gathering while they write
    assert [job.returncode for job in jobs] == [0] * 8
    report = gather(runs, store)
    rows = store.load()
    assert report.statuses == {"done": 8} and report.records == 8 * (count + 2)
    assert len(rows) == 8 * count * 2 and not rows.duplicated(["run_id", "metric", "step"]).any()


def test_bad_sinks_and_bad_records_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(SINK_ENV_VAR, "nfs")
    with pytest.raises(ValueError, match="RFT_RESULTS_SINK.*store, folder"):
        resolve_sink()
    journal = RunJournal(tmp_path)
    journal.append("finish_run", run_id="x")
    (journal.folder / "00000002-start_run.json").write_text("{not json")
    with pytest.raises(ValueError, match="00000002-start_run.json is not a readable results record"):
        journal.records()
    with pytest.raises(ValueError, match="unknown journal op"):
        journal.append("drop_table")


def test_records_are_written_where_hard_links_are_refused(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("rftlib.results.journal.os.link", no_links)
    journal = RunJournal(tmp_path)
    journal.append("start_run", run_id="x", method="finetune", dataset="synthwild")
    journal.append("finish_run", run_id="x")
    assert [p.name for p in journal.files()] == ["00000001-start_run.json", "00000002-finish_run.json"]
    assert journal.status() == "done" and not list(journal.folder.glob(".*"))
