"""References for the quantization kernels: per-token FP8 activation quantization and the
weight-only INT8 matmul that dequantizes on the fly.

FP8 is float8_e4m3fn (largest value 448). A per-token scale is max|row| / 448, so the row's
largest entry maps to 448; each entry is x / scale (correctly rounded division), clamped to
+-448 and rounded to the nearest e4m3 value (ties to even).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros with this scale, never 0 / 0


def per_token_quant_fp8_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    scale: torch.Tensor | None = None,  # [] or [1]: a static scale; None: one per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x quantized to float8_e4m3fn [num_tokens, hidden], scales [num_tokens, 1]
    float32) with x ~= q * scales; a static `scale` is used for every token."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # divided by a tensor: torch on CUDA turns a division by a Python number into a
        # multiplication by its reciprocal, which is not the correctly rounded quotient
        scales = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_SCALE)
    else:
        scales = scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scales.contiguous()


def int8_weight_matmul_ref(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out, in] int8
    scale: torch.Tensor,  # [out] float32: weight ~= int8 * scale per output channel
) -> torch.Tensor:
    """x @ (weight * scale)^T in float32, returned in x's dtype -> [num_tokens, out]. The scale
    is applied after the sum over the input (it is constant along it)."""
    acc = x.float() @ weight.float().t()  # [num_tokens, out]
    return (acc * scale.float()).to(x.dtype)
