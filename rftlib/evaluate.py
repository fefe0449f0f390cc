"""The batched, device-agnostic evaluation kernel.

``evaluate(model, dataset, split, spec)`` decodes the split once (see
:func:`rftlib.data.pipeline.decode_split`), runs ``model`` over normalised batches (bf16 autocast
on CUDA, fp32 elsewhere) and returns an :class:`EvalResult` with logits, predictions, labels,
metadata and the dataset's official metrics. ``run_model`` is the same loop for any module
(e.g. an image tower returning features).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data.base import RFTDataset, Split
from .data.pipeline import ImageSpec, decode_split, normalize
from .progress import progress


def autocast_for(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere (CPU runs in fp32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def run_model(
    module: nn.Module, images: torch.Tensor, spec: ImageSpec, *, device: torch.device | str | None = None,
    batch_size: int = 256, amp: bool = True, progress_mode: str | None = "off", desc: str = "eval",
) -> torch.Tensor:
    """Apply ``module`` to uint8 images (N, 3, S, S) in batches; returns float32 outputs on CPU."""
    device = torch.device(device) if device is not None else next(module.parameters()).device
    was_training = module.training
    module.eval()
    outs = []
    starts = range(0, len(images), batch_size)
    try:
        for start in progress(starts, total=len(starts), desc=desc, mode=progress_mode):
            x = normalize(images[start:start + batch_size], spec, device)
            with autocast_for(device, amp):
                outs.append(module(x).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


@dataclass
class EvalResult:
    """Outputs of one evaluation: logits, predictions, labels, metadata and metrics."""

    split: str
    role: str
    logits: torch.Tensor
    labels: np.ndarray
    metadata: pd.DataFrame
    metrics: dict = field(default_factory=dict)

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(dim=1).numpy()


def evaluate(
    model: nn.Module, dataset: RFTDataset, split: str | Split, spec: ImageSpec, *,
    device: torch.device | str | None = None, batch_size: int = 256, amp: bool = True,
    cache_dir: str | None = None, progress_mode: str | None = "off",
) -> EvalResult:
    """Evaluate an image classifier on one split with the dataset's official metrics."""
    s = dataset.split(split) if isinstance(split, str) else split
    images = decode_split(s, spec.size, cache_dir=cache_dir, progress_mode=progress_mode)
    logits = run_model(model, images, spec, device=device, batch_size=batch_size, amp=amp,
                       progress_mode=progress_mode, desc=f"eval {s.name}")
    if s.name in dataset.info.get("logit_projection", {}):  # ImageNet-R/A: 200 of the 1000 classes
        from .data.imagenet import project_logits

        logits = project_logits(dataset, s.name, logits)
    metrics = dataset.compute_metrics(s, logits.argmax(dim=1).numpy()) if s.role != "openset" else {}
    return EvalResult(s.name, s.role, logits, s.labels, s.metadata, metrics)
