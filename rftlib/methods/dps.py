"""DPS: discrepancy-guided parameter suppression -- fine-tune, but keep the most-changed rows pretrained.

Idea (Liu & Ma, "Discrepancy-Guided Parameter Suppression for Robust Fine-tuning", NeurIPS 2024
FITML workshop; code changliu816/DPS, a FLYP fork). Plain fine-tuning moves some weights far more
than others. DPS measures, on a *reference* fine-tuning run, how much every row ("channel") of every
weight matrix moved away from the pretrained weights, then fine-tunes again **from the pretrained
weights** while holding the most-moved rows at their pretrained values. The hope is that those rows
are where fine-tuning distorts the pretrained features (hurting OOD), so suppressing them keeps
robustness while the remaining rows still adapt.

The pipeline, in rftlib terms:

1. **Reference run** (``reference``: a checkpoint, or ``reference_method`` run first on a copy of the
   model). As released, it is FLYP's cross-entropy-with-language-head ablation, which is exactly a DPS
   run with ``mask_ratio=0`` (nothing suppressed), so that is the default reference.
2. **Ranking** (:func:`rank_rows`). Eligible tensors (the released rule): parameters with >= 2
   dimensions whose name contains neither ``bias`` nor ``positional_embedding`` nor a LayerNorm
   (``ln_*``) part -- every attention/MLP matrix of both towers, the patch-embedding conv, both
   projections and the token embedding. Never eligible, hence always trained: biases, LayerNorms,
   positional and class embeddings, the logit scale. A *row* is an index of the first axis (output
   channels of Linear/conv weights, but *input* dims of ``visual.proj``/``text_projection``, which
   are used as ``x @ P``, and vocabulary entries of ``token_embedding``). Row score::

       d_r = max_j |W_ref - W_0|[r, j] / ||W_ref - W_0||_F      (per-tensor normalisation)

   or the raw row maximum with ``normalisation="none"``. All rows of all tensors are sorted once,
   globally, by descending score; every mask ratio reuses that one list.
3. **Suppression** (:func:`masks_for_ratio`): the top ``floor(m * N)`` rows of the global list
   (``m = mask_ratio``, ``N`` eligible rows) are frozen at their pretrained values; with
   ``per_tensor_quota=True`` the top ``floor(m * R)`` rows of each tensor instead. The mask is static.
4. **Training** (:class:`DPSTask`) from the pretrained weights with the reference run's objective and
   schedule; evaluation heads are rebuilt from the current text tower, as in FLYP.

Bugs of the released code, fixed here:

* **DPS as released freezes nothing.** The freezing loop walks ``named_parameters()`` of the
  ``DataParallel``-wrapped model, whose names start with ``module.``, while the mask is keyed by the
  unwrapped names, so no name ever matches and the "DPS" run is the CE run again. (Had the names
  matched, setting ``requires_grad`` on an indexed slice would have raised: PyTorch cannot freeze part
  of a tensor that way.) Here names are matched on the unwrapped model (a leading ``module.`` is
  stripped from every state-dict key) and rows are frozen by :class:`RowFreezer`.
* **Zeroing gradients is not enough under AdamW.** Decoupled weight decay shrinks every parameter by
  ``lr * wd`` per step whatever its gradient, so a row whose gradient is always zero still drifts
  towards zero (lr 0.1, wd 0.2: 1.0 -> 0.904 in five steps). :class:`RowFreezer` therefore zeroes the
  suppressed rows' gradients (so their Adam moments stay zero and they do not count in gradient
  clipping) **and** writes the pretrained values back after every optimiser step; the rows are then
  bit-identical to the pretrained ones at every step (checked at the end of each run).
* The per-row loop of the release recomputes the whole tensor's norm per row (very slow for the
  token embedding); the ranking here is vectorised.

A known pathology of the ranking (not a bug, a property of the rule): dividing by each tensor's own
Frobenius norm makes scores scale roughly like ``1 / sqrt(numel)``, so big tensors (the token
embedding above all, whose rows mostly get no gradient at all) collect the lowest scores. With
``m = 0.9`` the unsuppressed 10 % can be almost only vocabulary rows, i.e. nearly every weight matrix
of both towers is frozen and DPS degenerates towards training biases and LayerNorms. The run logs
the fraction of rows and of parameters suppressed (``split="mask"`` rows and ``extra["mask_stats"]``)
so this is visible; ``per_tensor_quota``, ``normalisation="none"``, ``exclude_token_embedding`` and
``image_tower_only`` are the alternatives.

Knobs: ``train``, ``mask_ratio`` (fraction of eligible rows frozen), ``reference`` /
``reference_method`` / ``reference_overrides``, ``normalisation``, ``per_tensor_quota``,
``exclude_token_embedding``, ``image_tower_only``, ``objective`` (``ce_language_head``: the release,
default; ``flyp``: contrastive; ``ce_image_head``: image tower + zero-shot head, text tower frozen),
``templates``. Presets: ``iwildcam`` is the README recipe (20 epochs, lr 1e-5, wd 0.2, batch 64,
warmup 500); ``fmow`` and ``imagenet`` are FLYP's recipes and are *not* from the DPS paper, which
gives only iWildCam commands; ``synthwild`` is a short CPU recipe. Unverified against the paper
text (unavailable): the row definition (max vs sum), the normalisation, and whether rows are frozen
or merely down-weighted.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import knobs
from ..models import ClipModel, ImageClassifier, build_zeroshot_head, encode_class_prompts, load_checkpoint
from ..task import Batch
from ..train import TrainConfig
from .common import RunContext, RunResult, metrics_at, sweep_table, tidy_rows
from .flyp import Config as FlypConfig
from .flyp import FlypTask

log = logging.getLogger(__name__)

NAME = "dps"
OBJECTIVES = ("ce_language_head", "flyp", "ce_image_head")
NORMALISATIONS = ("per_tensor", "none")
EXCLUDED_SUBSTRINGS = ("bias", "positional_embedding")
TOKEN_EMBEDDING = "token_embedding.weight"

StateDict = Mapping[str, torch.Tensor]
Eligibility = Callable[[str, torch.Tensor], bool]


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=1e-5, weight_decay=0.2,
                                                                   batch_size=64, warmup_steps=500))
    mask_ratio: float = 0.9             # fraction of eligible rows frozen (the released default; 0 = plain run)
    mask_ratios: tuple[float, ...] = ()  # extra ratios, each a full training run from the pretrained weights
    sweep_epochs: int | None = None     # epochs of each extra ratio's run (None: the same as the main run)
    reference: str | None = None        # fine-tuned checkpoint that defines the ranking; None: run reference_method
    reference_method: str = "dps"       # "dps" = this method with mask_ratio=0 and the same objective/schedule
    reference_overrides: dict | None = None  # config overrides for the reference run
    objective: str = "ce_language_head"  # "ce_language_head" (released) | "flyp" | "ce_image_head"
    normalisation: str = "per_tensor"   # row score divided by its tensor's ||delta||_F ("per_tensor") or not ("none")
    per_tensor_quota: bool = False      # freeze mask_ratio of the rows of *each* tensor instead of globally
    exclude_token_embedding: bool = False  # keep the vocabulary out of the ranking (always trained)
    image_tower_only: bool = False      # rank (and freeze) only image-tower rows
    templates: tuple[str, ...] | None = None  # prompt templates; None = the dataset's

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
        self.mask_ratio = knobs.check("mask_ratio", self.mask_ratio)
        self.mask_ratios = knobs.check_all("mask_ratio", self.mask_ratios) if self.mask_ratios else ()
        if self.sweep_epochs is not None and (isinstance(self.sweep_epochs, bool) or
                                              not isinstance(self.sweep_epochs, int) or self.sweep_epochs < 1):
            raise ValueError(f"sweep_epochs must be an integer >= 1 (or None), got {self.sweep_epochs!r}")


PRESETS = {
    # CPU minutes: the reference run (mask_ratio=0) and the DPS run use the same short schedule
    "synthwild": {"epochs": 2, "batch_size": 128, "lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 20,
                  "augment": "none"},
    # changliu816/DPS README: ViT-B/16, 20 epochs, lr 1e-5, wd 0.2, batch 64, warmup 500, CE with language head
    "iwildcam": {"epochs": 20, "batch_size": 64, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500,
                 "augment": "rrc"},
    # not from the DPS paper (it has no FMoW/ImageNet recipe): FLYP's README recipes
    "fmow": {"epochs": 20, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500, "augment": "rrc"},
    "imagenet": {"epochs": 10, "batch_size": 512, "lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500,
                 "select_split": None, "eval_splits": [], "augment": "rrc"},
}


# --------------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------------
def unwrap_name(name: str) -> str:
    """A parameter name as the bare model sees it: leading ``module.`` (DataParallel/DDP) removed."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def unwrap_state(state: StateDict) -> dict[str, torch.Tensor]:
    """``state`` with every key unwrapped (:func:`unwrap_name`); two keys that collide are an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = unwrap_name(key)
        if name in out:
            raise ValueError(f"state dict has both {name!r} and a 'module.'-prefixed copy of it; pass one model")
        out[name] = value
    return out


def is_eligible(name: str, tensor: torch.Tensor) -> bool:
    """The released eligibility rule: >= 2-D, not a bias, positional embedding or LayerNorm tensor.

    The release tests the substring ``ln``; here a LayerNorm is a dotted name part starting with
    ``ln`` (``ln_1``, ``ln_pre``, ``ln_final``), which selects the same tensors on CLIP without
    catching unrelated names that merely contain the letters.
    """
    if tensor.ndim < 2 or not tensor.is_floating_point():
        return False
    if any(s in name for s in EXCLUDED_SUBSTRINGS):
        return False
    return not any(part.startswith("ln") for part in name.split("."))


def row_scores(theta0: torch.Tensor, theta_ref: torch.Tensor, normalisation: str = "per_tensor") -> torch.Tensor:
    """Score of every row (first axis) of one tensor: its largest absolute change.

    Args:
        theta0, theta_ref: the pretrained and the reference (fine-tuned) tensor, same shape.
        normalisation: ``"per_tensor"`` divides by the Frobenius norm of the tensor's whole change
            (the release); ``"none"`` keeps the raw maximum.

    Returns:
        float32 scores of shape ``(rows,)``. An unchanged tensor scores 0 everywhere (never
        ``nan``): its rows are the least changed and are suppressed last.
    """
    delta = (theta_ref.detach().float().cpu() - theta0.detach().float().cpu()).abs().reshape(len(theta0), -1)
    scores = delta.amax(dim=1)
    if normalisation == "per_tensor":
        norm = delta.norm()
        return scores / norm if norm > 0 else torch.zeros_like(scores)
    if normalisation == "none":
        return scores
    raise ValueError(f"unknown normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")


@dataclass
class RowRanking:
    """All eligible rows, scored and sorted once (descending); every mask ratio is a prefix of it.

    Attributes:
        names: eligible tensor names (unwrapped), in state-dict order.
        shapes: tensor name -> shape.
        scores: tensor name -> float32 row scores ``(rows,)``.
        order_tensor, order_row: the global order, as (index into ``names``, row) pairs, most
            changed first. Ties keep state-dict order, then row order.
        normalisation: how the scores were normalised.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    scores: dict[str, torch.Tensor]
    order_tensor: torch.Tensor
    order_row: torch.Tensor
    normalisation: str = "per_tensor"

    @property
    def num_rows(self) -> int:
        """N, the number of eligible rows."""
        return len(self.order_row)

    def rows_of(self, name: str) -> int:
        return self.shapes[name][0]

    def table(self) -> pd.DataFrame:
        """One row per eligible tensor: rows, parameters, and score statistics."""
        return pd.DataFrame([{"tensor": n, "rows": self.rows_of(n), "params": math.prod(self.shapes[n]),
                              "score_max": float(self.scores[n].max()), "score_mean": float(self.scores[n].mean())}
                             for n in self.names])


def rank_rows(
    theta0: StateDict, theta_ref: StateDict, *, eligibility: Eligibility = is_eligible,
    normalisation: str = "per_tensor", exclude_token_embedding: bool = False, image_tower_only: bool = False,
) -> RowRanking:
    """Score every eligible row by how much the reference run changed it, and sort them globally.

    Args:
        theta0: the pretrained state dict (the weights DPS trains from).
        theta_ref: the reference fine-tuned state dict. Extra keys (e.g. a ``head.*``) are ignored;
            ``module.`` prefixes in either dict are stripped before matching.
        eligibility: ``(name, tensor) -> bool``, which tensors take part (default: the release's).
        normalisation: see :func:`row_scores`.
        exclude_token_embedding: leave ``token_embedding.weight`` out (it then always trains).
        image_tower_only: rank only ``visual.*`` tensors.

    Returns:
        A :class:`RowRanking`.

    Raises:
        KeyError: the reference lacks an eligible tensor (different architecture or naming).
        ValueError: shapes differ, or no tensor is eligible.
    """
    base, ref = unwrap_state(theta0), unwrap_state(theta_ref)
    names = [n for n, t in base.items() if eligibility(n, t)
             and not (exclude_token_embedding and n == TOKEN_EMBEDDING)
             and not (image_tower_only and not n.startswith("visual."))]
    if not names:
        raise ValueError("no tensor is eligible for DPS ranking; check the eligibility rule and the tower options")
    absent = [n for n in names if n not in ref]
    if absent:
        raise KeyError(f"the reference model lacks {len(absent)} eligible tensor(s), e.g. {absent[:3]}; it must be "
                       "a fine-tuned copy of the same architecture (same parameter names)")
    for n in names:
        if tuple(ref[n].shape) != tuple(base[n].shape):
            raise ValueError(f"tensor {n!r} has shape {tuple(base[n].shape)} in the pretrained model but "
                             f"{tuple(ref[n].shape)} in the reference")
    scores = {n: row_scores(base[n], ref[n], normalisation) for n in names}
    flat = torch.cat([scores[n] for n in names])
    tensor_id = torch.cat([torch.full((len(scores[n]),), i, dtype=torch.long) for i, n in enumerate(names)])
    row_id = torch.cat([torch.arange(len(scores[n])) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices
    return RowRanking(names, {n: tuple(base[n].shape) for n in names}, scores, tensor_id[order], row_id[order],
                      normalisation)


def masks_for_ratio(ranking: RowRanking, mask_ratio: float, *, per_tensor_quota: bool = False,
                    ) -> dict[str, torch.Tensor]:
    """Boolean row masks (True = suppressed) for one mask ratio, for every ranked tensor.

    Global (default): the first ``floor(mask_ratio * N)`` rows of the ranking. With
    ``per_tensor_quota``: the ``floor(mask_ratio * R)`` highest-scoring rows of each tensor of ``R``
    rows. Both are nested: a higher ratio suppresses a superset of the rows of a lower one.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio is the fraction of eligible rows to freeze and must lie in [0, 1], "
                         f"got {mask_ratio}")
    masks = {n: torch.zeros(ranking.rows_of(n), dtype=torch.bool) for n in ranking.names}
    if per_tensor_quota:
        for n in ranking.names:
            k = math.floor(mask_ratio * ranking.rows_of(n))
            top = torch.sort(ranking.scores[n], descending=True, stable=True).indices[:k]
            masks[n][top] = True
        return masks
    k = math.floor(mask_ratio * ranking.num_rows)
    for i, n in enumerate(ranking.names):
        chosen = ranking.order_tensor[:k] == i
        masks[n][ranking.order_row[:k][chosen]] = True
    return masks


def mask_sweep(ranking: RowRanking, ratios: Sequence[float], *, per_tensor_quota: bool = False,
               ) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for several ratios from one ranking (nothing is re-ranked)."""
    return {float(r): masks_for_ratio(ranking, r, per_tensor_quota=per_tensor_quota) for r in ratios}


@dataclass
class MaskStats:
    """How much a mask suppresses.

    Attributes:
        summary: ``rows_frac`` (suppressed / eligible rows), ``params_frac`` (suppressed / all
            floating-point parameters of the model), ``eligible_params_frac`` (suppressed / eligible
            parameters), ``tensors_fully_frozen`` and the raw counts.
        per_tensor: one row per ranked tensor: rows, suppressed rows and their fraction.
    """

    summary: dict[str, float]
    per_tensor: pd.DataFrame


def mask_stats(masks: Mapping[str, torch.Tensor], state: StateDict) -> MaskStats:
    """Fractions of rows and of parameters that ``masks`` suppress in a model with ``state``."""
    state = unwrap_state(state)
    rows = []
    for name, mask in masks.items():
        shape = tuple(state[name].shape)
        per_row = math.prod(shape[1:])
        rows.append({"tensor": name, "rows": len(mask), "suppressed_rows": int(mask.sum()),
                     "params": math.prod(shape), "suppressed_params": int(mask.sum()) * per_row})
    table = pd.DataFrame(rows, columns=["tensor", "rows", "suppressed_rows", "params", "suppressed_params"])
    table["frac"] = table.suppressed_rows / table.rows.clip(lower=1)
    total = sum(t.numel() for t in state.values() if t.is_floating_point())
    eligible_rows, eligible_params = int(table.rows.sum()), int(table.params.sum())
    summary = {
        "rows_frac": float(table.suppressed_rows.sum() / eligible_rows) if eligible_rows else 0.0,
        "params_frac": float(table.suppressed_params.sum() / total) if total else 0.0,
        "eligible_params_frac": float(table.suppressed_params.sum() / eligible_params) if eligible_params else 0.0,
        "tensors_fully_frozen": float((table.suppressed_rows == table.rows).sum()) if len(table) else 0.0,
        "suppressed_rows": float(table.suppressed_rows.sum()), "eligible_rows": float(eligible_rows),
        "suppressed_params": float(table.suppressed_params.sum()), "total_params": float(total),
    }
    return MaskStats(summary, table)


# --------------------------------------------------------------------------------------------------
# Holding rows at their pretrained values
# --------------------------------------------------------------------------------------------------
class RowFreezer:
    """Keeps the masked rows of some parameters bit-identical to their current (pretrained) values.

    Two mechanisms, both needed under AdamW (see the module docstring):

    * a gradient hook per parameter zeroes the masked rows of its gradient (Adam moments stay zero,
      clipping ignores them);
    * :meth:`restore` (call it after every optimiser step) writes the saved values back, undoing
      decoupled weight decay.

    A tensor whose rows are *all* masked is simply taken out of training (``requires_grad=False``),
    which also saves its weight-gradient computation. :meth:`release` removes the hooks and restores
    the ``requires_grad`` flags.

    The saved rows are plain tensors, not module buffers: they follow their parameter's device
    lazily, and DDP never broadcasts them (for ViT-B/16 at m = 0.9 they are ~0.5 GB).

    Args:
        params: parameter name -> parameter (e.g. ``dict(model.named_parameters())``).
        masks: parameter name -> boolean row mask; names may carry a ``module.`` prefix.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
        params = {unwrap_name(n): p for n, p in params.items()}
        unknown = [n for n in map(unwrap_name, masks) if n not in params]
        if unknown:
            raise KeyError(f"masks name parameters the model does not have, e.g. {unknown[:3]}; the mask must be "
                           "computed on the same architecture")
        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._flags: dict[str, bool] = {}
        self._hooks: list = []
        for name, mask in ((unwrap_name(n), m) for n, m in masks.items()):
            self._add(name, params[name], mask.to(torch.bool))

    def _add(self, name: str, param: nn.Parameter, mask: torch.Tensor) -> None:
        if mask.shape != param.shape[:1]:
            raise ValueError(f"mask of {name!r} has {tuple(mask.shape)} entries but the tensor has "
                             f"{param.shape[0]} rows")
        if not mask.any():
            return
        mask = mask.to(param.device)
        self._params[name], self._masks[name], self._flags[name] = param, mask, param.requires_grad
        self._rows[name] = param.detach()[mask].clone()
        if mask.all():
            param.requires_grad_(False)
        elif param.requires_grad:
            self._hooks.append(param.register_hook(self._grad_hook(name, param.ndim)))

    def _mask(self, name: str, device: torch.device) -> torch.Tensor:
        if self._masks[name].device != device:
            self._masks[name] = self._masks[name].to(device)
        return self._masks[name]

    def _saved(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if self._rows[name].device != like.device or self._rows[name].dtype != like.dtype:
            self._rows[name] = self._rows[name].to(like.device, like.dtype)
        return self._rows[name]

    def _grad_hook(self, name: str, ndim: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def zero_masked_rows(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(self._mask(name, grad.device).view(-1, *([1] * (ndim - 1))), 0)
        return zero_masked_rows

    @property
    def names(self) -> list[str]:
        """Names of the parameters with at least one suppressed row."""
        return list(self._params)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved rows back (after every optimiser step)."""
        for name, param in self._params.items():
            param[self._mask(name, param.device)] = self._saved(name, param)

    @torch.no_grad()
    def changed(self) -> list[str]:
        """Names of parameters whose suppressed rows differ (bit-wise) from the saved values."""
        return [name for name, param in self._params.items()
                if not torch.equal(param[self._mask(name, param.device)], self._saved(name, param))]

    def release(self) -> None:
        """Remove the gradient hooks and restore the parameters' ``requires_grad`` flags."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for name, flag in self._flags.items():
            self._params[name].requires_grad_(flag)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
class DPSTask(FlypTask):
    """Fine-tunes from the pretrained weights with suppressed rows held at their pretrained values.

    Objectives (``cfg.objective``):

    * ``ce_language_head`` (the release): per step one random template per class (independently per
      class, the same on every rank), all C prompts encoded by the *trainable* text tower; logits =
      ``exp(s) * cos(image, class)``; cross-entropy. Both towers and the logit scale train.
    * ``flyp``: FLYP's contrastive loss on one random caption per image (both towers + scale).
    * ``ce_image_head``: image tower + a zero-shot-initialised linear head with cross-entropy (the
      text tower is frozen), as :mod:`rftlib.methods.finetune`.

    Args:
        clip: the pretrained CLIP (trained in place).
        classnames, templates: the prompts.
        masks: tensor name -> boolean row mask of the rows to hold (may be empty).
        cfg: the DPS config.
    """

    method_name = NAME

    def __init__(self, clip: ClipModel, classnames: list[str], templates: list[str],
                 masks: Mapping[str, torch.Tensor], cfg: Config):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; valid: {', '.join(OBJECTIVES)}")
        super().__init__(clip, classnames, templates, FlypConfig(train=cfg.train))
        self.method_config, self.objective = cfg, cfg.objective
        self.head = None
        if cfg.objective == "ce_image_head":
            self.head = build_zeroshot_head(clip, classnames, templates).to(clip.device)
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("visual."))
        self.freezer = RowFreezer(dict(self.model.named_parameters()), masks)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.objective == "flyp":
            return super().training_step(batch)
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.float(), batch.labels)
        return {"loss": loss, "acc": (logits.argmax(1) == batch.labels).float().mean(),
                "logit_scale": self.model.logit_scale.exp().detach()}

    def logits(self, batch: Batch) -> torch.Tensor:
        """Training logits of the CE objectives."""
        features = self.model.encode_image(batch.images)
        if self.head is not None:
            return self.head(features)
        picks = torch.randint(len(self.templates), (len(self.classnames),), generator=batch.generator)
        prompts = [self.templates[t].format(c) for t, c in zip(picks.tolist(), self.classnames)]
        text = encode_class_prompts(self.clip, prompts, grad=True)
        return self.model.logit_scale.exp() * F.normalize(features.float(), dim=-1) @ text.T

    def after_optimizer_step(self) -> None:
        self.freezer.restore()
        super().after_optimizer_step()

    def classifier(self) -> nn.Module:
        if self.head is not None:
            return ImageClassifier(self.model.visual, self.head)
        return super().classifier()  # head rebuilt from the current text tower, all templates

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        if self.head is not None:
            state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        if self.head is not None:
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})



def reference_state(ctx: RunContext, cfg: Config) -> tuple[dict[str, torch.Tensor], Path | None, RunResult | None]:
    """The reference fine-tuned weights (CLIP keys only), where they came from, and the reference run.

    ``cfg.reference`` is loaded if given (its architecture must be ``ctx.clip``'s; no run); otherwise
    ``cfg.reference_method`` is run on a deep copy of ``ctx.clip`` (which stays pretrained). The
    default, ``"dps"`` with ``mask_ratio=0``, is the released pipeline's first step: the same
    objective and schedule with nothing suppressed.
    """
    if cfg.reference is not None:
        state, _ = load_checkpoint(cfg.reference, architecture=ctx.clip.name)
        return {k: v for k, v in state.items() if not k.startswith("head.")}, Path(cfg.reference), None
    overrides = dict(cfg.reference_overrides or {})
    if cfg.reference_method == NAME:
        overrides = {**{f"train.{k}": v for k, v in asdict(cfg.train).items()}, "objective": cfg.objective,
                     "templates": cfg.templates, **overrides, "mask_ratio": 0.0}
    log.info("dps: training the reference model with %r", cfg.reference_method)
    base = ctx.run_base(cfg.reference_method, overrides, folder="reference", label=False)
    state = {k: v.detach().cpu().clone() for k, v in base.clip.model.state_dict().items()}
    return state, base.checkpoint, base


def reference_is_ratio_zero(cfg: Config) -> bool:
    """Whether the reference run is exactly this config's run at mask ratio 0 with the sweep's
    schedule (the default), so a sweep's ratio 0 can reuse it instead of training it again."""
    same_schedule = cfg.sweep_epochs in (None, cfg.train.epochs)
    return cfg.reference is None and cfg.reference_method == NAME and not cfg.reference_overrides and same_schedule


def build_masks(theta0: StateDict, theta_ref: StateDict | None, cfg: Config) -> tuple[dict, RowRanking | None]:
    """Rank with the config's options and cut at ``cfg.mask_ratio`` (no ranking needed at 0)."""
    if cfg.mask_ratio == 0.0 or theta_ref is None:
        return {}, None
    ranking = rank_rows(theta0, theta_ref, normalisation=cfg.normalisation,
                        exclude_token_embedding=cfg.exclude_token_embedding, image_tower_only=cfg.image_tower_only)
    return masks_for_ratio(ranking, cfg.mask_ratio, per_tensor_quota=cfg.per_tensor_quota), ranking


def train_masked(ctx: RunContext, cfg: Config, masks: Mapping[str, torch.Tensor], *, clip: ClipModel | None = None,
                 out_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """Train ``clip`` (default ``ctx.clip``) with ``masks`` held; returns the classifier and fit facts.

    Per-epoch evaluations are logged with the ``mask_ratio`` knob. Raises ``RuntimeError`` if a
    suppressed row differs from its pretrained value at the end (it never should).
    """
    clip = clip if clip is not None else ctx.clip
    task = DPSTask(clip, ctx.dataset.classnames, list(cfg.templates or ctx.dataset.templates), masks, cfg)
    try:
        result = ctx.fit(task, cfg.train, callbacks=[ctx.results_logger({"mask_ratio": cfg.mask_ratio})],
                         out_dir=out_dir)
        changed = task.freezer.changed()
    finally:
        task.freezer.release()
    if changed:
        raise RuntimeError(f"suppressed rows of {changed[:3]} moved during training; this is a bug in DPS's "
                           "RowFreezer, please report it")
    return task.classifier(), result


def log_mask_stats(ctx: RunContext, stats: MaskStats, mask_ratio: float) -> None:
    """Record the suppressed fractions as ``info`` rows of ``split="mask"`` carrying ``mask_ratio``."""
    keep = ("rows_frac", "params_frac", "eligible_params_frac", "tensors_fully_frozen")
    ctx.log("mask", "mask", {k: stats.summary[k] for k in keep}, kind="info", knobs={"mask_ratio": mask_ratio})
    log.info("dps: mask_ratio %.2f suppresses %.1f %% of eligible rows, %.1f %% of all parameters",
             mask_ratio, 100 * stats.summary["rows_frac"], 100 * stats.summary["params_frac"])


def run(ctx: RunContext, cfg: Config) -> RunResult:
    """Reference (if needed) -> ranking -> masks -> masked training -> evaluation of every split.

    Result rows carry ``mask_ratio``; ``split="mask"`` rows record the suppressed fractions.
    ``extra`` holds ``mask_stats`` (:class:`MaskStats`), ``masks``, ``ranking`` (``None`` at ratio 0),
    ``reference`` (the reference checkpoint path, or its state dict when none was saved),
    ``sweep`` (a tidy frame over the main ratio and every extra one of ``mask_ratios``, with
    ``split="mask"`` rows for the suppressed fractions), ``best_epoch`` and ``history``.
    """
    extra_ratios = sorted(set(cfg.mask_ratios) - {cfg.mask_ratio})
    pristine = copy.deepcopy(ctx.clip) if extra_ratios else None
    theta0 = {k: v.detach().cpu().clone() for k, v in ctx.clip.model.state_dict().items()}
    needs_reference = any(r > 0 for r in (cfg.mask_ratio, *extra_ratios))
    ref_state, ref_path, reference = reference_state(ctx, cfg) if needs_reference else (None, None, None)
    masks, ranking = build_masks(theta0, ref_state, cfg)
    stats = mask_stats(masks, theta0)
    log_mask_stats(ctx, stats, cfg.mask_ratio)
    model, fitted = train_masked(ctx, cfg, masks)
    rows = _ratio_rows(ctx, model, cfg.mask_ratio, stats, report=True, epoch=fitted.best_epoch)
    for ratio in extra_ratios:
        if ratio == 0.0 and reference is not None and reference_is_ratio_zero(cfg):  # trained already
            rows += _ratio_rows(ctx, reference.classifier, 0.0, mask_stats({}, theta0), report=False,
                                epoch=reference.extra.get("best_epoch"))
        else:
            rows += _extra_ratio(ctx, cfg, ratio, theta0, ref_state, pristine)
    table = sweep_table(rows, "mask_ratio")
    return ctx.conclude(model, fitted, metrics=metrics_at(table, "mask_ratio", cfg.mask_ratio), sweep=table,
                        mask_stats=stats, masks=masks, ranking=ranking,
                        reference=str(ref_path) if ref_path is not None else ref_state)


# --------------------------------------------------------------------------------------------------
# Mask-ratio sweep (one training run per ratio)
# --------------------------------------------------------------------------------------------------
def _ratio_rows(ctx: RunContext, model: nn.Module, ratio: float, stats: MaskStats, *, report: bool,
                epoch: int | None) -> list[dict]:
    """Evaluate one ratio's model on every split as sweep rows (and final rows when ``report``),
    plus its mask fractions, as tidy rows of the run's sweep table."""
    fractions = {k: v for k, v in stats.summary.items() if k.endswith("frac")}
    rows = tidy_rows(ctx.dataset, {"mask_ratio": ratio}, "mask", "mask", fractions)
    return rows + ctx.evaluate_point(model, {"mask_ratio": ratio}, report=report, epoch=epoch)


def _extra_ratio(ctx: RunContext, cfg: Config, ratio: float, theta0, ref_state, pristine: ClipModel) -> list[dict]:
    """Train and evaluate one more mask ratio from the pretrained weights (``sweep_epochs`` epochs),
    in ``<out_dir>/mask_<ratio>`` so that it resumes with the run."""
    train = cfg.train if cfg.sweep_epochs is None else dataclasses.replace(cfg.train, epochs=cfg.sweep_epochs)
    rcfg = dataclasses.replace(cfg, mask_ratio=ratio, train=train)
    masks, _ = build_masks(theta0, ref_state, rcfg)
    stats = mask_stats(masks, theta0)
    log_mask_stats(ctx, stats, ratio)
    out_dir = ctx.out_dir / f"mask_{ratio:g}" if ctx.out_dir is not None else None
    model, fitted = train_masked(ctx, rcfg, masks, clip=copy.deepcopy(pristine), out_dir=out_dir)
    return _ratio_rows(ctx, model, ratio, stats, report=False, epoch=fitted.best_epoch)
