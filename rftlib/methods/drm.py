"""DRM: dual risk minimisation -- FLYP fine-tuning plus a worst-case term anchored on concept descriptions.

Idea (Li, Xie, Huang, Deng, Hong, Li, Silva, Zhang, "Dual Risk Minimization: Towards Next-Level
Robustness in Fine-tuning Zero-Shot Models", NeurIPS 2024). Fine-tuning on the *expected* risk picks
up whatever predicts the label in the training domain, backgrounds included. DRM adds a proxy for
the *worst-case* risk over domains that keep each class's core features: the pretrained CLIP,
prompted with a description of every class's core visual features ("concept descriptions", written
by an LLM), gives soft labels that depend only on those features, and the model being fine-tuned is
asked to reproduce them with its own concept-description head::

    L = FLYP(images, default-template captions)                              # expected risk
        + lam * E_x[ -sum_y p_c(y|x) * log p_theta^cd(y|x) ]                # worst-case proxy

* ``p_theta^cd(y|x) = softmax_y(s * cos(f(x), w_y^cd))``: ``w^cd`` are the normalised (averaged,
  renormalised) text embeddings of the descriptions from the **trainable** text tower, re-encoded
  every step; ``s`` is the model's current logit scale. All K classes by default
  (``cd_classes="all"``); ``"batch"`` restricts both sides to the classes present in the batch
  (cheaper for 1000 classes; targets renormalised over those classes).
* ``p_c``: soft labels from the **frozen pretrained** model's cd head, computed **once**, before
  training, in one pass over the training images, and looked up per example with ``Batch.indices``.
  The raw probabilities are min-max normalised and renormalised to sum 1 (the "affinity
  normalisation" of the paper's ablation); its axis is **not verified** against the paper:
  ``affinity_axis="class"`` (default, the spec's suggestion) rescales each class's column across
  all training images -- how typical this image is for the class compared with the other images --;
  ``"image"`` rescales each image's row across classes (the least likely class becomes 0);
  ``"none"`` keeps the softmax probabilities.
* Both towers and the logit scale train (FLYP). The expected-risk term is exactly
  :func:`rftlib.methods.flyp.contrastive_loss` on one random default-template caption per image.

**Dual inference**: ``p(y|x) = beta * softmax(s cos(f, w^df)) + (1 - beta) * softmax(s cos(f, w^cd))``
with ``beta = 0.5``: a mixture of *probabilities* (not logits) of the default-template head and the
concept-description head, both rebuilt from the fine-tuned text tower with its logit scale. The
classifier a run returns outputs ``log p`` (:class:`DualHeadClassifier`), so
:func:`rftlib.evaluate.evaluate` and WiSE-FT-style tools work on it. :func:`beta_sweep` computes the
image features **once** per split, applies both heads, and mixes any number of betas with no further
forward pass (the released evaluation runs the image encoder once per head). On a split that covers
only some classes (ImageNet-R/A: 200 of 1000) each head's logits are masked to those classes
*before* its softmax, as the released ``eval_helper.py`` projects each head before mixing
(:meth:`DualHeadClassifier.for_split`; the run's evaluations and WiSE-FT's go through it).

This module declares its evaluation model to the method interface (:func:`build_classifier`): both
heads rebuilt from whatever CLIP weights it is given, mixed at the config's ``beta``. WiSE-FT over a
DRM checkpoint finds it through the registry from the checkpoint's recorded method and evaluates
every alpha with it, at the ``beta`` recorded in the checkpoint's config (WiSE-FT's
``classifier_knobs`` can change it). The interpolation itself is the FLYP-style one (the whole
CLIP, both towers and the logit scale, so both heads move from their zero-shot to their
fine-tuned versions): the paper reports DRM with WiSE-FT, but the released code interpolates
nothing (:mod:`rftlib.methods.wiseft`).

Fixed or made explicit compared with the released code (evaluation only; training code was never
published): concept descriptions are mapped to classes by label index or name, never by JSON key
order (:mod:`rftlib.methods.concepts`); a class with a *list* of descriptions averages their
embeddings (the released FMoW evaluation passes the list itself to the tokenizer).

Knobs: ``train``; ``lam`` (the trade-off; the paper ablates it, its values are not known here);
``affinity_axis``; ``cd_classes``; ``beta`` and ``betas`` (the sweep grid); ``descriptions`` (a DRM
JSON file; None: the dataset's own, e.g. synthwild's; ``description_variants`` uses synthwild's three
paraphrases per class); ``templates`` (default-template captions; None: the dataset's);
``head_templates`` (the df head's templates at evaluation; None: ``templates``). Presets:
``iwildcam``/``fmow``/``imagenet`` use FLYP's README recipes, which DRM builds on, and the released
evaluation's one df template per dataset (``a photo of {}.``, ``satellite photo of a {}.``, ``a good
photo of the {}.``); ``lam=1`` and the normalisation axis are *not* from released code.
``synthwild`` is a CPU recipe of a couple of minutes. Not covered: the shared loop's per-epoch
evaluations (``train.eval_splits``, ID validation by default) call :func:`rftlib.evaluate.evaluate`
on the mixed output directly, so a projected split placed there is masked after the mix.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import knobs
from ..data.base import RFTDataset, Split
from ..data.loading import LoaderSettings
from ..data.pipeline import ImageSpec
from ..evaluate import EvalResult, encode_split
from ..models import ClipModel, ImageClassifier, SplitAwareClassifier, build_zeroshot_head, encode_class_prompts
from ..task import Batch
from ..train import TrainConfig
from .common import (
    RunContext,
    RunResult,
    metrics_at,
    refuse_accumulation,
    sweep_table,
    tidy_rows,
)
from .concepts import (
    ClassPrompts,
    ConceptDescriptionError,
    description_file,
    load_concept_descriptions,
    prepare_command,
)
from .flyp import PRESETS as FLYP_PRESETS
from .flyp import Config as FlypConfig
from .flyp import FlypTask, contrastive_loss

log = logging.getLogger(__name__)

NAME = "drm"
AFFINITY_AXES = ("class", "image", "none")
CD_CLASSES = ("all", "batch")
DEFAULT_BETAS = tuple(round(i / 10, 2) for i in range(11))
LOW_PRECISION_ENTRIES = 2 ** 27  # soft-label tables larger than this (0.5 GB in fp32) are kept in fp16


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-5, weight_decay=0.1))
    lam: float = 1.0                  # weight of the worst-case proxy (unverified: the paper ablates it)
    affinity_axis: str = "class"      # min-max axis of the soft labels: "class" | "image" | "none" (unverified)
    cd_classes: str = "all"           # classes in the worst-case term: "all" K, or those in the "batch"
    beta: float = 0.5                 # dual inference: weight of the default-template head's probabilities
    betas: tuple[float, ...] = DEFAULT_BETAS  # the beta grid of the post-hoc sweep
    descriptions: str | None = None   # DRM concept-description JSON; None: the dataset's own, else the prepared file
    description_variants: bool = False  # use dataset.info["description_variants"] (several per class)
    templates: tuple[str, ...] | None = None  # default-template captions (and df head); None: the dataset's
    head_templates: tuple[str, ...] | None = None  # df head's templates at evaluation; None: those of `templates`

    def __post_init__(self):
        refuse_accumulation(self.train, NAME)
        if self.affinity_axis not in AFFINITY_AXES:
            raise ValueError(f"unknown affinity_axis {self.affinity_axis!r}; valid: {', '.join(AFFINITY_AXES)}")
        if self.cd_classes not in CD_CLASSES:
            raise ValueError(f"unknown cd_classes {self.cd_classes!r}; valid: {', '.join(CD_CLASSES)}")
        self.beta = knobs.check("beta", self.beta)
        self.betas = knobs.check_all("beta", self.betas) if self.betas else ()
        if self.lam < 0:
            raise ValueError(f"lam weighs a risk term and must be >= 0, got {self.lam}")


# DRM trains FLYP-style with FLYP's recipes (the FLYP code's README) on every dataset, synthwild's CPU
# preset included; lam and the affinity axis are not from released code
PRESETS = {name: dict(preset) for name, preset in FLYP_PRESETS.items()}
# the released evaluation builds the df head from one template per dataset (FMoW keeps the raw,
# underscored class names); training captions keep the dataset's templates, as FLYP
RELEASED_HEAD_TEMPLATES = {"iwildcam": ("a photo of {}.",), "fmow": ("satellite photo of a {}.",),
                           "imagenet": ("a good photo of the {}.",)}
for _name, _templates in RELEASED_HEAD_TEMPLATES.items():
    PRESETS[_name]["head_templates"] = _templates


# --------------------------------------------------------------------------------------------------
# Soft labels from the frozen zero-shot model
# --------------------------------------------------------------------------------------------------
def soft_labels(cd_logits: torch.Tensor, axis: str = "class") -> torch.Tensor:
    """DRM's soft labels p_c(y|x) from the pretrained model's concept-description logits.

    Args:
        cd_logits: (N, K) logits of the frozen zero-shot cd head on the N training images.
        axis: ``"class"``: min-max normalise each class's probabilities across the N images;
            ``"image"``: each image's probabilities across the K classes; ``"none"``: plain softmax.
            After min-max the rows are renormalised to sum to 1.

    Returns:
        float32 (N, K), every row a probability vector. A row that min-max normalisation empties
        (all zeros, possible only in degenerate cases) falls back to its softmax probabilities.
    """
    if axis not in AFFINITY_AXES:
        raise ValueError(f"unknown affinity_axis {axis!r}; valid: {', '.join(AFFINITY_AXES)}")
    probs = cd_logits.float().softmax(dim=-1)
    if axis == "none":
        return probs
    dim = 0 if axis == "class" else 1
    low, high = probs.amin(dim=dim, keepdim=True), probs.amax(dim=dim, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (probs - low) / span.clamp_min(torch.finfo(probs.dtype).tiny),
                         torch.zeros_like(probs))
    total = scaled.sum(dim=1, keepdim=True)
    return torch.where(total > 0, scaled / total.clamp_min(torch.finfo(probs.dtype).tiny), probs)


def zeroshot_cd_logits(clip: ClipModel, descriptions: Sequence[ClassPrompts], split: Split, spec: ImageSpec,
                       *, device=None, batch_size: int = 256, amp: bool = False,
                       settings: LoaderSettings | None = None) -> torch.Tensor:
    """Logits ``s * cos(f(x), w^cd)`` of ``clip``'s concept-description head on a split's images."""
    head = build_zeroshot_head(clip, prompts=descriptions).to(clip.device)
    return encode_split(ImageClassifier(clip.visual, head), split, spec, device=device, batch_size=batch_size,
                        amp=amp, settings=settings, desc="drm soft labels")


# --------------------------------------------------------------------------------------------------
# Dual inference
# --------------------------------------------------------------------------------------------------
def dual_logits(df_logits: torch.Tensor, cd_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta * softmax(df) + (1 - beta) * softmax(cd))``, computed stably.

    At ``beta=1`` this is exactly ``log_softmax(df_logits)``, at ``beta=0`` ``log_softmax(cd_logits)``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta mixes two probability vectors and must lie in [0, 1], got {beta}")
    if beta == 1.0:
        return df_logits.float().log_softmax(dim=-1)
    if beta == 0.0:
        return cd_logits.float().log_softmax(dim=-1)
    parts = torch.stack([df_logits.float().log_softmax(dim=-1) + math.log(beta),
                         cd_logits.float().log_softmax(dim=-1) + math.log(1.0 - beta)])
    return torch.logsumexp(parts, dim=0)


class DualHeadClassifier(SplitAwareClassifier):
    """Image tower + the default-template head + the concept-description head.

    ``forward`` returns the dual-inference log-probabilities at ``beta``; :meth:`both` returns the two
    heads' logits from a single pass through the image tower.

    On a split that covers only some classes (ImageNet-R/A: ``dataset.info["logit_projection"]``),
    each head's logits must be restricted to those classes *before* the two softmaxes are mixed, as
    DRM's released evaluation does: masking the mixture afterwards keeps each softmax normalised over
    all 1000 classes, and the head whose mass lies outside the split then barely counts.
    :meth:`for_split` returns that restricted view (``project``); :func:`rftlib.evaluate.evaluate` (so
    every run, sweep, per-epoch and WiSE-FT evaluation) and :func:`head_logits` use it.

    Args:
        visual, df_head, cd_head: the image tower and the two heads (shared, not copied).
        beta: weight of the df head's probabilities.
        project: applied to each head's logits before the mix (set by :meth:`for_split`).
    """

    def __init__(self, visual: nn.Module, df_head: nn.Module, cd_head: nn.Module, beta: float = 0.5,
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.visual, self.df_head, self.cd_head, self.beta = visual, df_head, cd_head, float(beta)
        self.project = project

    def for_split(self, dataset: RFTDataset, split: str) -> DualHeadClassifier:
        """This model as evaluated on ``split``: each head masked to the split's classes
        (:func:`rftlib.data.imagenet.project_logits`, mode ``"mask"``) when the split has a logit
        projection, else ``self``. The view shares the towers and heads."""
        if split not in dataset.info.get("logit_projection", {}):
            return self
        from ..data.imagenet import project_logits

        return DualHeadClassifier(self.visual, self.df_head, self.cd_head, self.beta,
                                  project=functools.partial(project_logits, dataset, split, mode="mask"))

    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.visual(images)
        df, cd = self.df_head(features), self.cd_head(features)
        if self.project is not None:
            df, cd = self.project(df), self.project(cd)
        return df, cd

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return dual_logits(*self.both(images), self.beta)


class _BothHeads(nn.Module):
    """Both heads' logits side by side (N, 2K), so one :func:`run_model` pass yields both."""

    def __init__(self, dual: DualHeadClassifier):
        super().__init__()
        self.dual = dual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.dual.both(images), dim=-1)


def build_dual_classifier(clip: ClipModel, classnames: Sequence[str], templates: Sequence[str],
                          descriptions: Sequence[ClassPrompts], beta: float = 0.5) -> DualHeadClassifier:
    """Both heads from ``clip``'s current text tower and logit scale (no gradients)."""
    df = build_zeroshot_head(clip, classnames, templates).to(clip.device)
    cd = build_zeroshot_head(clip, prompts=descriptions).to(clip.device)
    return DualHeadClassifier(clip.visual, df, cd, beta)


def head_templates(cfg: Config, dataset: RFTDataset) -> list[str]:
    """The df head's templates at evaluation: ``cfg.head_templates``, else the training captions'
    (``cfg.templates``, else the dataset's)."""
    return list(cfg.head_templates or cfg.templates or dataset.templates)


def build_classifier(clip: ClipModel, state: Mapping[str, torch.Tensor], dataset: RFTDataset,
                     cfg: Config) -> DualHeadClassifier:
    """DRM's evaluation model around weights it may not have produced itself (the method interface's
    :data:`~rftlib.methods.common.ClassifierBuilder`; WiSE-FT calls it at every alpha).

    Both heads are rebuilt from ``clip``'s text tower and logit scale, as after training: the df head
    from :func:`head_templates`, the cd head from the config's descriptions
    (:func:`resolve_descriptions`); they are mixed at ``cfg.beta``. For a WiSE-FT merge, ``clip``
    holds the interpolated CLIP (both towers and the logit scale), so each head lies between the
    zero-shot model's and the fine-tuned model's.

    Args:
        clip: a CLIP holding DRM weights (or their merge with the zero-shot CLIP).
        state: the checkpoint's tensors beyond the CLIP's; a DRM checkpoint has none.
        dataset: class names, templates and descriptions.
        cfg: the DRM config the checkpoint was trained with (recorded in its sidecar).
    """
    if state:
        raise ValueError(f"a DRM checkpoint holds the CLIP alone (its heads are rebuilt from the text tower), but "
                         f"this state also has {sorted(state)[:3]}: was it made by another method?")
    return build_dual_classifier(clip, dataset.classnames, head_templates(cfg, dataset),
                                 resolve_descriptions(cfg, dataset), cfg.beta)


def head_logits(model: DualHeadClassifier, dataset: RFTDataset, split: str, spec: ImageSpec, *, device=None,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The df and cd logits of one split from a single image-encoder pass, each masked to the split's
    classes when it covers only some (ImageNet-R/A: :meth:`DualHeadClassifier.for_split`)."""
    both = encode_split(_BothHeads(model.for_split(dataset, split)), dataset.split(split), spec, device=device,
                        batch_size=batch_size, desc=f"eval {split}")
    return both.chunk(2, dim=-1)


def beta_sweep(model: DualHeadClassifier, dataset: RFTDataset, splits: Sequence[str], betas: Sequence[float],
               spec: ImageSpec, *, device=None, on_result: Callable[[float, EvalResult], None] | None = None,
               ) -> pd.DataFrame:
    """Dual-inference metrics for every beta on every split, with one forward pass per split.

    Returns:
        A tidy frame (beta, split, role, metric, value). ``on_result(beta, EvalResult)`` is called
        for every (beta, split) (e.g. :meth:`~rftlib.methods.common.RunContext.log_point`).
    """
    rows = []
    for split in splits:
        s = dataset.split(split)
        df, cd = head_logits(model, dataset, split, spec, device=device)
        for beta in betas:
            logits = dual_logits(df, cd, float(beta))
            metrics = dataset.compute_metrics(s, logits.argmax(dim=1).numpy())
            rows += tidy_rows(dataset, {"beta": float(beta)}, split, s.role, metrics)
            if on_result is not None:
                on_result(float(beta), EvalResult(split, s.role, logits, s.labels, s.metadata, metrics))
    return sweep_table(rows, "beta")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
class DRMTask(FlypTask):
    """FLYP's contrastive loss plus ``lam`` x cross-entropy to the frozen model's cd soft labels.

    Args:
        clip: the pretrained CLIP (trained in place: both towers and the logit scale).
        classnames, templates: default-template captions (and the df head).
        descriptions: one description or a list per class.
        targets: (N_train, K) soft labels, rows indexed by training-split position (kept on the CPU).
        cfg: the DRM config.
    """

    method_name = NAME

    def __init__(self, clip: ClipModel, classnames: list[str], templates: list[str],
                 descriptions: Sequence[ClassPrompts], targets: torch.Tensor, cfg: Config):
        if cfg.cd_classes not in CD_CLASSES:
            raise ValueError(f"unknown cd_classes {cfg.cd_classes!r}; valid: {', '.join(CD_CLASSES)}")
        if targets.shape[1] != len(classnames):
            raise ValueError(f"soft labels have {targets.shape[1]} classes but the dataset has {len(classnames)}")
        super().__init__(clip, classnames, templates, FlypConfig(train=cfg.train))
        self.descriptions, self.method_config, self.drm = list(descriptions), cfg, cfg
        dtype = torch.float16 if targets.numel() > LOW_PRECISION_ENTRIES else torch.float32
        self.targets = targets.detach().to("cpu", dtype)  # not a buffer: may be large, stays on the CPU

    def soft_targets(self, batch: Batch) -> torch.Tensor:
        t = self.targets[batch.indices.cpu()].to(batch.images.device, torch.float32)
        return t / t.sum(dim=1, keepdim=True)

    def worst_case_proxy(self, features: torch.Tensor, batch: Batch, scale: torch.Tensor) -> torch.Tensor:
        """Cross-entropy between the soft labels and the model's current cd head (all or in-batch classes)."""
        targets = self.soft_targets(batch)
        classes = None
        if self.drm.cd_classes == "batch":
            classes = torch.unique(batch.labels)
            targets = targets[:, classes]
            mass = targets.sum(dim=1, keepdim=True)
            own = (batch.labels[:, None] == classes[None, :]).float()  # fallback: the true class
            targets = torch.where(mass > 0, targets / mass.clamp_min(1e-12), own)
        prompts = self.descriptions if classes is None else [self.descriptions[c] for c in classes.tolist()]
        weights = encode_class_prompts(self.clip, prompts, grad=True)
        log_probs = (scale * F.normalize(features.float(), dim=-1) @ weights.T).log_softmax(dim=-1)
        return -(targets * log_probs).sum(dim=1).mean()

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        features = self.model.encode_image(batch.images)
        scale = self.model.logit_scale.exp()
        img = batch.gather(features)
        txt = batch.gather(self.encode_captions(self.captions(batch)))
        erm = contrastive_loss(img, txt, scale)
        wrm = self.worst_case_proxy(features, batch, scale)
        return {"loss": erm + self.drm.lam * wrm, "erm": erm.detach(), "wrm": wrm.detach(),
                "logit_scale": scale.detach()}

    def classifier(self) -> nn.Module:
        templates = list(self.drm.head_templates or self.templates)  # head_templates(cfg, dataset)
        return build_dual_classifier(self.clip, self.classnames, templates, self.descriptions, self.drm.beta)


def resolve_descriptions(cfg: Config, dataset: RFTDataset) -> list[ClassPrompts]:
    """The concept descriptions to use, first found of: ``cfg.descriptions`` (a file); the
    dataset's own (synthwild); ``<data root>/drm_concept_descriptions/<dataset>_cd.json`` (DRM's
    released files, put there by ``data_scripts/prepare_drm_descriptions.py``)."""
    if cfg.descriptions is not None:
        return load_concept_descriptions(cfg.descriptions, dataset.classnames)
    if cfg.description_variants:
        variants = dataset.info.get("description_variants")
        if not variants:
            raise ValueError(f"dataset {dataset.name!r} has no info['description_variants']; set "
                             "description_variants=False or pass descriptions=<DRM JSON file>")
        return load_concept_descriptions(list(variants), dataset.classnames)
    if dataset.descriptions:
        return load_concept_descriptions(list(dataset.descriptions), dataset.classnames)
    prepared = description_file(dataset.root, dataset.name) if dataset.root is not None else None
    if prepared is not None and prepared.exists():
        return load_concept_descriptions(prepared, dataset.classnames)
    where = f"{prepared} does not exist" if prepared is not None else "none ship with it"
    raise ConceptDescriptionError(
        f"dataset {dataset.name!r} has no concept descriptions ({where}). Prepare DRM's released ones with "
        f"`{prepare_command(dataset.name, dataset.root or 'data')}`, or pass descriptions=<path to a DRM JSON file> "
        "(keyed by label index or class name)")


def train_soft_labels(ctx: RunContext, descriptions: Sequence[ClassPrompts], axis: str) -> torch.Tensor:
    """Soft labels of the training split from ``ctx.clip`` as it is now (call before training)."""
    logits = zeroshot_cd_logits(ctx.clip, descriptions, ctx.dataset.split("train"), ctx.spec, device=ctx.device,
                                settings=ctx.loader)
    return soft_labels(logits, axis)


def run(ctx: RunContext, cfg: Config) -> RunResult:
    """Soft labels (frozen model) -> DRM training -> one-pass beta sweep of the selected model.

    The reported metrics and the returned classifier are dual inference at ``cfg.beta``; every beta
    of ``cfg.betas`` (plus ``cfg.beta``) is logged as a ``sweep`` row with its ``beta`` knob (and
    ``cfg.beta``'s also as the ``final`` rows) and returned as ``extra["sweep"]``.
    ``extra`` also holds the ``descriptions`` used, the ``soft_labels`` table, ``best_epoch`` and ``history``.
    """
    descriptions = resolve_descriptions(cfg, ctx.dataset)
    templates = list(cfg.templates or ctx.dataset.templates)
    targets = train_soft_labels(ctx, descriptions, cfg.affinity_axis)
    task = DRMTask(ctx.clip, ctx.dataset.classnames, templates, descriptions, targets, cfg)

    fitted = ctx.fit(task, cfg.train, callbacks=[ctx.results_logger({"beta": cfg.beta})])
    model = task.classifier()
    betas = sorted({*cfg.betas, cfg.beta})
    table = beta_sweep(model, ctx.dataset, ctx.eval_splits(), betas, ctx.spec, device=ctx.device,
                       on_result=lambda beta, res: ctx.log_point({"beta": beta}, res, report=beta == cfg.beta,
                                                                 epoch=fitted.best_epoch))
    return ctx.conclude(model, fitted, metrics=metrics_at(table, "beta", cfg.beta), sweep=table,
                        descriptions=descriptions, soft_labels=targets)


__all__ = ["Config", "DRMTask", "DualHeadClassifier", "NAME", "PRESETS", "beta_sweep", "build_classifier",
           "build_dual_classifier", "dual_logits", "head_logits", "head_templates", "resolve_descriptions", "run",
           "soft_labels", "zeroshot_cd_logits"]
