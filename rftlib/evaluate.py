"""The batched, device-agnostic evaluation kernel.

``evaluate(model, dataset, split, spec)`` takes the split's evaluation views (decoded once and
reused, or streamed through worker processes: :func:`rftlib.data.pipeline.eval_batches`), runs
``model`` over normalised batches in fp32, as the papers' evaluation code does (``amp=True`` runs
bf16 autocast on CUDA instead: faster, but its metrics are not the references'; on CPU it changes
nothing, so no difference is measurable on synthwild on a CPU) and returns an :class:`EvalResult`
with logits, predictions, labels, metadata and the dataset's official metrics.
``run_model`` is the same loop for any module (e.g. an image tower returning features), over a
decoded ``uint8`` tensor or any iterable of ``uint8`` batches. On CUDA a background thread copies
the next batch into page-locked memory while the GPU works on the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data.base import RFTDataset, Split
from .data.loading import LoaderSettings
from .data.pipeline import ImageSpec, eval_batches, normalize
from .data.views import batches_of
from .models.heads import for_split
from .progress import progress


def autocast_for(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context elsewhere (CPU runs in fp32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def run_model(
    module: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], spec: ImageSpec, *,
    device: torch.device | str | None = None, batch_size: int = 256, amp: bool = False,
    progress_mode: str | None = "off", desc: str = "eval", total: int | None = None,
) -> torch.Tensor:
    """Apply ``module`` to ``uint8`` images: a decoded (N, 3, S, S) tensor (cut into ``batch_size``
    batches) or an iterable of such batches (``total``: how many, for the progress bar). Returns
    float32 outputs on the CPU, in order."""
    device = torch.device(device) if device is not None else next(module.parameters()).device
    if isinstance(images, torch.Tensor):
        total, images = -(-len(images) // batch_size), batches_of(images, batch_size)
    if device.type == "cuda":
        images = _prefetch_pinned(images)
    was_training = module.training
    module.eval()
    outs = []
    try:
        for batch in progress(images, total=total, desc=desc, mode=progress_mode):
            x = normalize(batch, spec, device)
            with autocast_for(device, amp):
                outs.append(module(x).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def _prefetch_pinned(batches: Iterable[torch.Tensor], depth: int = 2) -> Iterator[torch.Tensor]:
    """Yield ``batches`` copied into page-locked memory by a background thread, ``depth`` ahead."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                ready.put(batch if batch.is_pinned() else batch.pin_memory())
            ready.put(done)
        except BaseException as err:  # handed to the consumer, raised there
            ready.put(err)

    thread = threading.Thread(target=work, daemon=True, name="rftlib-eval-prefetch")
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def encode_split(
    module: nn.Module, split: Split, spec: ImageSpec, *, device: torch.device | str | None = None,
    batch_size: int = 256, amp: bool = False, settings: LoaderSettings | None = None,
    progress_mode: str | None = "off", desc: str = "eval",
) -> torch.Tensor:
    """:func:`run_model` over a split's evaluation views (decoded once and reused for evaluation
    splits, streamed once for a training split: :func:`rftlib.data.pipeline.eval_batches`)."""
    batches = eval_batches(split, spec.size, batch_size=batch_size, settings=settings, progress_mode=progress_mode)
    return run_model(module, batches, spec, device=device, amp=amp, progress_mode=progress_mode, desc=desc,
                     total=-(-len(split) // batch_size))


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
    device: torch.device | str | None = None, batch_size: int = 256, amp: bool = False,
    settings: LoaderSettings | None = None, progress_mode: str | None = "off",
) -> EvalResult:
    """Evaluate an image classifier on one split with the dataset's official metrics (a
    :class:`~rftlib.models.SplitAwareClassifier` as its view of that split).

    ``settings`` say how the split's images are read (workers, the on-disk cache); default: the
    environment's (:class:`rftlib.data.loading.LoaderSettings`).
    """
    s = dataset.split(split) if isinstance(split, str) else split
    model = for_split(model, dataset, s.name)  # DRM: each head restricted to the split's classes before the mix
    logits = encode_split(model, s, spec, device=device, batch_size=batch_size, amp=amp, settings=settings,
                          progress_mode=progress_mode, desc=f"eval {s.name}")
    if s.name in dataset.info.get("logit_projection", {}):  # ImageNet-R/A: 200 of the 1000 classes
        from .data.imagenet import project_logits

        logits = project_logits(dataset, s.name, logits)
    metrics = dataset.compute_metrics(s, logits.argmax(dim=1).numpy()) if s.role != "openset" else {}
    return EvalResult(s.name, s.role, logits, s.labels, s.metadata, metrics)
