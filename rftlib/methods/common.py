"""What every method run shares: the run context, the result, and config resolution.

:func:`rftlib.methods.run_method` builds a :class:`RunContext` (model, data, device, results
store, run id, checkpoint folder, callbacks) and hands it with a resolved config to the method's
``run(ctx, cfg)``. Configs are dataclasses with per-dataset presets; overrides are flat
``key=value`` pairs that may name a field of the method config or of its embedded
:class:`~rftlib.train.TrainConfig` (``epochs``, ``lr``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data.base import RFTDataset
from ..data.loading import LoaderSettings
from ..data.pipeline import ImageSpec
from ..evaluate import EvalResult, evaluate
from ..models import ClipModel
from ..registry import UnknownNameError
from ..results import ResultsStore
from ..train import FitResult, TrainConfig, fit

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a method needs besides its config."""

    clip: ClipModel
    dataset: RFTDataset
    device: torch.device
    store: ResultsStore
    run_id: str
    method: str
    seed: int = 0
    out_dir: Path | None = None
    callbacks: list[Callable] = field(default_factory=list)
    progress: str | None = None
    config: Any = None
    loader: LoaderSettings = field(default_factory=LoaderSettings)

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

    def evaluate(self, model: nn.Module, split: str, **knobs) -> EvalResult:
        res = evaluate(model, self.dataset, split, self.spec, device=self.device, settings=self.loader,
                       progress_mode=self.progress)
        self.log(res.split, res.role, res.metrics, **knobs)
        return res

    def evaluate_all(self, model: nn.Module, splits: list[str] | None = None, **knobs) -> dict[str, EvalResult]:
        """Evaluate on every ID/OOD split (or ``splits``) and log the metrics."""
        return {s: self.evaluate(model, s, **knobs) for s in (splits or self.eval_splits())}

    def log(self, split: str, role: str, metrics: Mapping[str, float], **knobs) -> None:
        """Write one tidy row per metric to the results store."""
        if metrics:
            self.store.log_metrics(self.run_id, dict(metrics), split=split, role=role, **knobs)

    def results_logger(self) -> Callable:
        """A training callback that logs every per-epoch evaluation."""
        def on_event(event) -> None:
            if event.kind == "eval":
                self.log(event.data["split"], event.data["role"], event.data["metrics"], epoch=event.epoch)
        return on_event


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
    """

    run_id: str
    method: str
    dataset: str
    metrics: dict[str, dict[str, float]]
    classifier: nn.Module | None = None
    checkpoint: Path | None = None
    clip: ClipModel | None = None
    extra: dict = field(default_factory=dict)

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
