"""What every method run shares: the run context, the result, config resolution, and how a
method's evaluation model is built from weights.

:func:`rftlib.methods.run_method` builds a :class:`RunContext` (model, data, device, results
store, run id, checkpoint folder, callbacks) and hands it with a resolved config to the method's
``run(ctx, cfg)``. Configs are dataclasses with per-dataset presets; overrides are flat
``key=value`` pairs that may name a field of the method config or of its embedded
:class:`~rftlib.train.TrainConfig` (``epochs``, ``lr``, ...). A config recorded with a checkpoint
or a run comes back with :func:`config_from_record`.

A method's *evaluation model* is what it evaluates: image in, logits out. Tools that change a
method's weights after the fact (WiSE-FT's merge) must rebuild that model around the new weights,
so the method interface declares it as a :data:`ClassifierBuilder`
``build_classifier(clip, state, dataset, cfg)``; a method that declares none is evaluated by
:func:`single_head_classifier` (its checkpoint's head, or a zero-shot head). A model that must know
which split it is evaluated on (DRM masks each head to ImageNet-R/A's 200 classes before mixing)
is a :class:`~rftlib.models.SplitAwareClassifier`; :func:`rftlib.evaluate.evaluate` hands it the split.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data.base import ROLES, RFTDataset
from ..data.loading import LoaderSettings
from ..data.pipeline import ImageSpec
from ..evaluate import EvalResult, evaluate
from ..models import ClipModel, ImageClassifier, ZeroShotHead, build_zeroshot_head
from ..registry import UnknownNameError
from ..results.journal import RunRecorder
from ..runs import RunFolder
from ..train import Event, FitResult, TrainConfig, fit

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a method needs besides its config."""

    clip: ClipModel
    dataset: RFTDataset
    device: torch.device
    store: RunRecorder
    run_id: str
    method: str
    seed: int = 0
    out_dir: Path | None = None
    callbacks: list[Callable] = field(default_factory=list)
    progress: str | None = None
    config: Any = None
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    folder: RunFolder | None = None  # the run folder this process holds (main rank)
    sweep_points: dict = field(default_factory=dict, repr=False)  # knob values -> index of the sweep point

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec.of(self.clip)

    def fit(self, task, train: TrainConfig, *, callbacks: Sequence[Callable] | None = None,
            out_dir: Path | None = None) -> FitResult:
        """Train ``task`` with the shared loop on this run's data, model, device and loader settings.

        Args:
            train: the optimisation settings (the method config's ``train``).
            callbacks: the method's own event handlers (default: per-epoch evaluations go to the
                results store); the run's callbacks (live plots) always follow them.
            out_dir: checkpoint folder (default: the run's own, ``self.out_dir``).
        """
        own = [self.results_logger()] if callbacks is None else list(callbacks)
        return fit(task, self.dataset, train, spec=self.spec, device=self.device,
                   out_dir=out_dir if out_dir is not None else self.out_dir, callbacks=[*own, *self.callbacks],
                   progress_mode=self.progress, loader=self.loader)

    def eval_splits(self) -> list[str]:
        """The ID and OOD evaluation splits (everything but train and open-set)."""
        return [n for n, s in self.dataset.splits.items() if s.role in ("id", "ood")]

    def evaluate_split(self, model: nn.Module, split: str) -> EvalResult:
        """Evaluate ``model`` on ``split`` without logging anything (a
        :class:`~rftlib.models.SplitAwareClassifier` as its view of that split: :func:`rftlib.evaluate.evaluate`)."""
        return evaluate(model, self.dataset, split, self.spec, device=self.device, settings=self.loader,
                        progress_mode=self.progress)

    def evaluate(self, model: nn.Module, split: str, *, kind: str = "final", knobs: Mapping[str, float] | None = None,
                 epoch: int | None = None) -> EvalResult:
        """Evaluate ``model`` on ``split`` and log its metrics as rows of ``kind`` at ``knobs``."""
        res = self.evaluate_split(model, split)
        self.log(res.split, res.role, res.metrics, kind=kind, knobs=knobs, epoch=epoch)
        return res

    def evaluate_all(self, model: nn.Module, splits: list[str] | None = None, *, kind: str = "final",
                     knobs: Mapping[str, float] | None = None, epoch: int | None = None) -> dict[str, EvalResult]:
        """Evaluate on every ID/OOD split (or ``splits``) and log the metrics (as the run's final
        rows unless ``kind`` says otherwise)."""
        return {s: self.evaluate(model, s, kind=kind, knobs=knobs, epoch=epoch) for s in (splits or self.eval_splits())}

    def log(self, split: str, role: str, metrics: Mapping[str, float], *, kind: str = "final",
            knobs: Mapping[str, float] | None = None, epoch: int | None = None) -> None:
        """Write one tidy row per metric to the results store (see :data:`rftlib.results.ROW_KINDS`)."""
        if metrics:
            self.store.log_metrics(self.run_id, dict(metrics), split=split, role=role, kind=kind, knobs=knobs,
                                   epoch=epoch)

    def evaluate_point(self, model: nn.Module, knobs: Mapping[str, float], *, splits: Sequence[str] | None = None,
                       report: bool = False, epoch: int | None = None) -> list[dict]:
        """One sweep point: ``model`` (the method at ``knobs``) evaluated on every ID/OOD split (or
        ``splits``), each logged with :meth:`log_point`; returns the sweep table's rows."""
        rows = []
        for split in splits or self.eval_splits():
            rows += self.log_point(knobs, self.evaluate_split(model, split), report=report, epoch=epoch)
        return rows

    def log_point(self, knobs: Mapping[str, float], res: EvalResult, *, report: bool = False,
                  epoch: int | None = None) -> list[dict]:
        """Log one sweep point (a split's metrics at ``knobs``), also as the run's final rows when it
        is the value the run ``report``s, and return it as tidy rows for a sweep table."""
        self.log(res.split, res.role, res.metrics, kind="sweep", knobs=knobs, epoch=epoch)
        index = self.sweep_points.setdefault(tuple(sorted(knobs.items())), len(self.sweep_points))
        self.emit(Event("point", index, epoch or 0, {"knobs": dict(knobs), "split": res.split,
                                                     "metrics": dict(res.metrics)}))
        if report:
            self.log(res.split, res.role, res.metrics, kind="final", knobs=knobs, epoch=epoch)
        return tidy_rows(self.dataset, knobs, res.split, res.role, res.metrics)

    def emit(self, event: Event) -> None:
        """Send ``event`` to the run's callbacks (the loop sends its own; a sweep point is a ``point``)."""
        for callback in self.callbacks:
            callback(event)

    def results_logger(self, knobs: Mapping[str, float] | None = None) -> Callable:
        """A training callback that logs every per-epoch evaluation (at the run's ``knobs``)."""
        def on_event(event) -> None:
            if event.kind == "eval":
                self.log(event.data["split"], event.data["role"], event.data["metrics"], kind="epoch", knobs=knobs,
                         epoch=event.epoch)
        return on_event

    def conclude(self, model: nn.Module, fitted: FitResult, *, knobs: Mapping[str, float] | None = None,
                 metrics: Mapping[str, Mapping[str, float]] | None = None, **extra) -> RunResult:
        """The run's result after :meth:`fit`: ``model`` evaluated on every split as the final rows
        (unless ``metrics`` were already logged, e.g. by a sweep), its best checkpoint, and
        ``extra`` plus the fit's ``best_epoch`` and ``history``."""
        if metrics is None:
            metrics = metrics_of(self.evaluate_all(model, knobs=knobs, epoch=fitted.best_epoch))
        return RunResult(self.run_id, self.method, self.dataset.name, dict(metrics), classifier=model,
                         checkpoint=fitted.best_checkpoint, clip=self.clip,
                         extra={"best_epoch": fitted.best_epoch, "history": fitted.history, **extra})

    def run_base(self, method: str, overrides: Mapping[str, Any] | None = None, *, folder: str | None = None,
                 label: bool = True) -> RunResult:
        """Run ``method`` as this run's base (WiSE-FT's fine-tuned end point, DPS's reference) on a
        copy of the pretrained model, in ``<out_dir>/<folder or method>`` so that it resumes with
        this run (the base run is content-addressed and recorded like any other).

        Args:
            label: record ``method`` as this run's ``base_method``, so that comparisons tell this
                run's method over one base from the same method over another (WiSE-FT over FLYP vs
                over fine-tuning). DPS does not: its reference only ranks the rows to freeze.
        """
        from . import run_method

        if label:
            self.store.set_base_method(self.run_id, method)
        out_dir = self.out_dir / (folder or method) if self.out_dir is not None else None
        return run_method(method, data=self.dataset, clip=copy.deepcopy(self.clip), device=self.device,
                          seed=self.seed, results_db=str(self.store.path), out_dir=out_dir, progress=self.progress,
                          callbacks=self.callbacks, overrides=overrides, loader=self.loader)


# --------------------------------------------------------------------------------------------------
# A method's evaluation model, rebuilt around given weights
# --------------------------------------------------------------------------------------------------
ClassifierBuilder = Callable[[ClipModel, Mapping[str, torch.Tensor], RFTDataset, Any], nn.Module]
"""``build_classifier(clip, state, dataset, cfg) -> nn.Module``: a method's evaluation model.

The optional entry of the method interface (:mod:`rftlib.methods`) that says how the method turns
weights into the model it evaluates, for weights it did not produce itself (WiSE-FT's merge of its
checkpoint with the zero-shot CLIP):

* ``clip``: a CLIP of the method's architecture already holding the weights (the checkpoint's CLIP
  tensors, or their merge);
* ``state``: the checkpoint's other tensors (keyed as in the checkpoint: ``head.weight``,
  ``head.bias``; empty for a method whose checkpoint is the CLIP alone), merged likewise;
* ``dataset``: the data it is evaluated on (class names, templates, descriptions, projections);
* ``cfg``: the method's config, as recorded with the checkpoint or the run.

It must share ``clip``'s towers (no copies): the caller reloads the weights and builds again.
"""


def head_classifier(clip: ClipModel, state: Mapping[str, torch.Tensor], classnames: Sequence[str],
                    templates: Sequence[str]) -> ImageClassifier:
    """``clip``'s image tower with the checkpoint's head (``state["head.weight"]``/``["head.bias"]``), or,
    for a checkpoint without one (contrastive tuning: FLYP), a zero-shot head built from ``clip``'s
    text tower and logit scale with ``templates``."""
    if "head.weight" in state:
        head = ZeroShotHead(state["head.weight"].float(), state["head.bias"].float())
    else:
        head = build_zeroshot_head(clip, classnames, templates)
    return ImageClassifier(clip.visual, head.to(clip.device))


def single_head_classifier(clip: ClipModel, state: Mapping[str, torch.Tensor], dataset: RFTDataset,
                           cfg: Any = None) -> ImageClassifier:
    """The :data:`ClassifierBuilder` of a method that declares none: one head
    (:func:`head_classifier` with the dataset's class names and templates); ``cfg`` is not read."""
    return head_classifier(clip, state, dataset.classnames, dataset.templates)


def tidy_rows(dataset: RFTDataset, knobs: Mapping[str, float], split: str, role: str,
              metrics: Mapping[str, float]) -> list[dict]:
    """One split's metrics at ``knobs`` as rows of a sweep table; ``headline`` marks the split's
    headline metric (what :func:`rftlib.viz.sweep_axes` plots)."""
    headline = dataset.headline_metric(split) if split in dataset.splits else None
    return [{**knobs, "split": split, "role": role, "metric": m, "value": v, "headline": m == headline}
            for m, v in metrics.items()]


def refuse_accumulation(train: TrainConfig, method: str) -> None:
    """Contrastive losses take their negatives from the whole batch: under gradient accumulation
    each micro-step would see only ``batch_size / accum_steps`` of them, a different objective from
    the papers'. Refuse the combination (features are gathered across DDP ranks, so more GPUs keep
    the full batch)."""
    if train.accum_steps > 1:
        raise ValueError(f"accum_steps={train.accum_steps} with {method}: its contrastive loss takes negatives "
                         f"from the whole batch, and each micro-step would see only batch_size/"
                         f"{train.accum_steps} of them. Use accum_steps=1 (features are gathered across GPUs, "
                         "so more ranks keep the full batch) or a batch_size that fits")


def sweep_table(rows: Sequence[Mapping[str, Any]], knob: str) -> pd.DataFrame:
    """Sweep rows (:func:`tidy_rows`) as a frame: ``knob, split, role, metric, value, headline``."""
    return pd.DataFrame(list(rows), columns=[knob, "split", "role", "metric", "value", "headline"])


def metrics_at(table: pd.DataFrame, knob: str, value: float) -> dict[str, dict[str, float]]:
    """A sweep table's metrics at one knob value, as ``split -> {metric: value}`` (dataset splits
    only: a method's own facts, such as DPS's ``mask`` rows, are left out)."""
    at = table[(table[knob] == float(value)) & table["role"].isin(ROLES)]
    return {split: dict(zip(g.metric, g.value, strict=True)) for split, g in at.groupby("split", sort=False)}


@dataclass
class RunResult:
    """What a method run returns.

    Attributes:
        run_id, method, dataset: identity of the run (rows in the results store carry the run id).
        metrics: split -> {metric: value} of the final model.
        classifier: the final image classifier (image -> logits), ready to evaluate.
        checkpoint: the saved weights (``None`` if nothing was trained or saved).
        clip: the (possibly fine-tuned) CLIP.
        extra: method-specific outputs (a sweep table, the chosen C, masks, ...).
        config: the resolved method config the run used.
    """

    run_id: str
    method: str
    dataset: str
    metrics: dict[str, dict[str, float]]
    classifier: nn.Module | None = None
    checkpoint: Path | None = None
    clip: ClipModel | None = None
    extra: dict = field(default_factory=dict)
    config: Any = None

    def table(self) -> pd.DataFrame:
        """Metrics as a split x metric table."""
        return pd.DataFrame(self.metrics).T

    def summary(self) -> dict:
        return {"run_id": self.run_id, "method": self.method, "dataset": self.dataset,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "metrics": self.metrics}


def metrics_of(results: Mapping[str, EvalResult]) -> dict[str, dict[str, float]]:
    return {name: res.metrics for name, res in results.items()}


def resolve_config(config_cls: type, presets: Mapping[str, Mapping[str, Any]], dataset: str,
                   overrides: Mapping[str, Any] | None = None):
    """Defaults, then the dataset's preset, then user overrides (flat or ``train.key``)."""
    cfg = config_cls()
    for source in (presets.get(dataset, {}), overrides or {}):
        for key, value in source.items():
            cfg = _apply(cfg, key, value)
    return cfg


def apply_overrides(cfg, overrides: Mapping[str, Any] | None):
    """``cfg`` with ``overrides`` applied (flat or ``train.key`` names, as :func:`resolve_config`); the
    config's own checks run again. An unknown name raises with the list of valid options."""
    for key, value in (overrides or {}).items():
        cfg = _apply(cfg, key, value)
    return cfg


def config_from_record(config_cls: type, record: Mapping[str, Any]):
    """Rebuild a method config from its JSON record (a checkpoint sidecar's ``method_config``, a run's
    stored config): nested configs become their dataclasses again, JSON lists become tuples where
    the field holds a tuple, and the config's checks run.

    Raises:
        UnknownNameError: the record has a field the config does not (written by another version of
            the method); the message names it and the valid fields.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"a {config_cls.__name__} record is a JSON object, got {type(record).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise UnknownNameError(f"recorded {config_cls.__name__} has fields {unknown} that this version does not "
                               f"know; valid fields: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_cls)
    default = config_cls()
    values = {}
    for name, value in record.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            value = config_from_record(type(current), value)
        elif isinstance(value, list) and _holds_tuple(hints.get(name)):
            value = tuple(value)
        values[name] = value
    return config_cls(**values)


def _holds_tuple(hint: Any) -> bool:
    """Whether a field annotation is ``tuple[...]`` or a union with one (``tuple[str, ...] | None``)."""
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_holds_tuple(arg) for arg in typing.get_args(hint))
    return False


def _apply(cfg, key: str, value: Any):
    names = {f.name for f in dataclasses.fields(cfg)}
    head, _, rest = key.partition(".")
    if rest and head in names:
        return dataclasses.replace(cfg, **{head: _apply(getattr(cfg, head), rest, value)})
    if key in names:
        current = getattr(cfg, key)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        return dataclasses.replace(cfg, **{key: value})
    for name in names:  # a field of a nested config (e.g. train.epochs given as epochs)
        sub = getattr(cfg, name)
        if dataclasses.is_dataclass(sub) and key in {f.name for f in dataclasses.fields(sub)}:
            return dataclasses.replace(cfg, **{name: _apply(sub, key, value)})
    valid = ", ".join(sorted(config_options(cfg)))
    raise UnknownNameError(f"unknown option {key!r} for {type(cfg).__name__}; valid options: {valid}")


def config_options(cfg) -> set[str]:
    """The flat override names a config (class or instance) accepts: its fields and those of its
    nested configs (``epochs`` for ``train.epochs``)."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    names = {f.name for f in dataclasses.fields(cfg)}
    for name in list(names):
        sub = getattr(cfg, name)
        if dataclasses.is_dataclass(sub):
            names |= {f.name for f in dataclasses.fields(sub)}
    return names
