"""How one sweep run executes inside a submitit job, and the executors that start those jobs.

* :class:`RunJob` is what submitit pickles and calls. It runs ``python -m rftlib.train`` with the
  run's arguments (in the job's own process for a one-GPU or CPU job; through ``torchrun`` for
  several GPUs or nodes, the way a user starts DDP), with ``RFT_RESULTS_SINK=folder`` so the run
  writes only its own records (:mod:`rftlib.results.journal`) and ``RFT_RUNS_DIR`` so its folder
  is the one the sweep planned. A preempted or timed-out SLURM job is requeued by submitit
  (:meth:`RunJob.checkpoint`); it then resumes from its last checkpoint, as any rftlib run does.
* :class:`ExecutorSettings` holds where jobs run: ``local`` (this machine; one job per listed GPU,
  or ``parallel`` CPU jobs) or ``slurm`` (partition, GPUs per node, nodes, time limit, array
  parallelism, extra sbatch parameters).

Several nodes: each node runs one task, which starts ``torchrun`` with a c10d rendezvous on the
job's first node (the README's sweep section shows the same recipe as a plain sbatch script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results.journal import SINK_ENV_VAR
from ..results.store import RUNS_ENV_VAR
from .grid import SweepRun

EXECUTORS = ("local", "slurm")
RDZV_PORT = 29500


@dataclass
class ExecutorSettings:
    """Where a sweep's jobs run.

    Args:
        kind: ``local`` or ``slurm``.
        gpus: GPUs per node each job uses (0: CPU jobs).
        nodes: nodes per job (``slurm`` only; above 1 the run is one multi-node DDP job).
        parallel: ``local``: jobs at once (default: one per visible GPU, else 1); ``slurm``: the
            job array's parallelism (default 256, submitit's).
        visible_gpus: ``local``: the GPU indices to share out (default: all CUDA sees).
        partition, time_min, cpus_per_task, slurm_extra: ``slurm`` submission parameters
            (``slurm_extra``: further sbatch parameters, e.g. ``{"account": "abc"}``).
        device: ``--device`` of the runs (default ``cuda`` with GPUs, else ``cpu``).
        retries: how often the sweep resubmits a job that failed (not counting submitit's own
            requeues after preemption or timeouts).
        python: the interpreter jobs run (default: this one).
    """

    kind: str = "local"
    gpus: int = 0
    nodes: int = 1
    parallel: int | None = None
    visible_gpus: tuple[int, ...] | None = None
    partition: str | None = None
    time_min: int = 24 * 60
    cpus_per_task: int | None = None
    slurm_extra: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    retries: int = 1
    python: str = sys.executable

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}; valid: {', '.join(EXECUTORS)}")
        for name in ("gpus", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.nodes < 1 or (self.parallel is not None and self.parallel < 1):
            raise ValueError("nodes and parallel must be >= 1")
        if self.kind == "local" and self.nodes != 1:
            raise ValueError("the local executor runs on this machine only (nodes=1); use --executor slurm")
        if self.nodes > 1 and self.gpus < 1:
            raise ValueError("a multi-node job needs GPUs (--gpus N)")
        if self.device is None:
            self.device = "cuda" if self.gpus else "cpu"

    def threads_per_job(self) -> int | None:
        """``local`` CPU jobs: this machine's cores shared out among the jobs running at once (jobs
        that each take every core slow each other down many times over); None otherwise."""
        if self.kind != "local" or self.gpus:
            return None
        return max(1, (os.cpu_count() or 1) // (self.parallel or 1))

    def gpu_slots(self) -> list[tuple[int, ...]]:
        """``local``: the GPU sets jobs take in turn (one set per concurrent job); [()] for CPU jobs."""
        if not self.gpus:
            return [()] * (self.parallel or 1)
        visible = self.visible_gpus if self.visible_gpus is not None else tuple(range(_cuda_count()))
        slots = [tuple(visible[i:i + self.gpus]) for i in range(0, len(visible) - self.gpus + 1, self.gpus)]
        if not slots:
            raise ValueError(f"{self.gpus} GPU(s) per job, but only {len(visible)} visible: {visible}")
        return slots[:self.parallel] if self.parallel else slots

    def slurm_parameters(self, name: str) -> dict[str, Any]:
        """submitit's ``SlurmExecutor`` parameters for this sweep's jobs: one task per node (torchrun
        starts the ranks), the GPUs, time limit and array parallelism; ``slurm_extra`` last."""
        params = {"job_name": name, "time": self.time_min, "nodes": self.nodes, "ntasks_per_node": 1,
                  "array_parallelism": self.parallel or 256}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.partition:
            params["partition"] = self.partition
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        return {**params, **self.slurm_extra}


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass
class RunJob:
    """One sweep run as a submitit job (pickled to the job; called there)."""

    run: SweepRun
    results_db: str
    runs_dir: str
    device: str
    gpus: int = 0
    nodes: int = 1
    track: tuple[str, ...] = ()
    threads: int | None = None

    def environment(self) -> dict[str, str]:
        """What the run's process sees: its records go to its folder only, under the sweep's runs dir,
        with its share of the CPU threads (the executor sets ``CUDA_VISIBLE_DEVICES`` to its GPUs)."""
        env = {SINK_ENV_VAR: "folder", RUNS_ENV_VAR: self.runs_dir}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def train_args(self) -> list[str]:
        """``python -m rftlib.train`` arguments (the run's own plus where it writes and on what)."""
        tracking = ["--track", *self.track] if self.track else []
        return [*self.run.cli_args(), "--results-db", self.results_db, "--device", self.device,
                "--progress", "text", *tracking]

    def command(self, head_node: str | None = None, job_id: str = "0") -> list[str] | None:
        """The ``torchrun`` command of a multi-GPU or multi-node job (None: the run needs one process)."""
        if self.gpus <= 1 and self.nodes == 1:
            return None
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.gpus)]
        if self.nodes == 1:
            launcher += ["--standalone"]
        else:
            launcher += ["--nnodes", str(self.nodes), "--rdzv_backend", "c10d", "--rdzv_id", job_id,
                         "--rdzv_endpoint", f"{head_node}:{RDZV_PORT}"]
        return [*launcher, "-m", "rftlib.train", *self.train_args()]

    def __call__(self) -> str:
        os.environ.update(self.environment())
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # torch was imported before OMP_NUM_THREADS was set
        command = self.command(*_head_node_and_job())
        if command is None:
            from ..cli import main

            main(self.train_args())
        else:
            subprocess.run(command, check=True)
        return self.run.run_id

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption or timeout: requeue the same job (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _head_node_and_job() -> tuple[str | None, str]:
    """The job's first node and id, from submitit's job environment (a local job: none, ``0``)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (a direct call)
        return None, "0"
    return env.hostnames[0], str(env.job_id)


def make_executor(settings: ExecutorSettings, logs: Path, name: str = "rftlib-sweep"):
    """A submitit executor writing its job logs under ``logs`` (for ``local``, the GPUs of each job
    are set per submission: :meth:`ExecutorSettings.gpu_slots`)."""
    import submitit

    if settings.kind == "local":
        executor = submitit.LocalExecutor(folder=str(logs))
        executor.update_parameters(timeout_min=settings.time_min)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=str(logs), python=settings.python)
    except RuntimeError as err:  # submitit: no srun on PATH
        raise RuntimeError(f"the slurm executor needs SLURM's srun and sbatch on PATH ({err}); run the sweep on "
                           "the cluster's login node, or use --executor local") from None
    executor.update_parameters(**settings.slurm_parameters(name))
    return executor


__all__ = ["EXECUTORS", "ExecutorSettings", "RunJob", "make_executor"]
