"""Experiment tracking: a run's curves and final metrics in TensorBoard or Weights & Biases.

Off by default. ``run_method(..., track=("tensorboard",))``, ``python -m rftlib.train --track
tensorboard wandb`` or a method notebook's ``track`` parameter (``-p track tensorboard,wandb``) turn
trackers on for a run. Every tracker receives, against one global step:

* ``train/<scalar>``: each optimiser step's scalars from the shared loop (``loss``, ``lr``, the
  method's own loss terms, ``grad_norm`` when clipping, ...), and ``train/epoch`` after each epoch;
* ``eval/<split>/<metric>``: the loop's per-epoch evaluations (ID validation by default);
* ``final/<split>/<metric>``: the run's final metrics (the store's ``final`` rows), at the last
  step, with the run's resolved config (TensorBoard hparams, W&B config);
* ``sweep/<knob>`` and ``sweep/<split>/<metric>``: each point of a method's knob sweep (WiSE-FT's
  alphas, DRM's betas, R-Adapter's scales, DPS's mask ratios), against the point's index, on an axis
  of their own (TensorBoard: ``<run folder>/tb/sweep``; W&B: ``sweep/index``).

**Steps.** A method that trains more than once in one run (DPS's extra mask ratios) gets one
continuous axis: each fit's steps follow the previous fit's last step. A resumed run continues its
steps: TensorBoard writes into the same folder and drops what an interrupted attempt logged past
the checkpoint it resumes from (``purge_step``); W&B continues the same W&B run, which ignores steps
it has already seen.

**Where.** TensorBoard (``pip install 'rftlib[track]'``): ``<run folder>/tb`` holds the curves and
``<run folder>/tb/final`` the hparams and final metrics (replaced when a finished run is evaluated
again); ``tensorboard --logdir rft_runs`` shows every run. W&B (``pip install 'rftlib[wandb]'``):
project ``$WANDB_PROJECT`` (default ``rftlib``), the W&B run named by the rftlib run id, its id kept
in ``<run folder>/wandb_id`` so that a resume continues it and ``force`` starts a new one; files under
``<run folder>/wandb``; ``WANDB_MODE=offline`` works without network.

Only the main rank logs. A base run that a method trains first (WiSE-FT's fine-tuning, DPS's
reference) is tracked as a run of its own, in its own folder, with the enclosing run's trackers;
its events never reach the enclosing run's curves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically
from .dist import current
from .registry import Registry

log = logging.getLogger(__name__)


class TrackerUnavailableError(ImportError):
    """A tracker's package is not installed; the message says which extra installs it."""


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker knows about the run it logs: its id, folder and resolved config (JSON data)."""

    run_id: str
    method: str
    dataset: str
    model: str
    pretrained: str | None
    seed: int
    folder: Path
    config: dict

    def description(self) -> dict:
        """The run's identity and config as one nested dict (W&B config, TensorBoard hparams)."""
        return {"method": self.method, "dataset": self.dataset, "model": self.model,
                "pretrained": str(self.pretrained), "seed": self.seed, "config": self.config}


class Tracker:
    """One tracking backend for one run. Subclasses open their output lazily, at the first value
    they log (so that a resumed run knows the step it resumes from), and must survive ``close``
    being called whether or not anything was logged."""

    package = ""  # what ``require`` imports
    extra = ""    # the rftlib extra that installs it

    def __init__(self, run: TrackedRun):
        self.run = run

    @classmethod
    def require(cls):
        """Import the backend's package, or fail saying how to install it."""
        import importlib

        try:
            return importlib.import_module(cls.package)
        except ImportError as err:
            raise TrackerUnavailableError(f"tracking with {cls.package} needs it installed: pip install "
                                          f"'rftlib[{cls.extra}]' ({err})") from None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def final(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def sweep(self, values: Mapping[str, float], index: int) -> None:
        """One knob-sweep point (``sweep/<knob>``, ``sweep/<split>/<metric>``), the ``index``-th."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


TRACKERS: Registry[type[Tracker]] = Registry("tracker")
_SCOPE: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar("rftlib_tracked_run", default=None)


def resolve_track(track: str | Sequence[str] | None) -> tuple[str, ...]:
    """The tracker names a run uses, checked before any work.

    Args:
        track: names from :data:`TRACKERS` as a sequence or one string (``"tensorboard,wandb"``);
            empty: no tracking; ``None``: the enclosing run's trackers (a base run started inside a
            tracked run is tracked the same way), none at top level.

    Raises:
        rftlib.registry.UnknownNameError: an unknown name (the message lists the valid ones).
        TrackerUnavailableError: a tracker's package is missing (the message says what to install).
    """
    if track is None:
        scope = _SCOPE.get()
        return scope[1] if scope else ()
    parts = re.split(r"[\s,]+", track) if isinstance(track, str) else list(track)
    if not all(isinstance(p, str) for p in parts):
        raise TypeError(f"track={track!r} is invalid: give tracker names ({', '.join(TRACKERS.names())})")
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    for name in names:
        TRACKERS.get(name).require()
    return names


def make_trackers(names: Sequence[str], run: TrackedRun) -> list[Tracker]:
    """One tracker per name for ``run`` (none on a rank other than the main one)."""
    if not current().is_main:
        return []
    return [TRACKERS.get(name)(run) for name in names]


def tracked_run(ctx) -> TrackedRun:
    """A :class:`TrackedRun` from a method's :class:`~rftlib.methods.common.RunContext`."""
    cfg = dataclasses.asdict(ctx.config) if dataclasses.is_dataclass(ctx.config) else dict(ctx.config or {})
    return TrackedRun(ctx.run_id, ctx.method, ctx.dataset.name, ctx.clip.name, ctx.clip.pretrained, ctx.seed,
                      Path(ctx.out_dir), json.loads(json.dumps(cfg, default=str)))


class RunTracking:
    """The training callback that feeds one run's trackers (see the module docstring for the tags).

    ``offset`` is the number of steps of this run's finished fits (each fit's ``end`` event adds its
    length), so the steps of a second fit follow those of the first; ``step`` is the last global step
    seen (where the final metrics go; 0 for a run that trains nothing).
    """

    def __init__(self, run_id: str, trackers: Sequence[Tracker]):
        self.run_id, self.trackers, self.offset, self.step = run_id, list(trackers), 0, 0
        self.points: set[int] = set()  # sweep points whose knob values are logged

    def __call__(self, event) -> None:
        scope = _SCOPE.get()
        if not self.trackers or scope is None or scope[0] != self.run_id:  # a base run's events are its own
            return
        if event.kind == "point":  # a knob-sweep point: its own axis (event.step is the point's index)
            knobs = {} if event.step in self.points else _tagged("sweep", event.data["knobs"])  # once per point
            self.points.add(event.step)
            values = {**knobs, **_tagged(f"sweep/{event.data['split']}", event.data["metrics"])}
            for tracker in self.trackers:
                tracker.sweep(values, event.step)
            return
        step = self.step = self.offset + event.step
        if event.kind == "step":
            self._log(_tagged("train", event.data), step)
        elif event.kind == "eval":
            self._log(_tagged(f"eval/{event.data['split']}", event.data["metrics"]), step)
        elif event.kind == "epoch":
            self._log({"train/epoch": event.epoch + 1}, step)
        elif event.kind == "end":
            self.offset = step

    def final(self, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Log the run's final metrics (split -> {metric: value}) at its last step."""
        values = {k: v for split, m in metrics.items() for k, v in _tagged(f"final/{split}", m).items()}
        for tracker in self.trackers:
            tracker.final(values, self.step)

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker; a tracker that fails to close is reported, not raised."""
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception:  # closing one tracker must not hide the run's own outcome
                log.warning("closing the %s tracker of run %s failed", type(tracker).__name__, self.run_id,
                            exc_info=True)

    def _log(self, values: Mapping[str, float], step: int) -> None:
        if values:
            for tracker in self.trackers:
                tracker.scalars(values, step)


@contextmanager
def track_run(ctx, names: Sequence[str]) -> Iterator[RunTracking]:
    """Track the run of ``ctx`` with ``names`` (from :func:`resolve_track`) while the block runs.

    Adds the :class:`RunTracking` callback to ``ctx.callbacks`` and marks this run as the one being
    tracked (base runs started in the block mark their own); closes every tracker at the end,
    as failed when the block raised. Entered by every run, tracked or not.
    """
    tracking = RunTracking(ctx.run_id, make_trackers(names, tracked_run(ctx)) if names else [])
    ctx.callbacks.append(tracking)
    token = _SCOPE.set((ctx.run_id, tuple(names)))
    failed = True
    try:
        yield tracking
        failed = False
    finally:
        _SCOPE.reset(token)
        tracking.close(failed)


def _tagged(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """``{prefix/key: float}`` for the real numbers among ``values`` (flags and texts left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def flat_hparams(data: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested JSON data as TensorBoard hparams: dotted keys; numbers, flags and texts kept, the rest
    (lists, None) as text."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


class TensorBoardTracker(Tracker):
    """Event files for TensorBoard (``torch.utils.tensorboard``): curves in ``<run folder>/tb``, hparams
    and final metrics in ``<run folder>/tb/final``."""

    package, extra = "tensorboard", "track"

    def __init__(self, run: TrackedRun):
        super().__init__(run)
        self.require()
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class, self.log_dir, self._writer = SummaryWriter, run.folder / "tb", None
        self._sweep_writer = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:  # this process's first step: what an earlier attempt logged from it on is dropped
            self._writer = self._writer_class(str(self.log_dir), purge_step=step)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def final(self, metrics: Mapping[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        with self._writer_class(str(self.log_dir / "final"), purge_step=0) as writer:  # replaces earlier finals
            for summary in hparams(flat_hparams(self.run.description()), dict(metrics)):
                writer.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            writer.add_text("config", f"```\n{json.dumps(self.run.description(), indent=1)}\n```", step)

    def sweep(self, values: Mapping[str, float], index: int) -> None:
        if self._sweep_writer is None:  # a sweep is evaluated whole each time: a new one replaces the old
            self._sweep_writer = self._writer_class(str(self.log_dir / "sweep"), purge_step=0)
        for tag, value in values.items():
            self._sweep_writer.add_scalar(tag, value, index)

    def close(self, failed: bool = False) -> None:
        for writer in (self._writer, self._sweep_writer):
            if writer is not None:
                writer.close()  # flushes
        self._writer = self._sweep_writer = None


class WandbTracker(Tracker):
    """A Weights & Biases run named by the rftlib run id (see the module docstring)."""

    package, extra = "wandb", "wandb"
    ID_FILE = "wandb_id"

    def __init__(self, run: TrackedRun):
        super().__init__(run)
        self._wandb, self._run, self._sweep_axis = self.require(), None, False

    def wandb_id(self) -> str:
        """The W&B run id this run folder uses: kept in ``wandb_id``, so that a resume continues the
        same W&B run; a fresh folder (a new run, or ``force``) gets a new one."""
        path = self.run.folder / self.ID_FILE
        if path.exists():
            return path.read_text().strip()
        wandb_id = f"{self.run.run_id}-{secrets.token_hex(3)}"
        write_text_atomically(path, wandb_id)
        return wandb_id

    def _opened(self):
        if self._run is None:
            self._run = self._wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "rftlib", name=self.run.run_id, id=self.wandb_id(),
                resume="allow", config=self.run.description(), dir=str(self.run.folder),
                tags=[self.run.method, self.run.dataset])
        return self._run

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._opened().log(dict(values), step=step)

    def final(self, metrics: Mapping[str, float], step: int) -> None:
        run = self._opened()
        run.log(dict(metrics), step=step)  # ignored by W&B if a finished run is evaluated again ...
        run.summary.update(dict(metrics))  # ... while the summary always shows the latest

    def sweep(self, values: Mapping[str, float], index: int) -> None:
        run = self._opened()
        if not self._sweep_axis:  # sweep charts against the point's index, not W&B's step
            run.define_metric("sweep/*", step_metric="sweep/index")
            self._sweep_axis = True
        run.log({"sweep/index": index, **values})

    def close(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None


TRACKERS.register("tensorboard", TensorBoardTracker)
TRACKERS.register("wandb", WandbTracker)

__all__ = ["TRACKERS", "RunTracking", "TensorBoardTracker", "TrackedRun", "Tracker", "TrackerUnavailableError",
           "WandbTracker", "make_trackers", "resolve_track", "track_run"]
