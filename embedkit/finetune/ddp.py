"""Data-parallel finetuning under ``torchrun``: rank shares, the DDP wrapper, collectives.

Every rank holds the whole model; :class:`~torch.nn.parallel.DistributedDataParallel` averages
the gradients of the trainable parameters (gloo on CPU, NCCL on GPU, from
:func:`embedkit.distributed.session`). Each global batch of ``batch_size x world_size``
consecutive images of the epoch order is split by position, ``positions[rank::world_size]``,
so the ranks' shares are disjoint, cover the batch, and are each at most ``batch_size`` images.
With one rank every helper here is the identity, so training has one code path.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from embedkit.distributed import DistContext

__all__ = ["gather", "rank_share", "sums", "wrap"]

T = TypeVar("T")


def rank_share(positions: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of ``positions``: every ``world_size``-th element from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= rank < world_size, got {rank}, {world_size} instead")
    return positions[rank::world_size]


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in DDP when the job has several ranks (parameters broadcast from rank 0).

    Unused-parameter detection is on: a trainable parameter that no forward uses (e.g. the
    ViTs' ``mask_token`` without masking) would otherwise stop the gradient all-reduce. Such a
    parameter keeps no gradient, as in one process, so AdamW leaves it alone."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index or 0] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def sums(ctx: DistContext, *values: float) -> list[float]:
    """Each value summed over the ranks (one all-reduce, float64)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def gather(ctx: DistContext, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (pickled; for small objects)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
