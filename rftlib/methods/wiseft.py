"""WiSE-FT: weight-space ensembles of the zero-shot and a fine-tuned model.

Idea: interpolate *every* tensor of the two models, ``theta_a = (1 - a) * theta_zeroshot + a *
theta_finetuned``; ``a = 0`` is the zero-shot model, ``a = 1`` the fine-tuned one. Intermediate
``a`` usually beats both end points out of distribution at no extra training or inference cost.
For models fine-tuned with a head (FT, LP, LP-FT, DPS) the zero-shot end point is the pretrained
CLIP plus its zero-shot head; for contrastively tuned models without a head (FLYP, DRM) the whole
CLIP (both towers and the logit scale) is interpolated and the head is rebuilt from the
interpolated text tower at each ``a``. Works on any rftlib checkpoint.

The output-space ensemble (the paper's baseline) mixes the two models' logits (or
probabilities) instead: two forward passes per image, no weight merge.

Knobs: ``finetuned`` (checkpoint path; ``None`` runs ``base_method`` first, configured by
``base_overrides`` or the ``epochs`` / ``batch_size`` shortcuts), ``alphas``,
``ensemble`` (``weights`` | ``outputs``), ``output_space`` (``logits`` | ``probs``),
``report_alpha`` (the mixing the run reports as its result; 0.5 is the paper's choice when no OOD
data is available).

Paper: Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi,
Namkoong, Schmidt, "Robust fine-tuning of zero-shot models", CVPR 2022. Unlike the reference code
this sweep neither rebuilds datasets nor re-decodes images nor saves a model per alpha.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..data.base import RFTDataset
from ..data.pipeline import ImageSpec
from ..evaluate import evaluate
from ..models import (
    ClipModel,
    ImageClassifier,
    ZeroShotHead,
    build_zeroshot_head,
    classifier_state,
    load_checkpoint,
)
from .common import RunContext, RunResult

log = logging.getLogger(__name__)
NAME = "wiseft"
DEFAULT_ALPHAS = tuple(round(i / 10, 2) for i in range(11))
ENSEMBLES = ("weights", "outputs")


@dataclass
class Config:
    finetuned: str | None = None        # fine-tuned checkpoint (.safetensors); None: run base_method first
    base_method: str = "finetune"       # method that produces the fine-tuned end point when needed
    base_overrides: dict | None = None  # config overrides for the base_method run
    epochs: int | None = None           # shortcut for base_overrides["epochs"] (None: the base preset's)
    batch_size: int | None = None       # shortcut for base_overrides["batch_size"]
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # mixing coefficients to evaluate (0 = zero-shot)
    ensemble: str = "weights"           # "weights" (WiSE-FT) or "outputs" (output-space ensemble)
    output_space: str = "logits"        # for ensemble="outputs": mix "logits" or "probs"
    report_alpha: float = 0.5           # the alpha whose metrics the run reports


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


class WiseModel:
    """Holds both end points and produces the model at any alpha, on one working copy.

    Args:
        clip: a CLIP of the right architecture; its weights are overwritten as alphas change.
        zeroshot_state, finetuned_state: checkpoint-style states (CLIP keys + optional ``head.*``).
        classnames, templates: used to rebuild heads for head-less (contrastive) checkpoints.
    """

    def __init__(self, clip: ClipModel, zeroshot_state: dict, finetuned_state: dict,
                 classnames: Sequence[str], templates: Sequence[str]):
        self.clip, self.classnames, self.templates = clip, list(classnames), list(templates)
        self.zs, self.ft = zeroshot_state, finetuned_state
        self.has_head = "head.weight" in finetuned_state
        self.head = None
        if self.has_head:
            self.head = ZeroShotHead(finetuned_state["head.weight"].float(), finetuned_state["head.bias"].float())
            self.head.to(clip.device)

    def model_at(self, alpha: float) -> ImageClassifier:
        merged = merge_state_dicts(self.zs, self.ft, alpha)
        self.clip.model.load_state_dict({k: v for k, v in merged.items() if not k.startswith("head.")})
        if self.has_head:
            self.head.load_state_dict({"weight": merged["head.weight"], "bias": merged["head.bias"]})
            return ImageClassifier(self.clip.visual, self.head)
        head = build_zeroshot_head(self.clip, self.classnames, self.templates)
        return ImageClassifier(self.clip.visual, head)


def zeroshot_state_for(clip: ClipModel, finetuned_state: Mapping[str, torch.Tensor], classnames, templates) -> dict:
    """The zero-shot end point matching a fine-tuned state (with a head iff it has one)."""
    state = {k: v.detach().cpu().clone() for k, v in clip.model.state_dict().items()}
    if "head.weight" in finetuned_state:
        head = build_zeroshot_head(clip, classnames, templates)
        state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    return state


def sweep(wise: WiseModel, dataset: RFTDataset, splits: Sequence[str], alphas: Sequence[float], spec: ImageSpec, *,
          device=None, on_result=None) -> pd.DataFrame:
    """Evaluate every alpha on every split; decoded images are reused across alphas.

    Returns a tidy frame (alpha, split, role, metric, value); ``on_result(alpha, EvalResult)`` is
    called after each evaluation (e.g. to log to the results store).
    """
    rows = []
    for alpha in alphas:
        model = wise.model_at(alpha)
        for split in splits:
            res = evaluate(model, dataset, split, spec, device=device)
            rows += [{"alpha": float(alpha), "split": split, "role": res.role, "metric": m, "value": v}
                     for m, v in res.metrics.items()]
            if on_result is not None:
                on_result(alpha, res)
    return pd.DataFrame(rows)


def output_sweep(zs_model, ft_model, dataset: RFTDataset, splits: Sequence[str], alphas: Sequence[float],
                 spec: ImageSpec, *, space: str = "logits", device=None, on_result=None) -> pd.DataFrame:
    """The output-space ensemble for every alpha: two forward passes per split, then pure mixing."""
    rows = []
    for split in splits:
        zs = evaluate(zs_model, dataset, split, spec, device=device)
        ft = evaluate(ft_model, dataset, split, spec, device=device)
        for alpha in alphas:
            logits = output_ensemble(zs.logits, ft.logits, alpha, space)
            metrics = dataset.compute_metrics(split, logits.argmax(1).numpy())
            rows += [{"alpha": float(alpha), "split": split, "role": zs.role, "metric": m, "value": v}
                     for m, v in metrics.items()]
            if on_result is not None:
                on_result(alpha, type(zs)(split, zs.role, logits, zs.labels, zs.metadata, metrics))
    return pd.DataFrame(rows)


def _finetuned_state(ctx: RunContext, cfg: Config) -> tuple[dict, Path | None]:
    if cfg.finetuned is not None:
        state, sidecar = load_checkpoint(cfg.finetuned, architecture=ctx.clip.name)
        if sidecar.get("classnames") not in (None, ctx.dataset.classnames) and "head.weight" in state:
            raise ValueError(f"{cfg.finetuned} was trained on other classes than {ctx.dataset.name}'s")
        return state, Path(cfg.finetuned)
    from . import run_method  # the base method trains a copy, so ctx.clip stays zero-shot

    base = run_method(cfg.base_method, data=ctx.dataset, clip=copy.deepcopy(ctx.clip), device=ctx.device,
                      seed=ctx.seed, results_db=str(ctx.store.path), out_dir=ctx.out_dir / cfg.base_method
                      if ctx.out_dir else None, progress=ctx.progress, callbacks=ctx.callbacks,
                      overrides=base_run_overrides(cfg))
    if base.checkpoint is not None:
        return load_checkpoint(base.checkpoint)[0], base.checkpoint
    head = getattr(base.classifier, "head", None)
    return {k: v.detach().cpu() for k, v in classifier_state(base.clip, head).items()}, None


def base_run_overrides(cfg: Config) -> dict:
    """Overrides of the base_method run: ``base_overrides`` plus the ``epochs``/``batch_size`` shortcuts."""
    shortcuts = {k: v for k, v in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size)) if v is not None}
    return {**(cfg.base_overrides or {}), **shortcuts}


def run(ctx: RunContext, cfg: Config) -> RunResult:
    if cfg.finetuned is not None and base_run_overrides(cfg):
        raise ValueError(f"epochs/batch_size/base_overrides configure the base_method run, but finetuned="
                         f"{cfg.finetuned!r} is given, so nothing is trained; drop one of them")
    if cfg.ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {cfg.ensemble!r}; valid: {', '.join(ENSEMBLES)}")
    if any(not 0.0 <= a <= 1.0 for a in cfg.alphas):
        raise ValueError(f"alphas must lie in [0, 1], got {cfg.alphas}")
    ft_state, ft_path = _finetuned_state(ctx, cfg)
    names, templates = ctx.dataset.classnames, ctx.dataset.templates
    zs_state = zeroshot_state_for(ctx.clip, ft_state, names, templates)
    wise = WiseModel(ctx.clip, zs_state, ft_state, names, templates)
    alphas = sorted(set(cfg.alphas) | {cfg.report_alpha})

    def log_result(alpha, res):
        ctx.log(res.split, res.role, res.metrics, alpha=alpha)

    if cfg.ensemble == "weights":
        table = sweep(wise, ctx.dataset, ctx.eval_splits(), alphas, ctx.spec, device=ctx.device, on_result=log_result)
    else:
        ft_model = copy.deepcopy(wise.model_at(1.0))  # model_at reuses one working copy
        zs_model = wise.model_at(0.0)
        table = output_sweep(zs_model, ft_model, ctx.dataset, ctx.eval_splits(), alphas, ctx.spec,
                             space=cfg.output_space, device=ctx.device, on_result=log_result)
    at = table[table.alpha == cfg.report_alpha]
    metrics = {s: dict(zip(g.metric, g.value)) for s, g in at.groupby("split", sort=False)}
    model = wise.model_at(cfg.report_alpha) if cfg.ensemble == "weights" else None
    return RunResult(ctx.run_id, NAME, ctx.dataset.name, metrics, classifier=model, checkpoint=ft_path, clip=ctx.clip,
                     extra={"sweep": table, "wise": wise})
