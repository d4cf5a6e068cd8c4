"""RMSNorm (with fused residual add, and Gemma's (1 + w) variant) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.sharding import REPLICATED, ShardSpec
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
