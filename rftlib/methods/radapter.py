"""R-Adapter: linear residual adapters in both CLIP towers, self-ensembled three ways.

Idea: freeze CLIP and put a purely linear adapter ``A(h) = h + s * h W^T`` (no bias, no
non-linearity) on the output of the attention branch and of the MLP branch of **every** residual
block of **both** towers, so each block computes ``x = x + A_attn(attn(ln_1(x)))`` and
``x = x + A_mlp(mlp(ln_2(x)))``. ``W`` starts at zero (the model starts as zero-shot CLIP) and the
learnable scale ``s`` at 0.1. Three "self-ensembles" give WiSE-FT-like robustness inside a single
model:

* **adapter dropping** (dynamic ensemble): during training the adapter's output ``h W^T`` is
  dropped with probability ``drop`` and kept paths are rescaled by ``1 / (1 - drop)``; the
  granularity is explicit (``module``: one draw per adapter call; ``sample``: one per example;
  ``token``: one per token position, shared across the batch, which is what the released code
  did with its sequence-first layout);
* **accumulation** (temporal ensemble): an EMA shadow of every adapter tensor,
  ``shadow <- m * shadow + (1 - m) * param`` after each optimiser step, starting from the initial
  adapter (no bias correction); evaluation uses the shadow;
* **re-scaling** (weight-space ensemble): at inference the adapter becomes ``h + alpha * s W h``
  and, being linear, folds into the preceding projection: ``W_o' = (I + alpha s W) W_o`` and
  ``b_o' = (I + alpha s W) b_o`` for the attention ``out_proj`` and the MLP ``c_proj``. ``alpha = 0``
  is the zero-shot model, ``alpha = 1`` the fine-tuned one. A merged model is a plain open_clip
  model: :func:`export_merged` writes it as an ordinary rftlib checkpoint.

Training uses MPM-NCE (:func:`mpm_nce_loss`): a contrastive loss between images and class-prompt
captions (one random template per image, as FLYP) where every same-label pair in the batch is a
positive, a margin ``delta`` is added to negatives and targets are label-smoothed by ``eps``; the
temperature is CLIP's frozen logit scale.

Implementation: the adapters replace open_clip's ``ls_1`` / ``ls_2`` modules of each
``ResidualAttentionBlock`` (``nn.Identity`` when the config has no LayerScale, as for every CLIP
config), which sit exactly between each branch and its residual add; nothing else of open_clip is
patched. Under DDP, image and caption features and labels are gathered with gradients so the loss
spans the global batch (dropping masks come from each rank's torch RNG, seeded and checkpointed by
the loop, so only ``drop=0`` runs are bit-comparable across world sizes). The run adds the
adapters to ``ctx.clip`` in place; the returned classifier evaluates the EMA adapters at
``scale`` without merging.

Checkpoints: the loop's checkpoints (``best.safetensors``, ...) hold the *un-merged* CLIP under
its stock open_clip names plus ``radapter.<block>.ls_{1,2}.<tensor>`` (live adapters) and
``radapter_ema.<...>`` (shadows); :func:`load_radapter` rebuilds the adapted model from them
(:func:`rftlib.models.load_classifier` does not: the adapter keys are not open_clip's). A run
also writes ``merged.safetensors`` (:func:`export_merged` at ``scale``): a plain CLIP + head
checkpoint that ``load_classifier`` and stock open_clip load. ``RunResult.extra`` holds the
re-scaling table (``sweep``) and ``scale_sweep`` (a function ``scales -> table`` for sliders).

Choices, each a config knob (defaults in :class:`Config`):

* ``rank_vision`` / ``rank_text``: ``None`` = full-rank ``W`` (d x d, zero-init); ``r < d`` =
  low-rank ``W = U D`` (U d x r zero-init, D r x d Xavier-uniform); ``r >= d`` is full rank;
  ``0`` = no adapters in that tower. The released code had this condition inverted (it built the
  low-rank pair only when ``d < r``, so every ``r < d`` silently trained a full-rank adapter and
  crashed when merging); fixed here.
* ``drop``, ``granularity`` (above); ``ema`` (``None``: evaluate the live adapters);
  ``scale`` (the re-scaling alpha used for per-epoch evaluation, the reported metrics and the merged
  export; the released code also applied it to the unmerged evaluation path).
* ``margin``, ``label_smoothing``. When a batch row has no negatives (every label equal) the
  smoothing mass has nowhere to go; the released formula divides by zero there. Here such a row
  puts all its mass on its positives (its loss stays finite). Each caption row uses its own
  positive set (its targets sum to 1), as the released code does.
* EMA shadows are kept per tensor (``U`` and ``D`` separately for low rank, and ``s``), as released,
  and the merge uses ``alpha * s_bar * U_bar D_bar``.

Paper: Kim, Jeong, Kim, Kwak, "Efficient and Versatile Robust Fine-Tuning of Zero-Shot Models",
ECCV 2024 (arXiv 2408.05749). Presets: ``imagenet`` is the paper's ViT-B/16 recipe (10 epochs,
AdamW lr 5e-4, wd 0, batch 512, grad clip 1.0, warmup 500, full rank, p 0.2, m 0.999, alpha 0.5,
eps 0.02, delta 0.05, token-level dropping as released); ``iwildcam`` / ``fmow`` are **not** from
the paper (our choice: the ImageNet adapter settings with FLYP's data budget); ``synthwild`` is a
CPU recipe of about two minutes (one epoch, lr 1e-2 chosen on ID val, EMA 0.95).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import dist as rdist
from .. import knobs
from ..models import ClipModel, ImageClassifier, build_zeroshot_head, save_checkpoint
from ..task import Batch, Task
from ..train import TrainConfig
from .common import RunContext, RunResult, metrics_at, refuse_accumulation, sweep_table, tidy_rows
from .flyp import CaptionMixin

log = logging.getLogger(__name__)

NAME = "radapter"
GRANULARITIES = ("module", "sample", "token")
ADAPTER_PREFIX = "radapter."
EMA_PREFIX = "radapter_ema."
TOWERS = ("vision", "text")


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, batch_size=512, lr=5e-4, weight_decay=0.0, warmup_steps=500, grad_clip=1.0))
    rank_vision: int | None = None   # image-tower adapter rank: None/>=width full rank, 0 = no adapters
    rank_text: int | None = None     # text-tower adapter rank (same convention)
    drop: float = 0.2                # adapter-dropping probability during training
    granularity: str = "sample"      # "module" | "sample" | "token" (token = per position, shared by the batch)
    init_scale: float = 0.1          # initial value of each adapter's learnable scale s
    ema: float | None = 0.999        # EMA momentum of the adapter shadow (None: no shadow)
    margin: float = 0.05             # MPM-NCE margin delta added to negative similarities
    label_smoothing: float = 0.02    # MPM-NCE smoothing eps spread over the negatives
    scale: float = 0.5               # re-scaling alpha for evaluation, reported metrics and export
    scales: tuple[float, ...] = ()   # extra re-scaling values the run evaluates (sweep rows)
    templates: tuple[str, ...] | None = None  # caption/head templates; None = the dataset's
    export_merged: bool = True       # write <out_dir>/merged.safetensors (plain open_clip + head)

    def __post_init__(self):
        refuse_accumulation(self.train, NAME)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        self.scale = knobs.check("scale", self.scale)
        self.scales = knobs.check_all("scale", self.scales) if self.scales else ()
        for name, value in (("margin", self.margin), ("label_smoothing", self.label_smoothing)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


PRESETS = {
    # CPU, about two minutes: one pass over the train split (lr chosen on id_val macro-F1 among
    # 5e-4, 2e-3, 5e-3, 1e-2), a short EMA so that the shadow reflects this short run, and no
    # per-epoch validation (with one epoch there is nothing to select)
    "synthwild": {"epochs": 1, "batch_size": 128, "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 10,
                  "grad_clip": 1.0, "ema": 0.95, "select_split": None, "eval_splits": [], "augment": "none"},
    "imagenet": {"epochs": 10, "batch_size": 512, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 500,
                 "grad_clip": 1.0, "granularity": "token", "select_split": None, "eval_splits": [], "augment": "rrc"},
    # not from the paper: the ImageNet adapter settings with FLYP's WILDS data budget
    "iwildcam": {"epochs": 10, "batch_size": 256, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 500,
                 "grad_clip": 1.0, "augment": "rrc"},
    "fmow": {"epochs": 10, "batch_size": 256, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 500,
             "grad_clip": 1.0, "augment": "rrc"},
}


# --------------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, p: float, granularity: str, batch_first: bool = True) -> torch.Tensor:
    """Zero ``x`` at random with probability ``p`` and rescale the rest by ``1 / (1 - p)``.

    Args:
        x: the adapter output, ``(N, L, D)`` when ``batch_first`` else ``(L, N, D)``.
        p: drop probability in ``[0, 1)``.
        granularity: ``module`` (one draw for the whole tensor), ``sample`` (one per example) or
            ``token`` (one per token position, shared by every example of the batch).
        batch_first: the tensor layout of the transformer the adapter sits in.

    Returns:
        ``x * mask`` where ``mask`` broadcasts over the dimensions the draw is shared across.
    """
    if p == 0.0:
        return x
    shape = [1] * x.dim()
    if granularity == "sample":
        shape[0 if batch_first or x.dim() < 3 else 1] = x.shape[0 if batch_first or x.dim() < 3 else 1]
    elif granularity == "token":
        if x.dim() < 3:
            raise ValueError(f"token-level dropping needs (batch, tokens, dim) inputs, got shape {tuple(x.shape)}")
        axis = 1 if batch_first else 0
        shape[axis] = x.shape[axis]
    elif granularity != "module":
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    keep = 1.0 - p
    mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
    return x * mask


class LinearAdapter(nn.Module):
    """``h -> h + alpha * s * drop(h W^T)``: a bias-free linear residual adapter.

    ``W`` is a zero-initialised ``dim x dim`` matrix (full rank) or the product ``U D`` with ``U``
    (``dim x rank``) zero-initialised and ``D`` (``rank x dim``) Xavier-uniform, used exactly when
    ``rank < dim``. Because ``W`` (or ``U``) starts at zero the adapter starts as the identity.

    The module also holds the EMA shadow of its tensors (buffers ``ema_*``), and three switches
    set by :func:`adapter_mode` / :func:`merge_adapters`: ``use_ema`` (compute with the shadow),
    ``alpha`` (the re-scaling coefficient, 1 while training) and ``merged`` (the adapter has been
    folded into the preceding projection and is now the identity).

    Args:
        dim: feature width ``d``.
        rank: ``None`` or ``>= dim`` for full rank, else the rank ``r`` of ``U D``.
        drop: adapter-dropping probability in training mode (0 in eval mode).
        granularity: see :func:`drop_path`.
        init_scale: initial value of the learnable scale ``s``.
        batch_first: layout of the inputs (open_clip's transformers are batch-first).
    """

    def __init__(self, dim: int, rank: int | None = None, *, drop: float = 0.0, granularity: str = "sample",
                 init_scale: float = 0.1, batch_first: bool = True):
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"adapter rank must be a positive integer or None (full rank), got {rank}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must lie in [0, 1), got {drop}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
        self.dim, self.drop, self.granularity, self.batch_first = dim, drop, granularity, batch_first
        self.low_rank = rank is not None and rank < dim
        if self.low_rank:
            self.up = nn.Parameter(torch.zeros(dim, rank))
            self.down = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, dim)))
        else:
            self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        for name, p in self._own_parameters():
            self.register_buffer(f"ema_{name}", p.detach().clone())
        self.use_ema, self.alpha, self.merged = False, 1.0, False
        self._originals: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.up.shape[1] if self.low_rank else self.dim

    def _own_parameters(self) -> list[tuple[str, nn.Parameter]]:
        names = ("up", "down", "scale") if self.low_rank else ("weight", "scale")
        return [(n, getattr(self, n)) for n in names]

    def parameter_shadow_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, EMA shadow)`` for every adapter tensor."""
        return [(p, getattr(self, f"ema_{n}")) for n, p in self._own_parameters()]

    def _tensor(self, name: str, use_ema: bool) -> torch.Tensor:
        return getattr(self, f"ema_{name}") if use_ema else getattr(self, name)

    def matrix(self, use_ema: bool = False) -> torch.Tensor:
        """The ``d x d`` matrix ``W`` (``U D`` for low rank), live or EMA."""
        if self.low_rank:
            return self._tensor("up", use_ema) @ self._tensor("down", use_ema)
        return self._tensor("weight", use_ema)

    def effective(self, use_ema: bool = False, alpha: float = 1.0) -> torch.Tensor:
        """``alpha * s * W``: what the adapter adds, as a matrix (``A(h) = h + h M^T``)."""
        return (alpha * self._tensor("scale", use_ema)) * self.matrix(use_ema)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return h
        if self.low_rank:
            delta = F.linear(F.linear(h, self._tensor("down", self.use_ema)), self._tensor("up", self.use_ema))
        else:
            delta = F.linear(h, self._tensor("weight", self.use_ema))
        if self.training and self.drop > 0:
            delta = drop_path(delta, self.drop, self.granularity, self.batch_first)
        return h + (self.alpha * self._tensor("scale", self.use_ema)) * delta

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, rank={self.rank}{' (low rank)' if self.low_rank else ''}, drop={self.drop}, "
                f"granularity={self.granularity}")


# --------------------------------------------------------------------------------------------------
# placing, iterating, EMA
# --------------------------------------------------------------------------------------------------
def _module(model: ClipModel | nn.Module) -> nn.Module:
    return model.model if isinstance(model, ClipModel) else model


def tower_transformers(model: ClipModel | nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{"vision": (name, transformer), "text": (name, transformer)}`` of an open_clip model."""
    net = _module(model)
    found = {}
    if hasattr(getattr(net, "visual", None), "transformer"):
        found["vision"] = ("visual.transformer", net.visual.transformer)
    if hasattr(net, "transformer"):
        found["text"] = ("transformer", net.transformer)
    elif hasattr(getattr(net, "text", None), "transformer"):
        found["text"] = ("text.transformer", net.text.transformer)
    if not found:
        raise TypeError(f"{type(net).__name__} has no open_clip transformer towers (visual.transformer / "
                        "transformer); R-Adapter supports open_clip ViT CLIP models")
    return found


def _blocks(model: ClipModel | nn.Module) -> Iterator[tuple[str, str, nn.Module, bool]]:
    """``(name, tower, block, batch_first)`` for every residual block of both towers."""
    from open_clip.transformer import ResidualAttentionBlock

    for tower, (prefix, transformer) in tower_transformers(model).items():
        for i, block in enumerate(transformer.resblocks):
            if not isinstance(block, ResidualAttentionBlock):
                raise TypeError(f"{prefix}.resblocks.{i} is a {type(block).__name__}; R-Adapter supports open_clip's "
                                "ResidualAttentionBlock only")
            yield f"{prefix}.resblocks.{i}", tower, block, getattr(transformer, "batch_first", True)


def iter_adapters(model: ClipModel | nn.Module) -> Iterator[tuple[str, LinearAdapter]]:
    """``(module name, adapter)`` for every R-Adapter in ``model``, in a fixed order."""
    for name, mod in _module(model).named_modules():
        if isinstance(mod, LinearAdapter):
            yield name, mod


def has_adapters(model: ClipModel | nn.Module) -> bool:
    return next(iter_adapters(model), None) is not None


def add_adapters(
    clip_model: ClipModel | nn.Module, rank_vision: int | None = None, rank_text: int | None = None,
    drop: float = 0.2, granularity: str = "sample", *, init_scale: float = 0.1, freeze: bool = True,
) -> list[LinearAdapter]:
    """Put an R-Adapter after the attention and the MLP branch of every block of both towers.

    The adapters replace the blocks' ``ls_1`` / ``ls_2`` modules (``nn.Identity`` in CLIP configs),
    which open_clip applies to each branch output right before the residual add.

    Args:
        clip_model: a :class:`~rftlib.models.ClipModel` or an open_clip CLIP module (modified in place).
        rank_vision, rank_text: adapter rank per tower (``None`` = full rank, ``0`` = no adapters).
        drop, granularity: adapter dropping (see :func:`drop_path`).
        init_scale: initial learnable scale ``s``.
        freeze: make every non-adapter parameter (logit scale included) non-trainable.

    Returns:
        The new adapters, two per block.

    Raises:
        ValueError: the model already has adapters, or a block uses LayerScale.
    """
    net = _module(clip_model)
    if has_adapters(net):
        raise ValueError("this model already has R-Adapters; build a fresh CLIP (or call remove_adapters first)")
    ranks = {"vision": rank_vision, "text": rank_text}
    if freeze:
        for p in net.parameters():
            p.requires_grad_(False)
    added = []
    for name, tower, block, batch_first in _blocks(net):
        if ranks[tower] == 0:
            continue
        for slot in ("ls_1", "ls_2"):
            if not isinstance(getattr(block, slot), nn.Identity):
                raise ValueError(f"{name}.{slot} is {type(getattr(block, slot)).__name__}, not Identity: models with "
                                 "LayerScale are not supported (the adapter could not be merged into the projection)")
            ref = block.attn.out_proj.weight
            adapter = LinearAdapter(block.attn.embed_dim, ranks[tower], drop=drop, granularity=granularity,
                                    init_scale=init_scale, batch_first=batch_first).to(ref.device, ref.dtype)
            setattr(block, slot, adapter)
            added.append(adapter)
    log.info("added %d R-Adapters (%d trainable parameters)", len(added),
             sum(p.numel() for a in added for p in a.parameters()))
    return added


def remove_adapters(clip_model: ClipModel | nn.Module) -> None:
    """Undo :func:`add_adapters` (unmerging first if needed); the model is zero-shot again."""
    net = _module(clip_model)
    unmerge_adapters(net)
    for _, _, block, _ in _blocks(net):
        for slot in ("ls_1", "ls_2"):
            if isinstance(getattr(block, slot), LinearAdapter):
                setattr(block, slot, nn.Identity())


@torch.no_grad()
def ema_update(model: ClipModel | nn.Module, momentum: float) -> None:
    """``shadow <- momentum * shadow + (1 - momentum) * param`` for every adapter tensor."""
    for _, adapter in iter_adapters(model):
        for p, shadow in adapter.parameter_shadow_pairs():
            shadow.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)


@contextmanager
def adapter_mode(model: ClipModel | nn.Module, *, ema: bool, alpha: float) -> Iterator[None]:
    """Within the block, adapters compute with the EMA shadow (``ema``) and re-scaling ``alpha``."""
    adapters = [a for _, a in iter_adapters(model)]
    saved = [(a.use_ema, a.alpha) for a in adapters]
    for a in adapters:
        a.use_ema, a.alpha = ema, float(alpha)
    try:
        yield
    finally:
        for a, (use_ema, alpha_) in zip(adapters, saved):
            a.use_ema, a.alpha = use_ema, alpha_


# --------------------------------------------------------------------------------------------------
# re-scaling: merge / unmerge
# --------------------------------------------------------------------------------------------------
def _adapter_targets(model: nn.Module) -> Iterator[tuple[str, LinearAdapter, nn.Linear]]:
    """Each adapter with the linear layer whose output it transforms."""
    for name, _, block, _ in _blocks(model):
        for slot, linear in (("ls_1", block.attn.out_proj), ("ls_2", block.mlp.c_proj)):
            adapter = getattr(block, slot)
            if isinstance(adapter, LinearAdapter):
                yield f"{name}.{slot}", adapter, linear


@torch.no_grad()
def merge_adapters(model: ClipModel | nn.Module, alpha: float, *, use_ema: bool = True) -> None:
    """Fold ``alpha * s W`` of every adapter into its projection, in place.

    ``W_o' = W_o + M W_o`` and ``b_o' = b_o + M b_o`` with ``M = alpha * s_bar * W_bar`` (the EMA
    shadow when ``use_ema``), i.e. ``(I + M) W_o``. The original tensors are kept so that
    :func:`unmerge_adapters` restores them bit for bit. While merged, the adapters are the
    identity, so the model is a plain open_clip model with modified projections.

    Raises:
        ValueError: the model is already merged (unmerge first) or has no adapters.
    """
    net = _module(model)
    targets = list(_adapter_targets(net))
    if not targets:
        raise ValueError("the model has no R-Adapters to merge (call add_adapters first)")
    if any(a.merged for _, a, _ in targets):
        raise ValueError("the adapters are already merged; call unmerge_adapters before merging again")
    for _, adapter, linear in targets:
        m = adapter.effective(use_ema=use_ema, alpha=alpha).to(linear.weight.dtype)
        adapter._originals = (linear.weight.detach().clone(), linear.bias.detach().clone())
        linear.weight.add_(m @ linear.weight)
        linear.bias.add_(m @ linear.bias)
        adapter.merged = True


@torch.no_grad()
def unmerge_adapters(model: ClipModel | nn.Module) -> None:
    """Restore the projections saved by :func:`merge_adapters` exactly (a no-op when not merged)."""
    for _, adapter, linear in _adapter_targets(_module(model)):
        if adapter.merged:
            weight, bias = adapter._originals
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
            adapter._originals, adapter.merged = None, False


@contextmanager
def merged(model: ClipModel | nn.Module, alpha: float, *, use_ema: bool = True) -> Iterator[None]:
    """Merge for the duration of a ``with`` block, unmerging even on errors."""
    merge_adapters(model, alpha, use_ema=use_ema)
    try:
        yield
    finally:
        unmerge_adapters(model)


# --------------------------------------------------------------------------------------------------
# state dicts and checkpoints
# --------------------------------------------------------------------------------------------------
def _adapter_key(key: str, adapter_names: set[str]) -> str | None:
    """The checkpoint name of a model state key that belongs to an adapter (else None)."""
    owner, _, leaf = key.rpartition(".")
    if owner not in adapter_names:
        return None
    if leaf.startswith("ema_"):
        return f"{EMA_PREFIX}{owner}.{leaf[4:]}"
    return f"{ADAPTER_PREFIX}{owner}.{leaf}"


def plain_state_dict(model: ClipModel | nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without adapter tensors: stock open_clip names, loadable with strict=True."""
    net = _module(model)
    names = {n for n, _ in iter_adapters(net)}
    return {k: v for k, v in net.state_dict().items() if _adapter_key(k, names) is None}


def adapter_checkpoint_state(model: ClipModel | nn.Module) -> dict[str, torch.Tensor]:
    """Plain CLIP keys (un-merged) + ``radapter.<block>.ls_1.weight``... + ``radapter_ema.<...>``.

    Raises:
        ValueError: the adapters are merged (the saved backbone must be the original one).
    """
    net = _module(model)
    if any(a.merged for _, a in iter_adapters(net)):
        raise ValueError("unmerge the adapters before saving (checkpoints hold the original backbone)")
    names = {n for n, _ in iter_adapters(net)}
    return {(_adapter_key(k, names) or k): v for k, v in net.state_dict().items()}


def load_adapter_checkpoint_state(model: ClipModel | nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`adapter_checkpoint_state` (strict: the adapter layout must match)."""
    net = _module(model)
    renamed = {}
    for key, value in state.items():
        for prefix, leaf_prefix in ((EMA_PREFIX, "ema_"), (ADAPTER_PREFIX, "")):
            if key.startswith(prefix):
                owner, _, leaf = key[len(prefix):].rpartition(".")
                key = f"{owner}.{leaf_prefix}{leaf}"
                break
        renamed[key] = value
    net.load_state_dict(renamed, strict=True)


def _ranks_in_state(state: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Per tower: 0 (no adapters), the low rank r, or None (full rank), read from tensor shapes."""
    ranks: dict[str, int | None] = {"vision": 0, "text": 0}
    for key, value in state.items():
        if key.startswith(ADAPTER_PREFIX):
            tower = "vision" if key[len(ADAPTER_PREFIX):].startswith("visual.") else "text"
            if key.endswith(".up"):
                ranks[tower] = value.shape[1]
            elif key.endswith(".weight"):
                ranks[tower] = None
    return ranks


def load_radapter(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[ClipModel, dict]:
    """Rebuild an adapted CLIP from an R-Adapter training checkpoint (``best.safetensors`` etc.).

    Returns:
        ``(clip, sidecar)``: the CLIP with adapters (live and EMA tensors loaded) in eval mode.
    """
    from ..models import load_checkpoint, load_clip

    state, sidecar = load_checkpoint(path)
    if not any(k.startswith(ADAPTER_PREFIX) for k in state):
        raise ValueError(f"{path} holds no R-Adapter tensors; plain checkpoints load with "
                         "rftlib.models.load_classifier")
    cfg = sidecar.get("method_config") or {}
    clip = load_clip(sidecar["architecture"], None, device=device, force_quick_gelu=sidecar.get("quick_gelu"))
    clip.pretrained = sidecar.get("pretrained")
    ranks = _ranks_in_state(state)
    add_adapters(clip, ranks["vision"], ranks["text"], cfg.get("drop", 0.0), cfg.get("granularity", "sample"))
    load_adapter_checkpoint_state(clip, state)
    clip.model.eval()
    return clip, sidecar


def export_merged(
    clip: ClipModel, alpha: float, path: str | Path, *, classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None, use_ema: bool = True, method_config=None,
) -> Path:
    """Write the model merged at ``alpha`` as a plain rftlib checkpoint (no adapter keys).

    The file loads with :func:`rftlib.models.load_classifier`, and (after dropping ``head.*``, see
    :func:`rftlib.models.export_open_clip_weights`) into stock ``open_clip.create_model(arch)``
    with ``strict=True``. With ``classnames`` and ``templates`` a zero-shot head built from the
    merged text tower is included. The live model is left un-merged.
    """
    with merged(clip, alpha, use_ema=use_ema):
        state = {k: v.detach().cpu().clone() for k, v in plain_state_dict(clip).items()}
        if classnames is not None:
            if templates is None:
                raise ValueError("export_merged: give templates together with classnames to build the head")
            head = build_zeroshot_head(clip, classnames, templates)
            state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    return save_checkpoint(path, state, clip=clip, classnames=list(classnames) if classnames else None, method=NAME,
                           method_config=method_config, extra={"scale": float(alpha), "ema": use_ema})


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------
def smoothed_targets(same: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """MPM-NCE targets: per row ``(1 - eps) / |P|`` on positives and ``eps / (B - |P|)`` on negatives.

    A row without negatives (all labels equal) puts all its mass on its positives, so the loss
    stays finite (the released formula divides by zero there).
    """
    same = same.float()
    n_pos = same.sum(1, keepdim=True)
    n_neg = same.shape[1] - n_pos
    has_neg = n_neg > 0
    pos_weight = torch.where(has_neg, (1.0 - label_smoothing) / n_pos, 1.0 / n_pos)
    neg_weight = torch.where(has_neg, label_smoothing / n_neg.clamp_min(1.0), torch.zeros_like(n_neg))
    return same * pos_weight + (1.0 - same) * neg_weight


def mpm_nce_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                 logit_scale: torch.Tensor | float, margin: float = 0.05,
                 label_smoothing: float = 0.02) -> torch.Tensor:
    """Multi-positive margin NCE between images and captions (features L2-normalised inside).

    ``l_ij = scale * (f_i . g_j + margin * [y_i != y_j])`` and the loss is the mean over both
    directions of the cross-entropy between ``softmax(l)`` and :func:`smoothed_targets` of the
    row's anchor (image rows use ``l``, caption rows use ``l^T``).

    Args:
        image_features, text_features: ``(B, D)``; pair ``i`` is image ``i`` and its caption.
        labels: ``(B,)`` class labels; same-label pairs are positives.
        logit_scale: ``1 / temperature`` (R-Adapter keeps CLIP's frozen scale).
        margin: ``delta`` added to every negative similarity (harder negatives).
        label_smoothing: ``eps`` moved from the positives to the negatives.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    same = labels[:, None] == labels[None, :]
    logits = logit_scale * (img @ txt.T + margin * (~same).float())
    targets = smoothed_targets(same, label_smoothing)
    loss_images = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    loss_texts = -(targets * logits.T.log_softmax(dim=1)).sum(1).mean()
    return 0.5 * (loss_images + loss_texts)


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------
class AdaptedClassifier(nn.Module):
    """Image tower + head, run with the adapters in a given mode (EMA shadow, re-scaling alpha)."""

    def __init__(self, visual: nn.Module, head: nn.Module, *, ema: bool, alpha: float):
        super().__init__()
        self.visual, self.head, self.ema, self.alpha = visual, head, ema, alpha

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with adapter_mode(self.visual, ema=self.ema, alpha=self.alpha):
            return self.head(self.visual(images))


class RAdapterTask(CaptionMixin, Task):
    """Adapters in both towers trained with MPM-NCE on prompt captions; everything else frozen."""

    method_name = NAME

    def __init__(self, clip: ClipModel, classnames: list[str], templates: list[str], cfg: Config):
        super().__init__()
        if cfg.ema is not None and not 0.0 <= cfg.ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1) or be None, got {cfg.ema}")
        self.clip, self.model = clip, clip.model
        self.classnames, self.templates, self.cfg, self.method_config = classnames, templates, cfg, cfg
        if has_adapters(self.model):
            raise ValueError("this CLIP already carries R-Adapters (from an earlier run?); train on a fresh one, "
                             "e.g. rftlib.models.load_clip(...), or reload a run with load_radapter")
        add_adapters(self.model, cfg.rank_vision, cfg.rank_text, cfg.drop, cfg.granularity, init_scale=cfg.init_scale)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("rank_vision = rank_text = 0 leaves nothing to train")

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        img = batch.gather(self.model.encode_image(batch.images))
        txt = batch.gather(self.encode_captions(self.captions(batch)))
        labels = batch.gather(batch.labels)
        scale = self.model.logit_scale.exp().detach()
        loss = mpm_nce_loss(img, txt, labels, scale, self.cfg.margin, self.cfg.label_smoothing)
        return {"loss": loss}

    def after_optimizer_step(self) -> None:
        if self.cfg.ema is not None:
            ema_update(self.model, self.cfg.ema)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay on the adapter matrices only, not on the scales (gains), as released."""
        params = list(self.trainable_parameters())
        matrices = [p for p in params if p.dim() >= 2]
        gains = [p for p in params if p.dim() < 2]
        return [{"params": matrices, "weight_decay": weight_decay}, {"params": gains, "weight_decay": 0.0}]

    def classifier(self, alpha: float | None = None) -> nn.Module:
        """The image classifier with EMA adapters at re-scaling ``alpha`` (default: the config's
        ``scale``), head rebuilt."""
        alpha = self.cfg.scale if alpha is None else alpha
        ema = self.cfg.ema is not None
        with adapter_mode(self.model, ema=ema, alpha=alpha):
            head = build_zeroshot_head(self.clip, self.classnames, self.templates)
        return AdaptedClassifier(self.model.visual, head, ema=ema, alpha=alpha)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return adapter_checkpoint_state(self.model)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_checkpoint_state(self.model, state)


# --------------------------------------------------------------------------------------------------
# the re-scaling sweep and the run
# --------------------------------------------------------------------------------------------------
def scale_sweep(ctx: RunContext, scales: Sequence[float], *, splits: Sequence[str] | None = None,
                templates: Sequence[str] | None = None, use_ema: bool = True, log_rows: bool = True,
                report: float | None = None, epoch: int | None = None) -> pd.DataFrame:
    """Evaluate the model merged at every re-scaling value (the notebook's slider).

    For each value: merge the adapters into ``ctx.clip`` (EMA shadow by default), rebuild the
    zero-shot head from the merged text tower, evaluate every split, unmerge. Decoded images are
    reused across values.

    Args:
        ctx: a run context whose ``clip`` carries R-Adapters (e.g. from a finished run).
        scales: re-scaling coefficients (0 = zero-shot, 1 = fully adapted).
        splits: default: every ID/OOD evaluation split.
        templates: head templates (default: the dataset's).
        use_ema: merge the EMA shadow (as evaluated in the paper) or the live adapters.
        log_rows: write ``sweep`` rows with their ``scale`` knob to the results store (and the
            ``report`` value's also as the run's ``final`` rows).
        epoch: recorded with the logged rows.

    Returns:
        A tidy frame with columns ``scale, split, role, metric, value``.
    """
    from ..evaluate import evaluate

    templates = list(templates or ctx.dataset.templates)
    rows = []
    for scale in map(float, scales):
        with merged(ctx.clip, scale, use_ema=use_ema):
            head = build_zeroshot_head(ctx.clip, ctx.dataset.classnames, templates)
            model = ImageClassifier(ctx.clip.visual, head)
            if log_rows:
                rows += ctx.evaluate_point(model, {"scale": scale}, splits=splits, report=scale == report,
                                           epoch=epoch)
            else:
                for split in splits or ctx.eval_splits():
                    res = evaluate(model, ctx.dataset, split, ctx.spec, device=ctx.device, settings=ctx.loader)
                    rows += tidy_rows(ctx.dataset, {"scale": scale}, split, res.role, res.metrics)
    return sweep_table(rows, "scale")


def run(ctx: RunContext, cfg: Config) -> RunResult:
    templates = list(cfg.templates or ctx.dataset.templates)
    task = RAdapterTask(ctx.clip, ctx.dataset.classnames, templates, cfg)
    fitted = ctx.fit(task, cfg.train)
    use_ema = cfg.ema is not None
    table = scale_sweep(ctx, sorted({cfg.scale, *cfg.scales}), templates=templates, use_ema=use_ema,
                        report=cfg.scale, epoch=fitted.best_epoch)
    extra = {"sweep": table, "scale_sweep": partial(scale_sweep, ctx, templates=templates, use_ema=use_ema)}
    if ctx.out_dir is not None and cfg.export_merged and rdist.current().is_main:
        extra["merged_checkpoint"] = export_merged(
            ctx.clip, cfg.scale, Path(ctx.out_dir) / "merged.safetensors", classnames=ctx.dataset.classnames,
            templates=templates, use_ema=use_ema, method_config=cfg)
    return ctx.conclude(task.classifier(), fitted, metrics=metrics_at(table, "scale", cfg.scale), **extra)
