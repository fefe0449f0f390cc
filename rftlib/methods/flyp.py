"""FLYP: fine-tune like you pretrain, with CLIP's contrastive loss on class-prompt captions.

Idea: cast every label to text (a random template per image and step, filled with the class
name) and optimise the symmetric InfoNCE loss between the batch's images and captions, training
**both towers and the logit scale**. Classification always uses a head rebuilt from the current
text tower with all templates, before every evaluation. As published, other images of the same
class in the batch are negatives (``label_aware="none"``); ``"mask"`` removes same-class pairs from
the negatives instead.

Under DDP the image and caption features of all ranks are gathered with gradients, so the loss
spans the global batch exactly as FLYP's single-process DataParallel did. Captions are
de-duplicated before encoding (exact: the text tower is per-caption), which removes most text-tower
work. An "epoch" is one pass over the training images (one random template each), which is what
FLYP's caption-CSV iterator amounts to without the CSV.

Knobs: ``train`` (FLYP: AdamW with decay on every tensor incl. the logit scale, no clipping),
``templates`` (default: the dataset's), ``label_aware``, ``decay_logit_scale``,
``max_logit_scale`` (None: unclamped, as published).

Paper: Goyal, Kumar, Garg, Kolter, Raghunathan, "Finetune like you pretrain: Improved finetuning of
zero-shot vision models", CVPR 2023. Presets follow the README recipes (iWildCam/FMoW: 20 epochs,
lr 1e-5, wd 0.2, batch 256; ImageNet: 10 epochs, lr 1e-5, wd 0.1, batch 512). Fixed here: the
released loop crashes on a single GPU (it indexes a 0-dim logit scale with ``[0]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ClipModel, ImageClassifier, build_zeroshot_head
from ..task import Batch, Task
from ..train import TrainConfig
from .common import RunContext, RunResult, refuse_accumulation

NAME = "flyp"
LABEL_AWARE = ("none", "mask")


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-5, weight_decay=0.1))
    templates: tuple[str, ...] | None = None  # caption templates; None = the dataset's
    label_aware: str = "none"        # "none" (published FLYP) or "mask" (same-class pairs not negatives)
    decay_logit_scale: bool = True   # FLYP decays the logit scale like every other tensor
    max_logit_scale: float | None = None  # clamp exp(logit_scale) after each step (None: no clamp)

    def __post_init__(self):
        refuse_accumulation(self.train, NAME)


PRESETS = {
    "synthwild": {"epochs": 4, "batch_size": 128, "lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 30,
                  "augment": "none"},
    "iwildcam": {"epochs": 20, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500,
                 "augment": "rrc"},
    "fmow": {"epochs": 20, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500, "augment": "rrc"},
    "imagenet": {"epochs": 10, "batch_size": 512, "lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500,
                 "select_split": None, "eval_splits": [], "augment": "rrc"},
}


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with the diagonal as targets (features L2-normalised inside).

    With ``labels``, off-diagonal pairs of the same label are masked out of the negatives.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * img @ txt.T
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class CaptionMixin:
    """FLYP's captions for a task that trains on image/caption pairs made from class prompts.

    Needs ``self.templates``, ``self.classnames``, ``self.model`` (the open_clip model) and
    ``self.clip`` (for the tokenizer and device).
    """

    def captions(self, batch: Batch) -> list[str]:
        """One random template per image (drawn from the batch's generator, so rank- and
        accumulation-invariant), filled with its class name."""
        picks, labels = batch.randint(len(self.templates)), batch.labels
        return [self.templates[t].format(self.classnames[y]) for t, y in zip(picks.tolist(), labels.tolist())]

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text features of ``captions``, encoding each distinct caption once."""
        unique = sorted(set(captions))
        position = {c: i for i, c in enumerate(unique)}
        feats = self.model.encode_text(self.clip.tokenizer(unique).to(self.clip.device))
        return feats[torch.tensor([position[c] for c in captions], device=feats.device)]


class FlypTask(CaptionMixin, Task):
    """Both towers and the logit scale trained with the contrastive loss on prompt captions."""

    method_name = NAME

    def __init__(self, clip: ClipModel, classnames: list[str], templates: list[str], cfg: Config):
        super().__init__()
        if cfg.label_aware not in LABEL_AWARE:
            raise ValueError(f"unknown label_aware {cfg.label_aware!r}; valid: {', '.join(LABEL_AWARE)}")
        self.clip, self.model = clip, clip.model
        self.classnames, self.templates, self.cfg, self.method_config = classnames, templates, cfg, cfg
        for p in self.model.parameters():
            p.requires_grad_(True)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        img = batch.gather(self.model.encode_image(batch.images))
        txt = batch.gather(self.encode_captions(self.captions(batch)))
        labels = batch.gather(batch.labels) if self.cfg.label_aware == "mask" else None
        loss = contrastive_loss(img, txt, self.model.logit_scale.exp(), labels)
        return {"loss": loss, "logit_scale": self.model.logit_scale.exp().detach()}

    def after_optimizer_step(self) -> None:
        if self.cfg.max_logit_scale is not None:
            with torch.no_grad():
                self.model.logit_scale.clamp_(max=math.log(self.cfg.max_logit_scale))

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.cfg.decay_logit_scale:
            return super().param_groups(weight_decay)
        rest = [p for n, p in self.model.named_parameters() if n != "logit_scale"]
        return [{"params": rest, "weight_decay": weight_decay},
                {"params": [self.model.logit_scale], "weight_decay": 0.0}]

    def classifier(self) -> nn.Module:
        head = build_zeroshot_head(self.clip, self.classnames, self.templates)
        return ImageClassifier(self.model.visual, head)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def run(ctx: RunContext, cfg: Config) -> RunResult:
    templates = list(cfg.templates or ctx.dataset.templates)
    task = FlypTask(ctx.clip, ctx.dataset.classnames, templates, cfg)
    fitted = ctx.fit(task, cfg.train)
    return ctx.conclude(task.classifier(), fitted)
