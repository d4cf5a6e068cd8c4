"""Activations: gated (x[:d] act * x[d:]) and plain, by HF `hidden_act` name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from kernels import ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2d] -> [T, d]
        return ops.silu_and_mul(x)


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2d] -> [T, d]
        return ops.gelu_and_mul(x, self.approximate)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_PLAIN = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_fast": _gelu_new,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
_GATED = {"silu": SiluAndMul, "swish": SiluAndMul}
_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                "gelu_fast": "tanh"}


def get_act_fn(name: str):
    """A plain activation function by HF name."""
    if name not in _PLAIN:
        raise ConfigError(f"activation {name!r} is not supported; one of {sorted(_PLAIN)}")
    return _PLAIN[name]


def get_gated_act(name: str) -> nn.Module:
    """The fused gated activation for HF `hidden_act` name (silu -> SwiGLU, gelu* -> GeGLU)."""
    if name in _GATED:
        return _GATED[name]()
    if name in _GELU_APPROX:
        return GeluAndMul(_GELU_APPROX[name])
    raise ConfigError(f"gated activation {name!r} is not supported; one of "
                      f"{sorted(set(_GATED) | set(_GELU_APPROX))}")
