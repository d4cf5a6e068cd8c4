"""Tensor-parallel state and collectives: this process's rank, the number of ranks, the group.

The one module with process-global mutable state, and why: layers read the rank and size when
they are built and call the collectives in forward, as the seed's layers do, without every
model passing them down. It is set once, in a tensor-parallel worker process, when the worker
starts (engine.distributed.worker); the caller's process never sets it and always sees TP=1,
where every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


_TP = _TPState()


def set_tensor_parallel(rank: int, size: int, group: dist.ProcessGroup | None) -> None:
    _TP.rank, _TP.size, _TP.group = rank, size, group


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP.group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the ranks, in place (identity at TP=1)."""
    if _TP.size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_TP.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (ranks in order)."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)


def tp_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """x from rank `src` on every rank (in place)."""
    if _TP.size > 1:
        dist.broadcast(x, src=src, group=_TP.group)
    return x
