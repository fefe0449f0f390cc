"""Distributed helpers: the same kernels run single-process (notebooks) and under ``torchrun``.

Only three things know about distribution: :func:`init_distributed` (reads torchrun's
environment), the training loop (shards each global batch across ranks and wraps the task in
DDP), and contrastive losses, which gather features *with gradients* so the loss spans the
global batch exactly as a single process would compute it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); no-op otherwise.

    Uses NCCL on CUDA and gloo elsewhere.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, keeping gradients to every rank's input."""
    info = current()
    if not info.enabled:
        return t
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(t), dim=0)


def all_reduce_mean(value: float) -> float:
    info = current()
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return (t / info.world_size).item()


def barrier() -> None:
    if current().enabled:
        dist.barrier()
