"""``python -m rftlib.sweep``: run a grid of methods x datasets x seeds (see :mod:`rftlib.sweep`).

    python -m rftlib.sweep --methods finetune flyp --seeds 0 1 --dataset synthwild --set epochs=1 \\
        --executor local
    python -m rftlib.sweep --file sweep.toml --executor slurm --partition gpu --gpus 4 --time 720
    python -m rftlib.sweep --file sweep.toml --dry-run        # list the runs, and which are done
    python -m rftlib.sweep --file sweep.toml --gather-only    # gather the run folders' records

``--set``, ``--data-option`` and ``--results-db`` work as for ``python -m rftlib.train``;
``--grid KEY=V1,V2`` (or a JSON list) crosses a setting's values. Exit status: 0 when every run is
done, 1 when some failed (each is listed with its log), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..cli import INPUT_ERRORS, parse_override
from ..data import list_datasets
from ..methods import list_methods
from .driver import Sweep
from .grid import SweepSpec, list_tables
from .jobs import EXECUTORS, ExecutorSettings


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """``KEY=[1e-5, 3e-5]`` or ``KEY=1e-5,3e-5`` -> ``(KEY, [values])``."""
    key, value = parse_override(text)
    if isinstance(value, list):
        return key, value
    return key, [parse_override(f"{key}={part}")[1] for part in str(value).split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rftlib.sweep", description=__doc__.split("\n")[0])
    grid = parser.add_argument_group("the grid (a --file's fields, replaced by those given here)")
    grid.add_argument("--file", default=None,
                      help=f"a TOML or JSON sweep file, or a shipped table: {', '.join(list_tables())}")
    grid.add_argument("--methods", nargs="+", default=None, metavar="NAME", help=", ".join(list_methods()))
    grid.add_argument("--dataset", "--datasets", dest="datasets", nargs="+", default=None, metavar="NAME",
                      help=", ".join(list_datasets()))
    grid.add_argument("--seeds", nargs="+", type=int, default=None)
    grid.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override)
    grid.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", type=parse_grid)
    grid.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override)
    grid.add_argument("--model", default=None)
    grid.add_argument("--pretrained", default=None)
    grid.add_argument("--data-root", default=None)
    where = parser.add_argument_group("where jobs run")
    where.add_argument("--executor", default="local", choices=EXECUTORS)
    where.add_argument("--gpus", type=int, default=0, help="GPUs per job (per node); 0: CPU jobs")
    where.add_argument("--nodes", type=int, default=1, help="nodes per job (slurm)")
    where.add_argument("--parallel", type=int, default=None,
                       help="local: jobs at once (default one per GPU, else 1); slurm: array parallelism")
    where.add_argument("--partition", default=None)
    where.add_argument("--time", type=int, default=24 * 60, help="time limit per job, minutes")
    where.add_argument("--cpus-per-task", type=int, default=None)
    where.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE", type=parse_override,
                       help="further sbatch parameters, e.g. --slurm account=abc qos=high")
    where.add_argument("--retries", type=int, default=1, help="resubmissions of a failed job")
    out = parser.add_argument_group("outputs")
    out.add_argument("--runs-dir", default=None, help="run folders (default $RFT_RUNS_DIR or ./rft_runs)")
    out.add_argument("--results-db", default=None, help="the SQLite store the records are gathered into")
    out.add_argument("--logs-dir", default=None, help="job logs (default <runs-dir>/sweep-logs)")
    out.add_argument("--track", nargs="*", default=[], metavar="NAME",
                     help="experiment trackers for every run (tensorboard, wandb; default: none)")
    action = parser.add_argument_group("what to do").add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="list the runs and their state; launch nothing")
    action.add_argument("--gather-only", action="store_true", help="gather the records into the store; launch nothing")
    action.add_argument("--no-wait", action="store_true", help="submit and exit (slurm); run again to follow or gather")
    return parser


def _spec(args: argparse.Namespace) -> SweepSpec:
    given = {"methods": args.methods, "datasets": args.datasets, "seeds": args.seeds, "model": args.model,
             "pretrained": args.pretrained, "data_root": args.data_root}
    mappings = {"set": dict(args.set), "grid": dict(args.grid), "data_options": dict(args.data_option)}
    if args.file:
        return SweepSpec.from_file(args.file, **given, **mappings)
    return SweepSpec(**{k: v for k, v in given.items() if v is not None}, **mappings)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = ExecutorSettings(kind=args.executor, gpus=args.gpus, nodes=args.nodes, parallel=args.parallel,
                                    partition=args.partition, time_min=args.time, cpus_per_task=args.cpus_per_task,
                                    slurm_extra=dict(args.slurm), retries=args.retries)
        sweep = Sweep(_spec(args), executor=settings, runs_dir=args.runs_dir, results_db=args.results_db,
                      logs_dir=args.logs_dir, track=tuple(args.track))
    except (*INPUT_ERRORS, FileNotFoundError, ImportError) as err:
        parser.error(" ".join(str(err).split()))
    if args.dry_run:
        plan = sweep.plan()
        print(plan.drop(columns=["folder"]).to_string(index=False))
        print(f"\n{len(plan)} run(s): " + ", ".join(f"{n} {s}" for s, n in plan.state.value_counts().items()))
        return 0
    if args.gather_only:
        print(sweep.gather())
        return 0
    report = sweep.launch(wait=not args.no_wait)
    if report.gathered is not None:
        print(f"gathered {report.gathered} into {report.results_db} in {report.seconds:.0f} s")
        print(f"compare: rftlib.results.compare(rftlib.results.load({json.dumps(str(report.results_db))})) or "
              f"papermill notebooks/compare.ipynb out.ipynb -p results_db {report.results_db}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
