"""A sweep through submitit's local executor against the same runs one after another in this process.

    python benchmarks/sweep_local.py                                   # zeroshot finetune radapter x seeds 0 1
    python benchmarks/sweep_local.py --methods finetune flyp --seeds 0 1 2 --parallel 2

Both sides run each method's synthwild preset (exactly what ``python -m rftlib.train`` runs) into
their own throw-away runs folder. Printed: every run's time in the sweep (from its records: first
to last), the sweep's wall time, the time to gather its records into SQLite and to re-run the
finished sweep (it launches nothing), the record and row counts, and the same runs' sequential
wall time for a ratio. Each sweep job starts its own Python (imports, data, model), so on a small
grid of short runs that start-up is a visible share of the time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from rftlib.methods import run_method
from rftlib.results import ResultsStore
from rftlib.results.journal import RunJournal, run_folders
from rftlib.sweep import ExecutorSettings, Sweep, SweepSpec


def _sequential(spec: SweepSpec, folder: Path) -> float:
    """The sweep's runs one after another in this process (the baseline)."""
    start = time.perf_counter()
    for run in spec.expand():
        run_method(run.method, dataset=run.dataset, seed=run.seed, overrides=run.overrides, model=run.model,
                   pretrained=run.pretrained, dataset_options=run.dataset_options, progress="off",
                   results_db=str(folder / "results.db"), out_dir=folder / run.run_id)
    return time.perf_counter() - start


def _run_seconds(folder: Path) -> float:
    """A run's time as its records tell it (its first record to its last)."""
    stamps = [datetime.fromisoformat(r["at"]) for r in RunJournal(folder).records()]
    return (max(stamps) - min(stamps)).total_seconds()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["zeroshot", "finetune", "radapter"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--parallel", type=int, default=2, help="local CPU jobs at once")
    args = parser.parse_args(argv)
    spec = SweepSpec(methods=args.methods, seeds=args.seeds)
    with tempfile.TemporaryDirectory(prefix="rft-sweep-bench-") as tmp:
        sweep = Sweep(spec, executor=ExecutorSettings(parallel=args.parallel, retries=0),
                      runs_dir=Path(tmp) / "sweep", results_db=Path(tmp) / "sweep" / "results.db")
        report = sweep.launch(poll_s=0.5, progress=None)
        start = time.perf_counter()
        gathered = sweep.gather()
        gather_s = time.perf_counter() - start
        start = time.perf_counter()
        again = sweep.launch(poll_s=0.5, progress=None)
        again_s = time.perf_counter() - start
        folders = {f.name: f for f in run_folders(sweep.runs_dir)}
        table = pd.DataFrame([{"run": r.label(), "state": s.state, "run_s": round(_run_seconds(folders[r.run_id]), 1),
                               "records": len(RunJournal(folders[r.run_id]).files())}
                              for r, s in ((s.run, s) for s in report.states)])
        rows = len(ResultsStore(sweep.results_db).load())
        sequential = _sequential(spec, Path(tmp) / "sequential")
    print(table.to_string(index=False))
    print(f"\nsweep of {len(report.states)} run(s), local executor, {args.parallel} CPU job(s) at once: "
          f"{report.seconds:.1f} s wall ({report.counts})")
    print(f"records: {gathered.records} in {gathered.runs} run folder(s) (base runs included) -> {rows} rows; "
          f"gathering again: {gather_s:.2f} s; re-running the finished sweep: {again_s:.1f} s, "
          f"{len(again.states)} launched, {len(again.skipped)} done before")
    print(f"the same runs one after another in this process: {sequential:.1f} s "
          f"(sweep / sequential = {report.seconds / sequential:.2f})")


if __name__ == "__main__":
    main()
