"""The sweep driver: plan the grid, launch what is not done, follow the jobs, gather the records.

One process (this one) launches and follows the jobs and, at the end, gathers every run folder's
records into the SQLite store (:func:`rftlib.results.journal.gather`); the jobs themselves never
touch the store. Running the same sweep again launches only the runs that are not done: a run
killed mid-way resumes from its last checkpoint, a finished one is not touched.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import write_text_atomically
from ..results import ResultsStore, resolve_path
from ..results import runs_dir as default_runs_dir
from ..results.journal import GatherReport, RunJournal, gather
from ..runs import RunFolder
from .grid import SweepRun, SweepSpec
from .jobs import ExecutorSettings, RunJob, make_executor

log = logging.getLogger(__name__)
STATES = ("done", "queued", "running", "failed")
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")
LEDGER = "jobs.json"
"""In the logs folder: the SLURM job each run was last submitted as, so that running the sweep again
does not submit a run whose job is still queued or running."""


def folder_status(folder: Path) -> str:
    """A run folder's state from its records and lock: ``new`` (no records), ``running`` (its lock is
    held now), ``interrupted`` (started, not finished, nobody holds it), ``failed`` or ``done``."""
    status = RunJournal(folder, writer=False).status()
    if status is None:
        return "new"
    if status == "running" or status == "failed":
        return "running" if RunFolder(folder).in_use() else ("interrupted" if status == "running" else "failed")
    return status


@dataclass
class RunState:
    """A run's place in this launch: its state, submissions so far and its current job."""

    run: SweepRun
    state: str = "queued"
    attempts: int = 0
    job: object | None = None
    log: str | None = None
    error: str | None = None


@dataclass
class SweepProgress:
    """What a progress callback receives after each change: every run's state."""

    runs: list[RunState]
    skipped: int = 0
    elsewhere: int = 0

    def counts(self) -> dict[str, int]:
        found = Counter(r.state for r in self.runs)
        return {state: found.get(state, 0) for state in STATES}

    def line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        notes = [f"{self.skipped} done before"] * bool(self.skipped)
        notes += [f"{self.elsewhere} queued or running in an earlier launch"] * bool(self.elsewhere)
        already = f" ({', '.join(notes)})" if notes else ""
        return f"[sweep {time.strftime('%H:%M:%S')}] {len(self.runs)} run(s){already}: {counts}"


def print_progress(progress: SweepProgress) -> None:
    """The default progress report: one line of counts, and each newly failed run with its log."""
    print(progress.line(), flush=True)
    for state in progress.runs:
        if state.state == "failed" and state.error:
            print(f"  failed: {state.run.label()} ({state.run.run_id}): {state.error}", flush=True)
            print(f"    log: {state.log}", flush=True)
            state.error = None  # reported once


@dataclass
class SweepReport:
    """The outcome of :meth:`Sweep.launch`: every run's final state and what was gathered."""

    states: list[RunState]
    skipped: list[SweepRun]
    gathered: GatherReport | None
    seconds: float
    results_db: Path
    counts: dict[str, int] = field(default_factory=dict)
    elsewhere: list[SweepRun] = field(default_factory=list)

    @property
    def failed(self) -> list[RunState]:
        return [s for s in self.states if s.state == "failed"]


class Sweep:
    """A grid of runs to launch through submitit (see :mod:`rftlib.sweep`).

    Args:
        spec: the grid.
        executor: where jobs run (default: local, CPU, one at a time).
        runs_dir: the run folders (default :func:`rftlib.results.runs_dir`).
        results_db: the SQLite store the records are gathered into (default: the usual one).
        logs_dir: submitit's job logs (default ``<runs_dir>/sweep-logs``).
        track: experiment trackers every run sends its curves to (:mod:`rftlib.tracking`).
    """

    def __init__(self, spec: SweepSpec, *, executor: ExecutorSettings | None = None, runs_dir: str | Path | None = None,
                 results_db: str | Path | None = None, logs_dir: str | Path | None = None,
                 track: str | tuple[str, ...] = ()):
        from ..tracking import resolve_track

        self.spec = spec
        self.track = resolve_track(track)  # an unknown or uninstalled tracker fails before any job
        self.executor = executor or ExecutorSettings()
        self.runs_dir = Path(runs_dir).absolute() if runs_dir is not None else default_runs_dir()
        self.results_db = resolve_path(results_db)
        self.logs_dir = Path(logs_dir) if logs_dir is not None else self.runs_dir / "sweep-logs"
        self.runs = spec.expand()

    def folder(self, run: SweepRun) -> Path:
        return self.runs_dir / run.run_id

    def plan(self) -> pd.DataFrame:
        """One row per run: id, label, state (:func:`folder_status`) and folder (``--dry-run``)."""
        rows = [{"run_id": r.run_id, "run": r.label(), "state": folder_status(self.folder(r)),
                 "folder": str(self.folder(r))} for r in self.runs]
        return pd.DataFrame(rows, columns=["run_id", "run", "state", "folder"])

    def gather(self) -> GatherReport:
        """Gather every run folder's records into the results store (this process only)."""
        return gather(self.runs_dir, ResultsStore(self.results_db, writer=True))

    def launch(self, *, wait: bool = True, poll_s: float = 2.0,
               progress: Callable[[SweepProgress], None] | None = print_progress) -> SweepReport:
        """Launch every run that is not done; with ``wait``, follow them to the end (resubmitting
        failures up to ``executor.retries`` times) and gather the records into the store."""
        start = time.perf_counter()
        status = {r.run_id: folder_status(self.folder(r)) for r in self.runs}
        skipped = [r for r in self.runs if status[r.run_id] == "done"]
        elsewhere = [r for r in self.runs if status[r.run_id] == "running" or
                     (status[r.run_id] != "done" and self._still_queued(r))]
        states = [RunState(r) for r in self.runs if r not in skipped and r not in elsewhere]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        executor = make_executor(self.executor, self.logs_dir)
        if self.executor.kind == "local":
            self._follow_local(executor, states, (skipped, elsewhere), wait, poll_s, progress)
        else:
            self._follow_cluster(executor, states, (skipped, elsewhere), wait, poll_s, progress)
        gathered = self.gather() if wait else None
        return SweepReport(states, skipped, gathered, time.perf_counter() - start, self.results_db,
                           SweepProgress(states).counts(), elsewhere)

    def _still_queued(self, run: SweepRun) -> bool:
        """Whether ``run``'s SLURM job from an earlier launch is still queued or running (sacct)."""
        job_id = self._ledger().get(run.run_id)
        if self.executor.kind != "slurm" or job_id is None:
            return False
        import submitit

        try:
            state = submitit.SlurmJob(folder=self.logs_dir, job_id=job_id).get_info(mode="force").get("State", "")
        except Exception as err:  # no sacct, or it failed: launching again is the safe side
            log.warning("could not ask SLURM about job %s of run %s (%s); launching it again", job_id,
                        run.run_id, err)
            return False
        return state.split(" ")[0] in ACTIVE_SLURM_STATES

    def _ledger(self) -> dict[str, str]:
        path = self.logs_dir / LEDGER
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record_jobs(self, states: list[RunState]) -> None:
        """Add the submitted jobs to the ledger (run id -> SLURM job id)."""
        ledger = {**self._ledger(), **{s.run.run_id: str(s.job.job_id) for s in states if s.job is not None}}
        write_text_atomically(self.logs_dir / LEDGER, json.dumps(ledger, indent=1, sort_keys=True))

    # ----------------------------------------------------------------------------- following jobs
    def _job(self, run: SweepRun) -> RunJob:
        return RunJob(run, str(self.results_db), str(self.runs_dir), self.executor.device, self.executor.gpus,
                      self.executor.nodes, self.track, self.executor.threads_per_job())

    def _follow_local(self, executor, states, left_out, wait, poll_s, progress) -> None:
        """Keep one job per GPU slot (or ``parallel`` CPU jobs) running until every run ends."""
        free = list(self.executor.gpu_slots())
        slot_of: dict[int, tuple[int, ...]] = {}
        changed = True
        while True:
            for i, state in enumerate(states):
                if state.state == "queued" and free:
                    slot = free.pop(0)
                    executor.update_parameters(visible_gpus=slot, gpus_per_node=len(slot))
                    self._submit(executor, state)
                    slot_of[i], changed = slot, True
            for i, state in enumerate(states):
                if state.state == "running" and state.job.done():
                    self._settle(state)
                    free.append(slot_of.pop(i))
                    changed = True
            if changed and progress:
                progress(SweepProgress(states, *map(len, left_out)))
            changed = False
            if not wait or not any(s.state in ("queued", "running") for s in states):
                return
            time.sleep(poll_s)

    def _follow_cluster(self, executor, states, left_out, wait, poll_s, progress) -> None:
        """Submit every run as one job array, then follow them (resubmitting failures)."""
        if states:
            with executor.batch():
                for state in states:
                    self._submit(executor, state, batched=True)
        for state in states:  # job ids (and so log paths) exist once the array is submitted
            state.log = str(state.job.paths.stderr)
        self._record_jobs(states)
        while True:
            if progress:
                progress(SweepProgress(states, *map(len, left_out)))
            if not wait:
                return
            pending = [s for s in states if s.state == "running"]
            if not pending:
                return
            time.sleep(poll_s)
            for state in pending:
                if state.job.done():
                    self._settle(state)
                    if state.state == "queued":
                        self._submit(executor, state)
                        self._record_jobs([state])

    def _submit(self, executor, state: RunState, batched: bool = False) -> None:
        state.job = executor.submit(self._job(state.run))
        state.attempts += 1
        state.state = "running"
        if not batched:
            state.log = str(state.job.paths.stderr)

    def _settle(self, state: RunState) -> None:
        """A finished job: ``done`` if its run's records say so, else requeued (retries left) or failed."""
        state.log = str(state.job.paths.stderr)
        error = None
        try:
            state.job.result()
        except Exception as err:  # the job's exception, or submitit's report of a dead job
            error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if error is None and folder_status(self.folder(state.run)) == "done":
            state.state = "done"
            return
        state.error = error or "the job ended but its run did not record 'done'"
        state.state = "queued" if state.attempts <= self.executor.retries else "failed"
        log.warning("run %s: %s (attempt %d)", state.run.run_id, state.error, state.attempts)
