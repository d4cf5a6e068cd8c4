"""RMSNorm (with fused residual add, and Gemma's (1 + w) variant), LayerNorm, and
ShardedRMSNorm (one RMSNorm over a vector split across tensor-parallel ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from engine.layers.linear import load_shard
from engine.layers.sharding import REPLICATED, ShardPart, ShardSpec
from kernels import ops


class RMSNorm(nn.Module):
    """norm(x [+ residual]) * (weight + weight_offset). Called with a residual it returns
    (normed, x + residual) so the caller carries the sum on without another pass."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps, self.weight_offset = eps, weight_offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out, res = ops.rms_norm(x, self.weight, self.eps, residual, self.weight_offset)
        return out if residual is None else (out, res)

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        return REPLICATED if param_name == "weight" else None


class LayerNorm(nn.LayerNorm):
    """torch LayerNorm with the same (x, residual) calling convention as RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(hidden_size, eps=eps, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps), x
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        return REPLICATED if param_name in ("weight", "bias") else None


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a `full_size` vector of which this rank holds `per_rank` entries: the q (or
    k) of all heads at once, OLMo 2's qk-norm. The mean square is summed over the ranks; a
    piece held by `replicas` ranks (KV heads replicated when fewer than ranks) counts once.
    The weight is cut like the heads: rank r holds piece r // replicas."""

    def __init__(self, full_size: int, per_rank: int, eps: float = 1e-6, replicas: int = 1,
                 weight_offset: float = 0.0) -> None:
        super().__init__()
        self.full_size, self.per_rank, self.replicas = full_size, per_rank, replicas
        self.eps, self.weight_offset = eps, weight_offset
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.weight = nn.Parameter(torch.empty(per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        load_shard(param.data, loaded, 0, self.tp_rank // self.replicas, self.full_size)

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        if param_name != "weight":
            return None
        return ShardSpec(0, (ShardPart(self.full_size, self.per_rank, self.replicas),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, per_rank] -> [T, per_rank]
        if self.tp_size == 1:
            return ops.rms_norm(x, self.weight, self.eps, None, self.weight_offset)[0]
        h = x.float()
        square_sum = tp_all_reduce(h.pow(2).sum(-1, keepdim=True)) / self.replicas  # [T, 1]
        h = h * torch.rsqrt(square_sum / self.full_size + self.eps)
        return (h * (self.weight.float() + self.weight_offset)).to(x.dtype)
