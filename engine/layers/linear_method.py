"""The quantization hook of every linear layer: `LinearMethod` creates a layer's parameters
(`create_weights`), turns what was loaded into what it multiplies with
(`process_weights_after_loading`) and applies the matmul (`apply`). `UnquantizedLinearMethod` is
one implementation; the quantized ones live in engine.layers.quantization. A method marks each
parameter it makes with `linear_param`, so the layer (engine/layers/linear.py) shards and loads
it like the weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gemv_ref import (
    CUBLAS_MIN_ROWS_16BIT,
    GEMV_KERNEL_ROWS,
    GEMV_LONG_K_RATIO,
    GEMV_MAX_TOKENS,
)
from kernels.ops import gemv


def linear_param(data: torch.Tensor, output_dim: int | None = None,
                 input_dim: int | None = None, per_part: bool = False) -> nn.Parameter:
    """A parameter of a linear layer. `output_dim` / `input_dim`: its dimension that runs along
    the layer's output / input (None: none does), so the layer shards it as it shards the
    weight; `per_part`: a [num_parts] tensor holding one value per fused part (q, k, v), loaded
    from a scalar checkpoint tensor per part and replicated on every rank."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim, param.per_part = output_dim, input_dim, per_part
    return param


class LinearMethod:
    """Creates a layer's parameters, prepares them once loaded and applies them.

    `create_weights` registers the parameters (made with `linear_param`) on `layer`; the layer's
    `output_partition_sizes` lists the rows this rank holds of each fused part.
    `process_weights_after_loading` runs once, after every checkpoint tensor is loaded (a
    quantizing method quantizes there, replacing parameters); `apply` computes x @ W^T (+ bias).
    """

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_size_per_partition: int, params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """The weight in the model dtype: F.linear (cuBLAS), except decode-sized inputs on CUDA
    with a 16-bit weight of fewer than CUBLAS_MIN_ROWS_16BIT rows, which take the small-M
    kernel (kernels/gemv_triton.py): it streams those narrow weights faster than cuBLAS."""

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition,
                       params_dtype):
        weight = torch.empty(output_size_per_partition, input_size_per_partition,
                             dtype=params_dtype)
        layer.register_parameter("weight", linear_param(weight, output_dim=0, input_dim=1))

    def apply(self, layer, x, bias=None):
        if _takes_gemv(layer.weight, x):
            return gemv(x, layer.weight, None, bias)
        return F.linear(x, layer.weight, bias)


def _takes_gemv(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the unquantized linear gives x to the small-M kernel rather than cuBLAS: on a
    Hopper GPU (where the kernel was measured against cuBLAS), a 16-bit weight of fewer than
    CUBLAS_MIN_ROWS_16BIT rows and a decode-sized batch (up to GEMV_MAX_TOKENS rows, or 33 to
    GEMV_KERNEL_ROWS for a weight GEMV_LONG_K_RATIO times longer than wide), contiguous rows."""
    m = x.shape[0] if x.dim() == 2 else 0
    sized = m <= GEMV_MAX_TOKENS or (32 < m <= GEMV_KERNEL_ROWS
                                     and w.shape[-1] >= GEMV_LONG_K_RATIO * w.shape[0])
    return (x.is_cuda and x.dim() == 2 and sized and x.stride(1) == 1
            and w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype
            and w.shape[0] < CUBLAS_MIN_ROWS_16BIT and w.dim() == 2 and w.stride(1) == 1
            and _hopper(x.device))


@functools.cache
def _hopper_index(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def _hopper(device: torch.device) -> bool:
    return _hopper_index(device.index if device.index is not None
                         else torch.cuda.current_device())
