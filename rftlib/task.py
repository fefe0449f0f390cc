"""The small interface every trainable method implements, and the batch it receives.

A method that trains is a :class:`Task`: an ``nn.Module`` holding the trainable state and the
objective. The one shared loop (:func:`rftlib.train.fit`) owns everything else: data order,
optimizer, schedule, precision, accumulation, distribution, checkpoints, resume, evaluation and
model selection.

What the loop reads and calls, and when:

* attributes, set by the subclass: ``clip`` (the :class:`~rftlib.models.ClipModel` being tuned:
  its architecture facts go into every checkpoint sidecar, and ``grad_checkpointing`` switches on
  its towers' activation recomputation), ``method_name`` (progress label and sidecar) and
  ``method_config`` (the resolved config, stored in every sidecar);
* once before training: :meth:`Task.param_groups` builds the optimizer's groups; under ``torchrun``
  :meth:`Task.ddp_kwargs` adds options to the ``DistributedDataParallel`` wrapper; when resuming,
  :meth:`Task.load_checkpoint_state` receives the last checkpoint's weights;
* every micro-step: :meth:`Task.training_step` -- a :class:`Batch` in, a dict with ``loss`` (+
  scalars to log) out (called through ``forward`` so that DDP can wrap the task);
* every optimiser step: :meth:`Task.trainable_parameters` when gradients are clipped, then
  :meth:`Task.after_optimizer_step` once the weights have moved (DPS restores frozen rows,
  R-Adapter updates its EMA);
* every epoch end: :meth:`Task.classifier` -- the image -> logits model evaluated now (FLYP
  rebuilds its head from the current text tower here); :meth:`Task.checkpoint_state` -- the weights
  kept as the best so far and written to checkpoints;
* after the last epoch: :meth:`Task.load_checkpoint_state` with the weights selected on ID
  validation (``restore_best``).

Post-hoc methods (WiSE-FT merge, DRM beta mix, R-Adapter rescale) are plain functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .dist import all_gather_with_grad
from .models.loading import ClipModel


@dataclass
class Batch:
    """One (per-rank, per-micro-step) training batch.

    Attributes:
        images: normalised float images on the device (N, 3, S, S).
        labels: int64 labels on the device.
        indices: positions of the examples in the train split (for per-example state).
        step: global optimiser step (0-based).
        epoch: epoch (0-based).
        positions: positions of these examples within the global batch of this step.
        global_batch_size: examples per optimiser step over all ranks and micro-steps.
        generator: a CPU ``torch.Generator`` seeded from (seed, step), identical on every rank
            and micro-step; draw through :meth:`randint` so that each example gets the same
            random value whatever the number of ranks or accumulation steps (resume-safe too).
        uneven: ranks may hold different numbers of examples this step (unreadable images were
            skipped); :meth:`gather` then pads for the collective.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    step: int
    epoch: int
    positions: torch.Tensor
    global_batch_size: int
    generator: torch.Generator
    uneven: bool = False

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """A per-example tensor of this rank's part, concatenated over all ranks' parts of the global
        batch, with gradients (the batch of a contrastive loss); itself in a single process."""
        return all_gather_with_grad(t, uneven=self.uneven)

    def randint(self, high: int) -> torch.Tensor:
        """One random integer in [0, high) per example, independent of how the batch is split."""
        draws = torch.randint(high, (self.global_batch_size,), generator=self.generator)
        return draws[self.positions]


class Task(nn.Module):
    """Base class of trainable methods (see the module docstring for when the loop calls what).

    Attributes:
        clip: the CLIP the task tunes or builds on (set by the subclass).
        method_name: the registry name the loop reports and checkpoints under.
        method_config: the method's resolved config, stored in checkpoint sidecars.
    """

    clip: ClipModel
    method_name: str = ""
    method_config = None

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # lets DDP wrap the task
        return self.training_step(batch)

    def classifier(self) -> nn.Module:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (default: nothing)."""

    def ddp_kwargs(self) -> dict:
        """Extra ``DistributedDataParallel`` options for this task (default: none).

        The loop always passes ``device_ids``, ``broadcast_buffers=False`` and
        ``gradient_as_bucket_view=True``; what this returns is added on top (and wins). A task
        whose trainable parameters get no gradient in some steps returns
        ``{"find_unused_parameters": True}``, so that DDP does not wait for those gradients.
        """
        return {}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups (decoupled decay under AdamW, L2 under SGD). Default, as
        in WiSE-FT/FLYP: decay on every trainable tensor."""
        return [{"params": list(self.trainable_parameters()), "weight_decay": weight_decay}]
