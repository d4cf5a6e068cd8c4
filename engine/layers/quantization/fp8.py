"""FP8 (float8_e4m3fn) weights and activations: `--quantization fp8` and checkpoints saved with
`quant_method: "fp8"`.

Weights: quantized at load time with one scale per output channel (max |row| / 448), or loaded
already in FP8 with one scale per tensor (kept per fused part: q, k and v each keep theirs) or per
channel. Per-tensor scales are then spread over their part's rows, which is exact: every layer
multiplies with per-channel scales. Activations: one scale per token, computed on the fly
(`activation_scheme: dynamic`), or one static scale per layer from the checkpoint (the largest of
the fused parts' `input_scale`s). Up to GEMV_MAX_TOKENS tokens (decode batches; the choice
follows the static shape, so CUDA graphs capture it) one small-M kernel quantizes x and streams
the FP8 weight (kernels/gemv_triton.py); larger batches quantize x, then torch's scaled matmul
(`torch._scaled_mm`, row-wise scales, bf16 output). FP8 needs compute capability >= 8.9 on CUDA
(elsewhere on CUDA it is an error); on the CPU a reference of the same math (FP8 values
multiplied in float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.errors import ConfigError
from engine.layers.linear import LinearMethod, UnquantizedLinearMethod, linear_param
from engine.layers.quantization.base import (
    QuantizationConfig,
    all_or_none,
    channel_amax,
    drop_named,
    matches,
)
from kernels.gemv_ref import GEMV_MAX_TOKENS
from kernels.ops import gemv, per_token_quant_fp8
from kernels.quant_ref import FP8_DTYPE, FP8_MAX, MIN_SCALE

MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later: FP8 tensor cores
# KV-cache scales of FP8 checkpoints: unused, the KV cache stays in the model dtype
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale", ".q_scale", ".prob_scale",
                     "k_proj.output_scale", "v_proj.output_scale")
ACTIVATION_SCHEMES = ("dynamic", "static")


def quantize_fp8_per_channel(weight: torch.Tensor, amax: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], scales [out] float32), weight ~= q * scale.
    `amax`: max |row| [out] (default: of `weight`; a row-parallel layer's is every rank's)."""
    if amax is None:
        amax = weight.abs().amax(dim=1).float()
    scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)  # [out]
    q = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               w_scale: torch.Tensor, out_dtype: torch.dtype, scaled_mm: bool) -> torch.Tensor:
    """(xq * x_scale) @ (weight * w_scale)^T -> [T, out] in out_dtype. xq [T, in] and weight
    [out, in] float8_e4m3fn, x_scale [T, 1], w_scale [out] float32."""
    if scaled_mm and out_dtype == torch.bfloat16:
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                                out_dtype=out_dtype)
    if scaled_mm:  # row-wise scales need a bf16 output: unit scales, scale in float32 after
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        acc = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    else:  # the reference: the same products in float32
        acc = xq.float() @ weight.float().t()  # [T, out]
    return (acc * x_scale * w_scale[None, :]).to(out_dtype)


class Fp8LinearMethod(LinearMethod):
    """`serialized`: the checkpoint holds FP8 weights and their scales (`weight_strategy`
    "tensor": one per tensor, "channel": one per output row, [out, 1]); otherwise the weight is
    loaded in the model dtype and quantized per channel. `activation_scheme` "static" reads one
    `input_scale` per tensor."""

    def __init__(self, serialized: bool = False, weight_strategy: str = "channel",
                 activation_scheme: str = "dynamic") -> None:
        self.serialized, self.weight_strategy = serialized, weight_strategy
        self.activation_scheme = activation_scheme

    def create_weights(self, layer, input_size_per_partition, output_size_per_partition,
                       params_dtype):
        rows, cols, parts = (output_size_per_partition, input_size_per_partition,
                             len(layer.output_partition_sizes))
        dtype = FP8_DTYPE if self.serialized else params_dtype
        layer.register_parameter("weight", linear_param(
            torch.empty(rows, cols, dtype=dtype), output_dim=0, input_dim=1))
        if self.serialized and self.weight_strategy == "tensor":
            layer.register_parameter("weight_scale", linear_param(
                torch.empty(parts, dtype=torch.float32), per_part=True))
        elif self.serialized:
            layer.register_parameter("weight_scale", linear_param(
                torch.empty(rows, 1, dtype=torch.float32), output_dim=0))
        if self.activation_scheme == "static":
            layer.register_parameter("input_scale", linear_param(
                torch.empty(parts, dtype=torch.float32), per_part=True))

    def process_weights_after_loading(self, layer):
        check_fp8_device(layer.weight.device)
        if not self.serialized:
            q, scale = quantize_fp8_per_channel(layer.weight.data,
                                                channel_amax(layer, layer.weight.data))
            layer.weight = linear_param(q, output_dim=0, input_dim=1)
        elif self.weight_strategy == "tensor":  # each part's scale over the part's rows
            sizes = torch.tensor(layer.output_partition_sizes, device=layer.weight.device)
            scale = layer.weight_scale.data.repeat_interleave(sizes)
        else:
            scale = layer.weight_scale.data.reshape(-1)
        layer.weight_scale = linear_param(scale.float().contiguous(), output_dim=0)
        if self.activation_scheme == "static":  # one input, one scale: the largest
            layer.input_scale = linear_param(layer.input_scale.data.max().reshape(1),
                                             per_part=True)
        # torch's scaled matmul wants both matrix sizes in multiples of 16
        layer.fp8_scaled_mm = (fp8_supported(layer.weight.device)
                               and layer.weight.shape[0] % 16 == 0
                               and layer.weight.shape[1] % 16 == 0)

    def apply(self, layer, x, bias=None):
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        static = layer.input_scale if self.activation_scheme == "static" else None
        if x2.shape[0] <= GEMV_MAX_TOKENS:  # decode: quantize and multiply in one kernel
            y = gemv(x2, layer.weight, layer.weight_scale, bias, quantize_input=True,
                     input_scale=static)  # [T, out]
            return y.view(*x.shape[:-1], y.shape[-1])
        xq, x_scale = per_token_quant_fp8(x2, static)  # [T, in] fp8, [T, 1]
        y = fp8_matmul(xq, x_scale, layer.weight, layer.weight_scale, x.dtype,
                       getattr(layer, "fp8_scaled_mm", False))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], y.shape[-1])


def check_fp8_device(device: torch.device) -> None:
    if device.type == "cuda" and not fp8_supported(device):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ConfigError(f"fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper or "
                          f"later); this one ({torch.cuda.get_device_name(device)}) has {cap}. "
                          "Use --quantization int8, or run without quantization")


@dataclass(frozen=True)
class Fp8Config(QuantizationConfig):
    """`--quantization fp8` (quantized at load time: per-channel weights, dynamic per-token
    activations), or a checkpoint's `quant_method: "fp8"` config: FP8 weights with one
    `weight_scale` per tensor, `activation_scheme` static (with `input_scale`) or dynamic,
    `ignored_layers` left in the model dtype."""

    name: ClassVar[str] = "fp8"
    serialized: bool = False
    activation_scheme: str = "dynamic"
    ignored_layers: tuple[str, ...] = ()

    @classmethod
    def from_checkpoint(cls, qc: dict) -> Fp8Config:
        if qc.get("weight_block_size"):
            raise ConfigError(f"quantization_config weight_block_size={qc['weight_block_size']}:"
                              " block-wise FP8 checkpoints are not supported (per-tensor scales "
                              "only)")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ConfigError(f"quantization_config activation_scheme={scheme!r}: one of "
                              f"{', '.join(ACTIVATION_SCHEMES)}")
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"quantization_config fmt={fmt!r}: only e4m3 is supported")
        return cls(serialized=True, activation_scheme=scheme,
                   ignored_layers=tuple(qc.get("ignored_layers") or ()))

    def linear_method(self) -> LinearMethod:
        return Fp8LinearMethod(self.serialized, "tensor", self.activation_scheme)

    def method_for(self, names: list[str], default: LinearMethod) -> LinearMethod:
        flags = [matches(n, self.ignored_layers) for n in names]
        if all_or_none(names, flags, "quantization_config ignored_layers"):
            return UnquantizedLinearMethod()
        return default

    def check_device(self, device: torch.device) -> None:
        check_fp8_device(device)

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        return drop_named(weights, KV_SCALE_SUFFIXES) if self.serialized else weights

    def describe(self) -> str:
        if not self.serialized:
            return "fp8 (quantized at load time: per-channel weights, per-token activations)"
        return f"fp8 checkpoint (per-tensor weight scales, {self.activation_scheme} activations)"

