"""Standard fine-tuning (FT): cross-entropy on the image tower + a zero-shot-initialised head.

Idea: start from the zero-shot classifier (image tower + the head built from class prompts, rows
of norm ``exp(logit_scale)``) and train the image tower and the head end to end with
cross-entropy; the text tower is frozen (WiSE-FT removes it). Starting from the zero-shot head is
what makes the fine-tuned model interpolable with the zero-shot one (WiSE-FT); a random head
breaks that (mlfoundations/wise-ft#9).

Knobs: ``train`` (:class:`~rftlib.train.TrainConfig`: epochs, lr, batch, warmup, clipping, ...),
``label_smoothing``. Model selection is on ID val.

Papers: the FT baseline of Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT,
CVPR 2022). Presets: ``iwildcam``/``fmow`` use the FLYP paper's recipe (20 epochs, lr 1e-5, wd
0.2, batch 256, warmup 500) with WiSE-FT's gradient clipping at 1.0, which the FLYP recipe omits
for its FT baseline and WiSE-FT's fine-tuning code always applies; ``imagenet`` the WiSE-FT
README's (10 epochs, lr 3e-5, batch 512, wd 0.1, grad clip 1.0); ``synthwild`` a CPU recipe of
about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ClipModel, ImageClassifier, ZeroShotHead, build_zeroshot_head
from ..task import Batch, Task
from ..train import TrainConfig
from .common import RunContext, RunResult

NAME = "finetune"


@dataclass
class Config:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-5, weight_decay=0.1))
    label_smoothing: float = 0.0  # (1 - eps) * NLL + eps * mean(-log p)


PRESETS = {
    "synthwild": {"epochs": 4, "batch_size": 128, "lr": 3e-4, "weight_decay": 0.1, "warmup_steps": 30,
                  "augment": "none"},
    "iwildcam": {"epochs": 20, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500,
                 "grad_clip": 1.0, "augment": "rrc"},
    "fmow": {"epochs": 20, "batch_size": 256, "lr": 1e-5, "weight_decay": 0.2, "warmup_steps": 500,
             "grad_clip": 1.0, "augment": "rrc"},
    "imagenet": {"epochs": 10, "batch_size": 512, "lr": 3e-5, "weight_decay": 0.1, "warmup_steps": 500,
                 "grad_clip": 1.0, "select_split": None, "eval_splits": [], "augment": "rrc"},
}


class FinetuneTask(Task):
    """Image tower + head trained with cross-entropy; the text tower is frozen."""

    method_name = NAME

    def __init__(self, clip: ClipModel, head: ZeroShotHead, label_smoothing: float = 0.0, method_config=None):
        super().__init__()
        self.clip = clip
        self.model = clip.model
        self.head = head
        self.label_smoothing = label_smoothing
        self.method_config = method_config
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith("visual."))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode_image(images))

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.images)
        loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "acc": (logits.argmax(1) == batch.labels).float().mean()}

    def classifier(self) -> nn.Module:
        return ImageClassifier(self.model.visual, self.head)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


def train_classifier(ctx: RunContext, head: ZeroShotHead, cfg: Config) -> RunResult:
    """Fine-tune ``ctx.clip``'s image tower with ``head`` (shared by FT and LP-FT; checkpoints are
    named after the run's method)."""
    task = FinetuneTask(ctx.clip, head.to(ctx.device), cfg.label_smoothing, method_config=cfg)
    task.method_name = ctx.method
    fitted = ctx.fit(task, cfg.train)
    return ctx.conclude(task.classifier(), fitted)


def run(ctx: RunContext, cfg: Config) -> RunResult:
    head = build_zeroshot_head(ctx.clip, ctx.dataset.classnames, ctx.dataset.templates)
    return train_classifier(ctx, head, cfg)
