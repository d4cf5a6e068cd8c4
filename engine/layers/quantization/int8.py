"""Weight-only INT8: `--quantization int8`.

Each weight is loaded in the model dtype and quantized symmetrically per output channel
(scale = max |row| / 127, round to nearest even, clamp to +-127); activations stay in the model
dtype. The matmul reads the INT8 weight and dequantizes it inside a Triton kernel on CUDA, its
torch reference elsewhere: up to GEMV_MAX_TOKENS tokens the small-M kernel that streams the
weight once (kernels/gemv_triton.py), above it the tiled matmul (kernels/quant_triton.py). Half
the weight bytes of bf16 per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.layers.linear import LinearMethod, linear_param
from engine.layers.quantization.base import QuantizationConfig, channel_amax
from kernels.gemv_ref import GEMV_MAX_TOKENS
from kernels.ops import gemv, int8_weight_matmul
from kernels.quant_ref import MIN_SCALE

INT8_MAX = 127.0


def quantize_int8_per_channel(weight: torch.Tensor, amax: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], scales [out] float32), weight ~= q * scale. `amax`:
    max |row| [out] (default: of `weight`; a row-parallel layer's is every rank's)."""
    if amax is None:
        amax = weight.abs().amax(dim=1).float()
    scale = (amax / INT8_MAX).clamp_min(MIN_SCALE)  # [out]
    q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8LinearMethod(LinearMethod):
    """Loads the weight in the model dtype, keeps it as INT8 + per-channel float32 scales."""

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition,
                       params_dtype):
        weight = torch.empty(output_size_per_partition, input_size_per_partition,
                             dtype=params_dtype)
        layer.register_parameter("weight", linear_param(weight, output_dim=0, input_dim=1))

    def process_weights_after_loading(self, layer):
        q, scale = quantize_int8_per_channel(layer.weight.data,
                                             channel_amax(layer, layer.weight.data))
        layer.weight = linear_param(q, output_dim=0, input_dim=1)
        layer.weight_scale = linear_param(scale.contiguous(), output_dim=0)

    def apply(self, layer, x, bias=None):
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] <= GEMV_MAX_TOKENS:  # decode: the small-M kernel, bias included
            y = gemv(x2, layer.weight, layer.weight_scale, bias)  # [T, out]
            return y.view(*x.shape[:-1], y.shape[-1])
        y = int8_weight_matmul(x2, layer.weight, layer.weight_scale)  # [T, out]
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass(frozen=True)
class Int8Config(QuantizationConfig):
    """`--quantization int8`: weight-only, per-channel, quantized at load time."""

    name: ClassVar[str] = "int8"

    def linear_method(self) -> LinearMethod:
        return Int8LinearMethod()

    def describe(self) -> str:
        return "int8 (weight-only, per-channel, quantized at load time)"
