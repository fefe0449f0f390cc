"""Sweeps: a grid of methods x datasets x seeds x settings, run as submitit jobs, one comparison out.

    python -m rftlib.sweep --methods finetune flyp --seeds 0 1 --dataset synthwild --set epochs=1
    python -m rftlib.sweep --file paper_table.toml --executor slurm --partition gpu --gpus 4
    python -m rftlib.sweep --file paper_table.toml --dry-run      # each run and whether it is done
    python -m rftlib.sweep --file iwildcam-vitb16 --data-root data --executor slurm --gpus 4  # a shipped table

From Python::

    from rftlib.sweep import ExecutorSettings, Sweep, SweepSpec
    sweep = Sweep(SweepSpec(methods=["finetune", "flyp"], seeds=[0, 1], set={"epochs": 1}))
    report = sweep.launch()           # follows the jobs, then gathers the records into the store
    rftlib.results.compare(sweep.results_db)

How it fits together:

* :mod:`.grid` expands the grid into runs, each named by the content-addressed run id that
  :func:`rftlib.methods.run_method` will give it, so its folder is known in advance and a finished
  run is recognised from its records without running anything;
* :mod:`.jobs` runs each one as a submitit job (this machine: one job per GPU, or CPU jobs; a
  SLURM cluster: a job array, multi-GPU and multi-node jobs through ``torchrun``); a preempted job
  is requeued and resumes from its last checkpoint;
* :mod:`.driver` launches what is not done, shows queued / running / done / failed with each failed
  run's log, and gathers every run's records (:mod:`rftlib.results.journal`) into the SQLite store
  from this one process: jobs on many nodes never write the SQLite file.
"""

from .driver import Sweep, SweepProgress, SweepReport, folder_status, print_progress
from .grid import SweepRun, SweepSpec, list_tables
from .jobs import EXECUTORS, ExecutorSettings, RunJob

__all__ = ["EXECUTORS", "ExecutorSettings", "RunJob", "Sweep", "SweepProgress", "SweepReport", "SweepRun",
           "SweepSpec", "folder_status", "list_tables", "print_progress"]
