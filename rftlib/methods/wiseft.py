"""WiSE-FT: weight-space ensembles of the zero-shot and a fine-tuned model.

Idea: interpolate *every* tensor of the two models, ``theta_a = (1 - a) * theta_zeroshot + a *
theta_finetuned``; ``a = 0`` is the zero-shot model, ``a = 1`` the fine-tuned one. Intermediate
``a`` usually beats both end points out of distribution at no extra training or inference cost.
Works on any rftlib checkpoint; what is interpolated, and how the merged weights become a model,
follow the method that made the checkpoint (its ``method`` and ``method_config`` in the sidecar,
or the ``base_method`` run):

* models fine-tuned with a head (FT, LP, LP-FT, DPS): the zero-shot end point is the pretrained
  CLIP plus its zero-shot head, and the head's weight and bias are interpolated with the towers,
  as in the reference code (mlfoundations/wise-ft ``src/wise_ft.py``);
* contrastively tuned models without a head (FLYP, DRM): the whole CLIP (both towers and the logit
  scale) is interpolated and the heads are rebuilt from the interpolated text tower at each ``a``
  (FLYP's "ensemble both encoders"; neither FLYP nor DRM release WiSE-FT code);
* a method whose evaluation model is more than one head declares how it is built
  (``build_classifier``, :mod:`rftlib.methods`), and WiSE-FT evaluates every ``a`` with it. DRM's
  is its dual inference: the default-template head and the concept-description head, both rebuilt
  from the interpolated text tower, their softmaxes mixed at the checkpoint's recorded ``beta``
  (``classifier_knobs={"beta": ...}`` evaluates another). The DRM paper reports DRM with and
  without WiSE-FT; its released code interpolates nothing (a leftover ``--alpha`` option), so this
  recipe is the FLYP-style one above applied to both heads, not a reproduction of released code.

The output-space ensemble (the paper's baseline) mixes the two models' logits (or
probabilities) instead: two forward passes per image, no weight merge.

Knobs: ``finetuned`` (checkpoint path; ``None`` runs ``base_method`` first, configured by
``base_overrides``), ``alphas`` (the sweep), ``alpha`` (the mixing the run reports as its
result; 0.5 is the paper's choice when no OOD data is available), ``ensemble`` (``weights`` |
``outputs``), ``output_space`` (``logits`` | ``probs``), ``classifier_knobs`` (changes to the base
method's recorded config before its evaluation model is built, e.g. DRM's ``beta``; only for a
method that declares a builder). The run records its base method, so a WiSE-FT sweep over FLYP and
one over fine-tuning stay two curves in a comparison; rows are logged as ``sweep`` rows at every
alpha and ``final`` rows at ``alpha``.

Paper: Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi,
Namkoong, Schmidt, "Robust fine-tuning of zero-shot models", CVPR 2022. Unlike the reference code
this sweep neither rebuilds datasets nor re-decodes images nor saves a model per alpha.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .. import knobs
from ..data.base import RFTDataset
from ..models import (
    ClipModel,
    ImageClassifier,
    build_zeroshot_head,
    classifier_state,
    load_checkpoint,
)
from .common import (
    ClassifierBuilder,
    RunContext,
    RunResult,
    apply_overrides,
    config_from_record,
    head_classifier,
    metrics_at,
    single_head_classifier,
    sweep_table,
)

log = logging.getLogger(__name__)
NAME = "wiseft"
DEFAULT_ALPHAS = tuple(round(i / 10, 2) for i in range(11))
ENSEMBLES = ("weights", "outputs")
OUTPUT_SPACES = ("logits", "probs")


@dataclass
class Config:
    finetuned: str | None = None        # fine-tuned checkpoint (.safetensors); None: run base_method first
    base_method: str = "finetune"       # method that produces the fine-tuned end point when needed
    base_overrides: dict | None = None  # config overrides for the base_method run (e.g. {"epochs": 2})
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # mixing coefficients to evaluate (0 = zero-shot)
    alpha: float = 0.5                  # the alpha whose metrics the run reports as its result
    ensemble: str = "weights"           # "weights" (WiSE-FT) or "outputs" (output-space ensemble)
    output_space: str = "logits"        # for ensemble="outputs": mix "logits" or "probs"
    classifier_knobs: dict | None = None  # base method config changes for its evaluation model (DRM: {"beta": 0.7})

    def __post_init__(self):
        self.alphas = knobs.check_all("alpha", self.alphas) if self.alphas else ()
        self.alpha = knobs.check("alpha", self.alpha)
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {self.ensemble!r}; valid: {', '.join(ENSEMBLES)}")
        if self.output_space not in OUTPUT_SPACES:
            raise ValueError(f"unknown output_space {self.output_space!r}; valid: {', '.join(OUTPUT_SPACES)}")
        if self.finetuned is not None and self.base_overrides:
            raise ValueError(f"base_overrides configure the base_method run, but finetuned={self.finetuned!r} is "
                             "given, so nothing is trained; drop one of them")


PRESETS: dict = {}


def merge_state_dicts(zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zeroshot + alpha * finetuned`` for every floating tensor.

    Non-floating tensors (integer buffers) must be equal and are copied. Both state dicts must
    have exactly the same keys and shapes.
    """
    if set(zeroshot) != set(finetuned):
        missing = sorted(set(zeroshot) ^ set(finetuned))[:5]
        raise KeyError(f"the two models have different tensors, e.g. {missing}")
    merged = {}
    for key, z in zeroshot.items():
        f = finetuned[key]
        if z.shape != f.shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(z.shape)} vs {tuple(f.shape)}")
        if z.is_floating_point():
            merged[key] = torch.lerp(z.float(), f.to(z.device).float(), float(alpha)).to(z.dtype)
        else:
            merged[key] = f.clone()
    return merged


def output_ensemble(logits_zs: torch.Tensor, logits_ft: torch.Tensor, alpha: float,
                    space: str = "logits") -> torch.Tensor:
    """Mix two models' outputs: logits, or probabilities (returned as log-probabilities)."""
    if space == "logits":
        return (1 - alpha) * logits_zs + alpha * logits_ft
    if space == "probs":
        probs = (1 - alpha) * logits_zs.softmax(-1) + alpha * logits_ft.softmax(-1)
        return probs.clamp_min(1e-12).log()
    raise ValueError(f"unknown output space {space!r}; valid: logits, probs")


@dataclass(frozen=True)
class BaseClassifier:
    """How merged weights become the base method's evaluation model.

    Attributes:
        method: the method that made the fine-tuned end point (``None``: not recorded).
        build: its :data:`~rftlib.methods.common.ClassifierBuilder` (declared, or the one-head default).
        config: the config ``build`` reads (the recorded one plus ``classifier_knobs``); ``None`` for
            the one-head default, which reads none.
    """

    method: str | None
    build: ClassifierBuilder = single_head_classifier
    config: Any = None


def base_classifier(method: str | None, config: Any, dataset: RFTDataset,
                    knob_changes: Mapping[str, Any] | None = None) -> BaseClassifier:
    """The evaluation model of ``method``'s checkpoints, found through the method registry.

    Args:
        method: the base method's registry name (``None`` or an unregistered name: one head).
        config: its config as recorded: a config instance, its JSON record (a sidecar's
            ``method_config``) or ``None`` (the method's preset for ``dataset``).
        dataset: what the model is evaluated on (the preset's name).
        knob_changes: config overrides applied before building (WiSE-FT's ``classifier_knobs``).

    Raises:
        ValueError: ``knob_changes`` for a method that declares no builder (nothing reads them).
        UnknownNameError: ``knob_changes`` names a field the method's config lacks.
    """
    from . import METHODS, classifier_builder, get_config, get_method

    declared = classifier_builder(method) if method in METHODS else None
    if declared is None:
        if method is not None and method not in METHODS:
            log.warning("checkpoint made by %r, which is not a registered method: evaluated with one head", method)
        if knob_changes:
            raise ValueError(f"classifier_knobs={dict(knob_changes)} change the config of a base method's own "
                             f"evaluation-model builder, but {method or 'the unrecorded base method'} declares none: "
                             "its model is its checkpoint's head (or a zero-shot head), which no knob changes")
        return BaseClassifier(method)
    config_cls = get_method(method).Config
    if config is None:
        config = get_config(method, dataset.name)
    elif not isinstance(config, config_cls):
        config = config_from_record(config_cls, config)
    return BaseClassifier(method, declared, apply_overrides(config, knob_changes))


class WiseModel:
    """Holds both end points and produces the model at any alpha, on one working copy.

    Args:
        clip: a CLIP of the right architecture; its weights are overwritten as alphas change.
        zeroshot_state, finetuned_state: checkpoint-style states (CLIP keys + optional ``head.*``).
        classnames, templates: the default model's (one head: the checkpoint's, or for a head-less
            checkpoint a zero-shot head rebuilt from the merged text tower at every alpha).
        build: ``build(clip, head_state) -> model``, the evaluation model from the CLIP holding the
            merged weights and the merged ``head.*`` tensors (default: that one head,
            :func:`~rftlib.methods.common.head_classifier`); :func:`run` passes the base method's.
    """

    def __init__(self, clip: ClipModel, zeroshot_state: dict, finetuned_state: dict,
                 classnames: Sequence[str], templates: Sequence[str], *,
                 build: Callable[[ClipModel, dict], nn.Module] | None = None):
        self.clip, self.classnames, self.templates = clip, list(classnames), list(templates)
        self.zs, self.ft = zeroshot_state, finetuned_state
        self.build = build if build is not None else self._one_head

    def _one_head(self, clip: ClipModel, state: dict) -> ImageClassifier:
        return head_classifier(clip, state, self.classnames, self.templates)

    def model_at(self, alpha: float) -> nn.Module:
        """The evaluation model at ``alpha`` (valid until the next call: it shares the working copy)."""
        merged = merge_state_dicts(self.zs, self.ft, alpha)
        self.clip.model.load_state_dict({k: v for k, v in merged.items() if not k.startswith("head.")})
        return self.build(self.clip, {k: v for k, v in merged.items() if k.startswith("head.")})


def zeroshot_state_for(clip: ClipModel, finetuned_state: Mapping[str, torch.Tensor], classnames, templates) -> dict:
    """The zero-shot end point matching a fine-tuned state (with a head iff it has one)."""
    state = {k: v.detach().cpu().clone() for k, v in clip.model.state_dict().items()}
    if "head.weight" in finetuned_state:
        head = build_zeroshot_head(clip, classnames, templates)
        state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    return state


def sweep(ctx: RunContext, wise: WiseModel, alphas: Sequence[float], *, report: float | None = None) -> pd.DataFrame:
    """Evaluate the weight-space mix at every alpha on every split, logging each point (and the
    ``report`` alpha's as the run's final rows); decoded images are reused across alphas.

    Returns:
        A tidy frame (alpha, split, role, metric, value).
    """
    rows = []
    for alpha in alphas:
        rows += ctx.evaluate_point(wise.model_at(alpha), {"alpha": float(alpha)}, report=alpha == report)
    return sweep_table(rows, "alpha")


def output_sweep(ctx: RunContext, zs_model, ft_model, alphas: Sequence[float], *, space: str = "logits",
                 report: float | None = None) -> pd.DataFrame:
    """The output-space ensemble for every alpha: two forward passes per split, then pure mixing
    (logged like :func:`sweep`)."""
    rows = []
    for split in ctx.eval_splits():
        zs, ft = ctx.evaluate_split(zs_model, split), ctx.evaluate_split(ft_model, split)
        for alpha in alphas:
            logits = output_ensemble(zs.logits, ft.logits, alpha, space)
            metrics = ctx.dataset.compute_metrics(split, logits.argmax(1).numpy())
            res = dataclasses.replace(zs, logits=logits, metrics=metrics)
            rows += ctx.log_point({"alpha": float(alpha)}, res, report=alpha == report)
    return sweep_table(rows, "alpha")


@dataclass
class FineTuned:
    """The fine-tuned end point: its state, its file (if any), the method that made it and its config."""

    state: dict
    path: Path | None
    method: str | None
    config: Any = None  # a config instance or its JSON record; None: not recorded


def _fine_tuned(ctx: RunContext, cfg: Config) -> FineTuned:
    """The given checkpoint (its method recorded as the base), or a run of ``cfg.base_method``
    (trained on a copy, so ``ctx.clip`` stays zero-shot)."""
    if cfg.finetuned is not None:
        state, sidecar = load_checkpoint(cfg.finetuned, architecture=ctx.clip.name)
        if sidecar.get("classnames") not in (None, ctx.dataset.classnames) and "head.weight" in state:
            raise ValueError(f"{cfg.finetuned} was trained on other classes than {ctx.dataset.name}'s")
        ctx.store.set_base_method(ctx.run_id, sidecar.get("method"))
        return FineTuned(state, Path(cfg.finetuned), sidecar.get("method"), sidecar.get("method_config"))
    base_classifier(cfg.base_method, None, ctx.dataset, cfg.classifier_knobs)  # refuse bad knobs before training
    base = ctx.run_base(cfg.base_method, cfg.base_overrides)
    if base.checkpoint is not None:
        return FineTuned(load_checkpoint(base.checkpoint)[0], base.checkpoint, cfg.base_method, base.config)
    head = base.classifier.head if isinstance(base.classifier, ImageClassifier) else None
    state = {k: v.detach().cpu() for k, v in classifier_state(base.clip, head).items()}
    return FineTuned(state, None, cfg.base_method, base.config)


def run(ctx: RunContext, cfg: Config) -> RunResult:
    ft = _fine_tuned(ctx, cfg)
    names, templates = ctx.dataset.classnames, ctx.dataset.templates
    made_by = base_classifier(ft.method, ft.config, ctx.dataset, cfg.classifier_knobs)
    zs_state = zeroshot_state_for(ctx.clip, ft.state, names, templates)
    wise = WiseModel(ctx.clip, zs_state, ft.state, names, templates,
                     build=lambda clip, state: made_by.build(clip, state, ctx.dataset, made_by.config))
    alphas = sorted(set(cfg.alphas) | {cfg.alpha})
    if cfg.ensemble == "weights":
        table = sweep(ctx, wise, alphas, report=cfg.alpha)
    else:
        ft_model = copy.deepcopy(wise.model_at(1.0))  # model_at reuses one working copy
        table = output_sweep(ctx, wise.model_at(0.0), ft_model, alphas, space=cfg.output_space, report=cfg.alpha)
    model = wise.model_at(cfg.alpha) if cfg.ensemble == "weights" else None
    return RunResult(ctx.run_id, NAME, ctx.dataset.name, metrics_at(table, "alpha", cfg.alpha), classifier=model,
                     checkpoint=ft.path, clip=ctx.clip, extra={"sweep": table, "wise": wise, "base": made_by})
