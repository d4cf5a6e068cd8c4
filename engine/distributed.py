"""Tensor-parallel state and collectives. The only module with process-global mutable state.

With no process group (the default, TP=1) every collective is the identity. ShardSpec is the
vocabulary layers use to say how each parameter is split across ranks (engine.tp_check reads it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def tensor_parallel(rank: int, size: int, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Set the TP state for a block (layers read it when they are built), then restore it."""
    old = (_TP.rank, _TP.size, _TP.group)
    set_tensor_parallel(rank, size, group)
    try:
        yield
    finally:
        set_tensor_parallel(*old)


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


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (ranks in order)."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    from engine.errors import ConfigError

    if numerator % denominator:
        raise ConfigError(f"{what}={numerator} is not divisible by tensor_parallel_size="
                          f"{denominator}: choose a tensor_parallel_size that divides it")
    return numerator // denominator


@dataclass(frozen=True)
class ShardPart:
    """One part of a parameter along its split dimension (q, k, v; gate, up), in the order the
    full (checkpoint) tensor has them."""

    size: int  # full length: all pieces together
    per_rank: int  # length of the piece each rank holds
    replicas: int = 1  # consecutive ranks that hold the same piece (KV heads when kv < tp)
    name: str = ""

    @property
    def num_pieces(self) -> int:
        return self.size // self.per_rank


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split across tensor-parallel ranks.

    `dim` None: replicated, every rank holds the whole tensor. Otherwise rank r's tensor is, along
    `dim`, the concatenation over `parts` of piece r // part.replicas of each part (piece j of a
    part is its entries j*per_rank ... (j+1)*per_rank - 1). `valid`: only the first `valid`
    entries of the full tensor along `dim` are real; the rest is padding and must be zero.
    """

    dim: int | None = None
    parts: tuple[ShardPart, ...] = ()
    valid: int | None = None

    def describe(self) -> str:
        if self.dim is None:
            return "replicated"
        text = f"dim {self.dim}"
        if len(self.parts) > 1 or self.parts[0].name:
            text += " [" + " | ".join(p.name or str(i) for i, p in enumerate(self.parts)) + "]"
        reps = [f"{p.name or i} x{p.replicas}" for i, p in enumerate(self.parts) if p.replicas > 1]
        if reps:
            text += ", replicated " + ", ".join(reps)
        if self.valid is not None and self.valid < sum(p.size for p in self.parts):
            text += f", padded {self.valid}->{sum(p.size for p in self.parts)}"
        return text


REPLICATED = ShardSpec()


def split_spec(dim: int, size: int, tp: int, name: str = "", valid: int | None = None
               ) -> ShardSpec:
    """A tensor cut into `tp` equal consecutive pieces along `dim`."""
    return ShardSpec(dim, (ShardPart(size, size // tp, 1, name),), valid)
