"""The notebooks' one-call layer: validate parameters, load data and model, run methods.

Each notebook's first code cell holds literal parameters only (papermill injects overrides after
it). The next cell calls :func:`setup` with those values; it checks every knob (range, type,
device) and fails right there with a message naming the bad parameter, so a bad ``-p`` never
wastes a training run. The returned :class:`Session` then loads the dataset (a missing dataset
stops in that cell with the command that prepares it), the model, and runs methods through
:func:`rftlib.methods.run_method` with the session's shared settings.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import devices, knobs
from .axes import Axes
from .progress import MODES, set_progress

log = logging.getLogger(__name__)


class ParameterError(ValueError):
    """A notebook parameter is out of range or malformed; the message names it."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise a device this machine has
    (:func:`rftlib.devices.resolve_device`)."""
    try:
        return devices.resolve_device(device)
    except ValueError as err:
        raise ParameterError(str(err)) from None


def check_knob(name: str, value: Any) -> float:
    """A knob parameter checked against its declaration (:mod:`rftlib.knobs`)."""
    try:
        return knobs.check(name, value)
    except ValueError as err:
        raise ParameterError(str(err)) from None


def check_track(track: Any) -> tuple[str, ...]:
    """The ``track`` parameter as tracker names (:func:`rftlib.tracking.resolve_track`); an unknown
    name fails naming the valid ones, a tracker whose package is missing says what to install."""
    from .registry import UnknownNameError
    from .tracking import resolve_track

    if track is None:
        return ()
    try:
        return resolve_track(track)
    except (UnknownNameError, TypeError) as err:
        raise ParameterError(f"track={track!r} is invalid: {err}") from None


def check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name}={value!r} is invalid: it must be an integer >= 1 (or None for the preset)")
    return value


@dataclass
class Session:
    """Shared settings of one notebook run (see :func:`setup`)."""

    dataset: str
    data_root: str | None
    model: str
    pretrained: str | None
    device: torch.device
    seed: int
    results_db: str | None
    progress: str
    overrides: dict = field(default_factory=dict)
    track: tuple[str, ...] = ()  # experiment trackers of every run (rftlib.tracking)
    knobs: dict = field(default_factory=dict)
    data: Any = None
    clip: Any = None
    method_data: dict = field(default_factory=dict)  # data_for's datasets loaded with a method's options

    def load_data(self, **options):
        """Load the dataset (cached on the session). Missing data raises with the prepare command."""
        from .data import get_dataset

        if self.data is None:
            self.data = get_dataset(self.dataset, root=self.data_root, **options)
        return self.data

    def data_for(self, method: str):
        """The data ``method`` trains on: the session's dataset, or (when the method's paper setting
        implies dataset options, e.g. CRoFT's 16-shot Setup-I on ImageNet) that dataset loaded with
        them (:func:`rftlib.methods.data_options_for`; cached per option set)."""
        from .data import get_dataset
        from .methods import data_options_for

        options = data_options_for(method, self.dataset, seed=self.seed)
        if not options:
            return self.load_data()
        key = tuple(sorted(options.items()))
        if key not in self.method_data:
            self.method_data[key] = get_dataset(self.dataset, root=self.data_root, **options)
        return self.method_data[key]

    def load_model(self):
        """A fresh copy of the pretrained CLIP each call (methods fine-tune the model they get)."""
        from .models import load_clip

        return load_clip(self.model, self.pretrained, device=self.device)

    def run(self, method: str, *, callbacks=(), **overrides):
        """Run a method on the session's data and a fresh model; ``overrides`` go to its config.

        The session's ``epochs``/``batch_size`` reach every method whose config has them (not the
        zero-shot model or the linear probe), and the base run of a method that trains one
        (WiSE-FT's ``base_overrides``) unless it merges a given checkpoint; an explicit override wins.
        """
        from .methods import get_method, run_method
        from .methods.common import config_options

        accepted = config_options(get_method(method).Config)
        shared = {k: v for k, v in self.overrides.items() if k in accepted}
        rest = {k: v for k, v in self.overrides.items() if k not in accepted}
        if rest and "base_overrides" in accepted and not overrides.get("finetuned"):
            overrides = {**overrides, "base_overrides": {**rest, **(overrides.get("base_overrides") or {})}}
        return run_method(method, data=self.data_for(method), clip=self.load_model(), device=self.device,
                          seed=self.seed, results_db=self.results_db, overrides={**shared, **overrides},
                          progress=self.progress, callbacks=callbacks, track=self.track)

    def axes(self) -> Axes:
        """What the session's ID-vs-OOD plots read: each split's headline metric, ``id_test`` on x,
        the mean over the OOD test splits on y (:class:`rftlib.axes.Axes`)."""
        return Axes.from_facts(self.load_data().split_facts())

    def results(self, **filters) -> pd.DataFrame:
        """The results store as a tidy DataFrame (filtered, e.g. ``method="wiseft"``)."""
        from .results import load

        return load(self.results_db, **filters)


def setup(*, dataset: str = "synthwild", data_root: str = "", model: str = "synthclip", pretrained: str = "synthclip",
          epochs: int | None = None, batch_size: int | None = None, seed: int = 0, device: str = "auto",
          results_db: str = "", progress: str = "auto", track: str | list = "", **knob_values: Any) -> Session:
    """Validate a notebook's parameters and return its :class:`Session`.

    Args:
        dataset, data_root: what to load ("" = ``$RFT_DATA_ROOT`` or ``./data``).
        model, pretrained: the CLIP (``pretrained="none"`` = random weights).
        epochs, batch_size: ``None`` keeps each method's preset for the dataset.
        seed: data order and initialisation.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        results_db: SQLite results file ("" = ``$RFT_RESULTS_DB`` or ``rft_runs/results.db``).
        progress: ``auto`` | ``text`` | ``off``.
        track: experiment trackers for every run, e.g. ``"tensorboard"`` or ``"tensorboard,wandb"``
            (a list works too; "" = none; :mod:`rftlib.tracking`).
        **knob_values: method knobs (:data:`rftlib.knobs.KNOBS`), each checked against its range.

    Raises:
        ParameterError: naming the first invalid parameter.
        rftlib.registry.UnknownNameError: unknown dataset (listing the valid ones).
    """
    from .data import DATASETS

    DATASETS.get(dataset)  # unknown names fail here, with the valid ones listed
    if progress not in MODES:
        raise ParameterError(f"progress={progress!r} is invalid; valid: {', '.join(MODES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError(f"seed={seed!r} must be an integer")
    overrides = {}
    if check_positive_int("epochs", epochs) is not None:
        overrides["epochs"] = epochs
    if check_positive_int("batch_size", batch_size) is not None:
        overrides["batch_size"] = batch_size
    for name, value in knob_values.items():
        check_knob(name, value)
    trackers = check_track(track)
    set_progress(progress)
    weights = None if str(pretrained).lower() in ("", "none") else pretrained
    return Session(dataset=dataset, data_root=data_root or None, model=model, pretrained=weights,
                   device=resolve_device(device), seed=seed, results_db=results_db or os.environ.get("RFT_RESULTS_DB"),
                   progress=progress, overrides=overrides, knobs=knob_values, track=trackers)


def unit_grid(points: int) -> list[float]:
    """``points`` evenly spaced values from 0 to 1 (rounded for readable tables)."""
    check_positive_int("grid_points", points, allow_none=False)
    if points < 2:
        raise ParameterError(f"grid_points={points} must be at least 2")
    return [round(float(x), 4) for x in np.linspace(0.0, 1.0, points)]


def id_ood_table(sweep: pd.DataFrame, knob: str, *, axes: Axes | None = None) -> pd.DataFrame:
    """A sweep as a small knob x (ID, OOD) table for display (axes: :func:`rftlib.viz.sweep_axes`)."""
    from .viz import id_ood_points

    return id_ood_points(sweep, knob, axes=axes).set_index(knob).round(4)


def metrics_table(result, *, metric: str | None = None) -> pd.DataFrame:
    """A run's final metrics as a split x metric table (optionally one metric)."""
    table = result.table()
    return table[[metric]] if metric else table


def wiseft_exact(result, session: Session, *, subset: int = 500):
    """A callable ``alpha -> (id, ood)`` that merges the weights at ``alpha`` and evaluates for real
    on the first ``subset`` images of each split the session's axes read (the "Evaluate exactly"
    button of the explorer)."""
    from .data.pipeline import ImageSpec
    from .evaluate import evaluate

    wise, data, axes = result.extra["wise"], session.load_data(), session.axes()
    spec = ImageSpec.of(wise.clip)
    splits = {s: data.split(s).subset(np.arange(min(subset, len(data.split(s))))) for s in axes.splits()}

    def exact(alpha: float) -> tuple[float, float]:
        model = wise.model_at(alpha)
        return axes.values({s: evaluate(model, data, split, spec, device=session.device).metrics
                            for s, split in splits.items()})
    return exact


def latest_runs(session: Session, runs: dict) -> pd.DataFrame:
    """The results-store rows of the given runs (a dict of name -> RunResult)."""
    frame = session.results()
    return frame[frame.run_id.isin([r.run_id for r in runs.values()])]


def ensure_baselines(session: Session, baselines: tuple[str, ...] = ("zeroshot", "finetune")) -> pd.DataFrame:
    """The store's rows for the session's dataset, running any missing baseline method first."""
    frame = session.results(dataset=session.dataset)
    for method in baselines:
        if frame.empty or not (frame.method == method).any():
            log.info("no %s results for %s yet: running it", method, session.dataset)
            session.run(method)
    return session.results(dataset=session.dataset)


def drm_beta_fn(result, session: Session):
    """A callable ``beta -> (id, ood)`` mixing cached logits of a DRM run: one image-encoder pass per
    split the session's axes read, then every slider move is a softmax mix and a metric
    (milliseconds)."""
    from .data.pipeline import ImageSpec
    from .methods.drm import dual_logits, head_logits

    data, model, axes = session.load_data(), result.classifier, session.axes()
    spec = ImageSpec.of(result.clip)
    cached = {s: head_logits(model, data, s, spec, device=session.device) for s in axes.splits()}

    def values(beta: float) -> tuple[float, float]:
        return axes.values({s: data.compute_metrics(s, dual_logits(*logits, float(beta)).argmax(1).numpy())
                            for s, logits in cached.items()})
    return values


def croft_scores(result, session: Session, *, kind: str = "energy", id_split: str = "id_test",
                 ood_split: str = "openset") -> pd.DataFrame:
    """Per-example open-set detection scores of a CRoFT run (ID test vs held-out classes), with the
    run's own ID reference (e.g. only correctly classified ID samples, as CRoFT's release)."""
    from .data.pipeline import ImageSpec
    from .detection import detection_scores

    data = session.load_data()
    return detection_scores(result.classifier, data.split(id_split), {ood_split: data.split(ood_split)},
                            ImageSpec.of(result.clip), kinds=(kind,), device=session.device,
                            id_reference=result.config.id_reference)
