"""The results store's fault matrix: each bad input or damaged file -> the message it gets -> the
file left as it was (and still loading); reading from read-only media; and writers SIGKILLed at
random moments, which never lose a committed row.

Every case is one row of a table below; a new fault is a new row.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rftlib.results import ResultsStore, StoreError, load
from rftlib.results import store as store_module

FIXTURE = Path(__file__).parent / "data" / "results_v1.db"
REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 10


def _digest(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` (the store and any -wal/-shm next to it) and its content hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<folder>"
            for p in sorted(folder.iterdir())}


def _good_store(path: Path) -> ResultsStore:
    store = ResultsStore(path)
    store.start_run("r", method="m", dataset="d", seed=0, config={"lr": 1e-3})
    store.log_metrics("r", {"acc": 0.5, "f1": 0.25}, split="test", role="ood", epoch=1)
    store.finish_run("r")
    return store


# --------------------------------------------------------------------------------------------------
# writes of the wrong type: refused, naming the column, the value and the row's metric; nothing written
# --------------------------------------------------------------------------------------------------
def _log_metrics(**overrides):
    def write(store: ResultsStore) -> None:
        kwargs = {"metrics": {"acc": 0.5}, "split": "test", **overrides}
        store.log_metrics("r", kwargs.pop("metrics"), **kwargs)
    return write


def _log_rows(bad: dict, at: int = 2):
    def write(store: ResultsStore) -> None:
        rows = [{"run_id": "batch", "metric": f"m{i}", "value": 0.1 * i, "split": "test"} for i in range(5)]
        rows[at].update(bad)
        store.log_rows(rows)
    return write


def _start_run(**overrides):
    def write(store: ResultsStore) -> None:
        store.start_run("r2", **{"method": "m", "dataset": "d", **overrides})
    return write


BAD_WRITES = [
    # (case, write, expected message fragment)
    ("value: a string", _log_metrics(metrics={"acc": "abc"}),
     "column 'value' must be a real number or None, got 'abc' (str) (in the row of metric 'acc', run 'r')"),
    ("value: a numeric string", _log_metrics(metrics={"acc": "0.5"}), "column 'value' must be a real number"),
    ("value: a bool", _log_metrics(metrics={"acc": True}), "got True (bool) (in the row of metric 'acc'"),
    ("value: a list", _log_metrics(metrics={"acc": [0.5]}), "got [0.5] (list)"),
    ("value: a 2-element array", _log_metrics(metrics={"acc": np.array([1.0, 2.0])}), "(ndarray)"),
    ("value: complex", _log_metrics(metrics={"acc": 1j}), "got 1j (complex)"),
    ("value: a 2-element tensor", _log_metrics(metrics={"acc": torch.tensor([1.0, 2.0])}), "(Tensor)"),
    ("value: second metric bad", _log_metrics(metrics={"acc": 0.5, "f1": "x"}), "in the row of metric 'f1'"),
    ("metric name not a string", _log_metrics(metrics={5: 0.5}), "column 'metric' must be a string"),
    ("metric name empty", _log_metrics(metrics={"": 0.5}), "missing required column(s) ['metric']"),
    ("epoch: a word", _log_metrics(epoch="two"), "column 'epoch' must be an integer or None, got 'two' (str)"),
    ("epoch: a float", _log_metrics(epoch=1.5), "column 'epoch' must be an integer or None, got 1.5 (float)"),
    ("epoch: a bool", _log_metrics(epoch=True), "column 'epoch' must be an integer or None, got True (bool)"),
    ("step: a numeric string", _log_metrics(step="3"), "column 'step' must be an integer"),
    ("seed: a numpy float", _log_metrics(seed=np.float64(1.0)), "column 'seed' must be an integer"),
    ("split: an int", _log_metrics(split=3), "column 'split' must be a string or None, got 3 (int)"),
    ("role: a list", _log_metrics(role=["id"]), "column 'role' must be a string"),
    ("method: bytes", _log_metrics(method=b"x"), "column 'method' must be a string"),
    ("model: a float", _log_metrics(model=1.0), "column 'model' must be a string"),
    ("pretrained: a dict", _log_metrics(pretrained={"a": 1}), "column 'pretrained' must be a string"),
    ("kind: unknown", _log_metrics(kind="headline"), "unknown row kind 'headline'"),
    ("knob: a string", _log_metrics(knobs={"alpha": "high"}), "knob alpha='high' must be a finite number"),
    ("knob: NaN", _log_metrics(knobs={"alpha": float("nan")}), "knob alpha=nan must be a finite number"),
    ("log_rows: 3rd of 5 rows has seed 'x'", _log_rows({"seed": "x"}),
     "column 'seed' must be an integer or None, got 'x' (str) (in the row of metric 'm2', run 'batch')"),
    ("log_rows: last row has value None-string", _log_rows({"value": "None"}, at=4), "in the row of metric 'm4'"),
    ("log_rows: created_at not a timestamp", _log_rows({"created_at": "yesterday"}),
     "column 'created_at' must be an ISO-8601 timestamp"),
    ("log_rows: run_id an int", _log_rows({"run_id": 7}), "column 'run_id' must be a string"),
    ("log_rows: unknown column", _log_rows({"colour": "red"}), "unknown column(s) ['colour']"),
    ("start_run: seed a word", _start_run(seed="zero"),
     "column 'seed' must be an integer or None, got 'zero' (str) (registering run 'r2')"),
    ("start_run: method None", _start_run(method=None), "missing required field(s) ['method']"),
    ("start_run: model an int", _start_run(model=16), "column 'model' must be a string"),
]


@pytest.mark.parametrize(("write", "fragment"), [pytest.param(w, f, id=c) for c, w, f in BAD_WRITES])
def test_a_write_of_the_wrong_type_changes_nothing(tmp_path, write, fragment):
    store = _good_store(tmp_path / "results.db")
    before, frame, runs = _digest(tmp_path), store.load(), store.runs()
    with pytest.raises(ValueError, match=re.escape(fragment)) as caught:
        write(store)
    assert not isinstance(caught.value, StoreError)  # the caller's mistake, not the file's
    assert _digest(tmp_path) == before
    assert store.load().equals(frame) and store.runs().equals(runs)  # load() still works, nothing added
    store.log_metrics("r", {"acc": 0.6}, split="val")  # and the store still takes good rows
    assert len(store.load()) == len(frame) + 1


# --------------------------------------------------------------------------------------------------
# files that are not (usable) stores: every reader and writer names the file and what to do
# --------------------------------------------------------------------------------------------------
def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _text(path: Path) -> None:
    path.write_text("run_id,metric,value\nr,acc,0.5\n")


def _truncated(path: Path) -> None:
    rows = [{"run_id": "r", "metric": f"m{i}", "value": 0.1, "config": {"pad": "x" * 500}} for i in range(300)]
    ResultsStore(path).log_rows(rows)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _sqlite_with(*statements: str):
    def make(path: Path) -> None:
        with sqlite3.connect(path) as conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()
    return make


def _folder(path: Path) -> None:
    path.mkdir()


BAD_FILES = [
    # (case, make the file, expected message fragment)
    ("random bytes", _random_bytes, "is damaged or not a SQLite file (file is not a database). Move it aside"),
    ("a CSV file", _text, "is damaged or not a SQLite file (file is not a database)"),
    ("a truncated store", _truncated, "is damaged or not a SQLite file (database disk image is malformed)"),
    ("another app's SQLite db", _sqlite_with("CREATE TABLE moz_places (id INTEGER, url TEXT)",
                                             "INSERT INTO moz_places VALUES (1, 'x')"),
     "is not an rftlib results store (another application's database? its tables: moz_places"),
    ("another app's db with user_version 2", _sqlite_with("CREATE TABLE t (x)", "PRAGMA user_version = 2"),
     "is not an rftlib results store"),
    ("another app's 'results' table", _sqlite_with("CREATE TABLE results (score REAL)"),
     "no 'results' table with the columns run_id, metric, value"),
    ("a newer rftlib's store", _sqlite_with("CREATE TABLE results (id INTEGER)", "PRAGMA user_version = 3"),
     "has schema version 3, newer than this rftlib's 2; upgrade rftlib"),
    ("a folder where the file should be", _folder, "is a folder, not a file"),
]
ACTIONS = {
    "load": lambda store: store.load(),
    "runs": lambda store: store.runs(),
    "log_metrics": lambda store: store.log_metrics("r", {"acc": 0.5}, split="test"),
    "start_run": lambda store: store.start_run("r", method="m", dataset="d"),
}


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize(("make", "fragment"), [pytest.param(m, f, id=c) for c, m, f in BAD_FILES])
def test_a_file_that_is_not_a_usable_store_is_named_and_left_alone(tmp_path, make, fragment, action):
    path = tmp_path / "results.db"
    make(path)
    before = _digest(tmp_path)
    with pytest.raises(StoreError) as caught:
        ACTIONS[action](ResultsStore(path))
    message = str(caught.value)
    assert fragment in message and str(path) in message
    assert "RFT_RESULTS_DB" in message  # the way on: another file
    assert isinstance(caught.value, ValueError)
    after = _digest(tmp_path)
    assert {name: after[name] for name in before} == before  # not a byte changed
    # at most SQLite's own side files of a damaged WAL store, with nothing in them
    assert set(after) - set(before) <= {"results.db-wal", "results.db-shm"}
    assert all((tmp_path / name).stat().st_size == 0 for name in set(after) - set(before) if name.endswith("-wal"))


def test_an_empty_file_is_a_valid_empty_store(tmp_path):
    path = tmp_path / "results.db"
    path.touch()
    store = ResultsStore(path)
    assert store.load().empty and store.runs().empty
    store.log_metrics("r", {"acc": 0.5}, split="test")
    assert store.load()["value"].tolist() == [0.5]


def test_a_row_poisoned_outside_the_api_is_named_with_its_id(tmp_path):
    path = tmp_path / "results.db"
    _good_store(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET epoch = 'two' WHERE metric = 'f1'")
    conn.close()
    with pytest.raises(StoreError, match=r"column 'epoch' holds values that are not of its type INTEGER "
                                         r"\(rows with id \[2\]"):
        load(path)


# --------------------------------------------------------------------------------------------------
# read-only media: reading works without -wal/-shm; writing is refused, naming the file
# --------------------------------------------------------------------------------------------------
def _store_with_pending_wal(path: Path) -> int:
    """A store whose last commits are only in its -wal (a writer's folder snapshotted mid-run, e.g.
    copied to read-only media): returns the number of rows committed in all."""
    work = path.parent.parent / "work"
    work.mkdir()
    source = _good_store(work / path.name)
    keeper = sqlite3.connect(source.path)  # an open connection: the writes below stay in the -wal
    keeper.execute("SELECT COUNT(*) FROM results").fetchone()
    source.log_rows([{"run_id": "late", "metric": f"m{i}", "value": float(i)} for i in range(BATCH)])
    shutil.copyfile(source.path, path)
    shutil.copyfile(f"{source.path}-wal", f"{path}-wal")
    keeper.close()
    main_only = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    assert main_only.execute("SELECT COUNT(*) FROM results").fetchone() == (2,)  # the rest is in the -wal
    main_only.close()
    return 2 + BATCH


def _plain_store(path: Path) -> int:
    _good_store(path)
    return 2


def _v1_store(path: Path) -> int:
    shutil.copyfile(FIXTURE, path)
    return 382


READ_ONLY_STORES = [("a WAL store", _plain_store), ("commits still in its -wal", _store_with_pending_wal),
                    ("a first-release store", _v1_store)]


@pytest.mark.parametrize("make", [pytest.param(m, id=c) for c, m in READ_ONLY_STORES])
def test_a_store_in_a_read_only_folder_reads_and_refuses_writes(tmp_path, monkeypatch, make):
    folder = tmp_path / "media #1 ?ro%"  # characters a file: URI must escape
    folder.mkdir()
    path = folder / "results.db"
    expected = make(path)
    before = _digest(folder)
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root: chmod does not stop it, so say what read-only media says
            monkeypatch.setattr(store_module, "_folder_writable", lambda folder: False)
        store = ResultsStore(path)
        assert len(store.load()) == expected and len(load(path)) == expected
        assert not store.runs().empty
        with pytest.raises(StoreError, match=r"its folder is read-only \(reading the store still works\)"):
            store.log_metrics("r", {"acc": 0.9}, split="val")
        assert _digest(folder) == before  # no -shm, no -wal, no change
    finally:
        folder.chmod(0o755)


_READ_ONLY_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from rftlib.results import ResultsStore, StoreError
    out = {"writable": os.access(sys.argv[1], os.W_OK)}
    for name in sys.argv[2:]:
        store = ResultsStore(os.path.join(sys.argv[1], name))
        out[name] = {"load": len(store.load()), "runs": len(store.runs())}
        try:
            store.log_metrics("r", {"acc": 0.9}, split="val")
        except StoreError as error:
            out[name]["write"] = str(error)
    print(json.dumps(out))
    """
)


def _without_dac_override() -> None:
    """In the child before exec: drop root's power to ignore file modes (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set), so a 0o555 folder is read-only to it as to anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drops root's capabilities with Linux prctl")
def test_genuinely_read_only_folder_in_a_fresh_process(tmp_path):
    """No monkeypatching: a process that really cannot write the folder (as root, one without the
    capability to override file modes) reads both stores and gets the named error on writing."""
    folder = tmp_path / "ro"
    folder.mkdir()
    expected = {"plain.db": _plain_store(folder / "plain.db"),
                "walled.db": _store_with_pending_wal(folder / "walled.db")}
    before = _digest(folder)
    folder.chmod(0o555)
    try:
        child = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD, str(folder), *expected], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120,
                               preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    finally:
        folder.chmod(0o755)
    assert child.returncode == 0, child.stderr
    found = json.loads(child.stdout)
    if found.pop("writable"):
        pytest.skip("could not make a folder read-only for a child process here")
    for name, rows in expected.items():
        assert found[name]["load"] == rows and found[name]["runs"] >= 1
        assert "its folder is read-only" in found[name]["write"] and name in found[name]["write"]
    assert _digest(folder) == before


# --------------------------------------------------------------------------------------------------
# writers killed at random moments: the file stays sound, every committed row stays
# --------------------------------------------------------------------------------------------------
def _endless_writer(path: str, first_batch: int, report_fd: int) -> None:
    """Child body: write batches of BATCH rows forever, reporting each batch number once committed."""
    store = ResultsStore(path, writer=True)  # writer given: no torch import to wait for in the child
    batch = first_batch
    while True:
        store.log_rows([{"run_id": "kill", "metric": f"m{i}", "value": float(i), "step": batch, "split": "test"}
                        for i in range(BATCH)])
        os.write(report_fd, f"{batch}\n".encode())
        batch += 1


def _kill_at(target, args: tuple, delay: float) -> list[int]:
    """Fork a child running ``target(*args, report_fd)``, SIGKILL it after ``delay`` seconds, and
    return the numbers it reported."""
    read_fd, write_fd = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=target, args=(*args, write_fd), daemon=True)
    child.start()
    os.close(write_fd)
    child.join(delay)
    child.kill()
    child.join(30)
    assert child.exitcode == -9
    with os.fdopen(read_fd) as reports:
        return [int(line) for line in reports.read().split()]


def _sound(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_writers_killed_at_random_moments_lose_no_committed_row(tmp_path):
    path = tmp_path / "results.db"
    rng = random.Random(13)
    batches = 0
    for _ in range(10):
        reported = _kill_at(_endless_writer, (str(path), batches), rng.uniform(0.0, 0.25))
        if not path.exists():
            continue  # killed before it created the file
        _sound(path)
        frame = load(path)
        count = len(frame)
        assert count % BATCH == 0 and count >= batches * BATCH  # whole transactions only, never fewer
        batches = count // BATCH
        assert sorted(set(frame["step"])) == list(range(batches))  # contiguous: no committed batch lost
        assert (frame.groupby("step").size() == BATCH).all()
        assert set(reported) <= set(range(batches))  # everything the writer saw committed is there
    assert batches > 0


def _migrating_writer(path: str, report_fd: int) -> None:
    """Child body: the first write to a first-release store (which migrates it), report, then wait
    for the kill."""
    ResultsStore(path, writer=True).log_metrics("new", {"acc": 1.0}, split="test")
    os.write(report_fd, b"1\n")
    while True:
        time.sleep(1)


def _seconds_to_migrate(path: Path) -> float:
    """How long a forked child takes to migrate a copy of the fixture here (to aim the kills)."""
    shutil.copyfile(FIXTURE, path)
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=_migrating_writer, args=(str(path), write_fd),
                                                        daemon=True)
    child.start()
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        reports.readline()
    took = time.perf_counter() - started
    child.kill()
    child.join(30)
    return took


def test_a_writer_killed_while_migrating_loses_no_row(tmp_path):
    old_ids = set(range(1, 383))
    rng = random.Random(7)
    window = 1.5 * _seconds_to_migrate(tmp_path / "timing.db")  # kills before, during and after the migration
    for attempt in range(8):
        path = tmp_path / f"v1-{attempt}.db"
        shutil.copyfile(FIXTURE, path)
        reported = _kill_at(_migrating_writer, (str(path),), rng.uniform(0.0, window))
        _sound(path)
        frame = load(path)
        assert old_ids <= set(frame["id"])  # migrated or not, every first-release row is there
        assert set(frame["run_id"]) - {"new"} == set(load(FIXTURE)["run_id"])
        with sqlite3.connect(path) as conn:
            migrated = conn.execute("PRAGMA user_version").fetchone()[0] == 2
        conn.close()
        assert migrated == ("new" in set(frame["run_id"]))  # the migration and the write commit together
        assert not reported or migrated
