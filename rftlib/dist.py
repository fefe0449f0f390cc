"""Distributed helpers: the same kernels run single-process (notebooks) and under ``torchrun``.

Only three things know about distribution: :func:`init_distributed` (reads torchrun's
environment), the training loop (shards each global batch across ranks, wraps the task in DDP and
reduces its logged scalars in one collective per step, on the training device, as NCCL requires),
and contrastive losses, which gather features *with gradients* so the loss spans the global batch
exactly as a single process would compute it. Run bookkeeping (the run id, the results store) is
the main rank's: the others receive the run id with :func:`broadcast_object`.
"""

from __future__ import annotations

import atexit
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
    """Join the process group when launched by torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set,
    one rank included); no-op in a plain process.

    Uses NCCL on CUDA (after binding this process to GPU ``LOCAL_RANK``, so that every rank's
    collectives run on its own GPU) and gloo elsewhere. The group is destroyed when the process
    exits: left to interpreter shutdown, gloo's threads can abort a finished rank ("terminate called
    without an active exception"), which turns a successful run into a failed exit status.
    """
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
        atexit.register(_leave_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_group() -> None:
    """Destroy the process group at exit, if it is still there."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    if _grouped():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def all_gather_with_grad(t: torch.Tensor, uneven: bool = False) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, keeping gradients to every rank's input.

    ``uneven``: ranks may hold different numbers of rows (a training batch that dropped unreadable
    images); their sizes are exchanged first and the rows padded for the collective, then trimmed.
    """
    info = current()
    if not info.enabled:
        return t
    import torch.distributed.nn as dist_nn

    if not uneven:
        return torch.cat(dist_nn.all_gather(t), dim=0)
    sizes = torch.zeros(info.world_size, dtype=torch.int64, device=t.device)
    sizes[info.rank] = len(t)
    dist.all_reduce(sizes)
    sizes = sizes.tolist()
    padded = torch.cat([t, t.new_zeros((max(sizes) - len(t), *t.shape[1:]))]) if len(t) < max(sizes) else t
    return torch.cat([part[:n] for part, n in zip(dist_nn.all_gather(padded), sizes)], dim=0)


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (one collective, on the tensor's own device, as NCCL needs)."""
    if not _grouped():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def broadcast_object(obj):
    """The main rank's ``obj`` on every rank (identity outside a process group)."""
    if not _grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if current().enabled:
        dist.barrier()
