"""Reference of the small-M linear (decode-sized batches): y = x @ (weight * scale)^T + bias for
a few rows of x, the weight in bf16 / fp16, float8_e4m3fn or int8 with an optional scale per
output channel, accumulated in float32 and returned in x's dtype.

`quantize_input` is the FP8 scheme's numerics: each row of x quantized to e4m3 with its own
scale (or the one static `input_scale`) exactly as per_token_quant_fp8_ref does, the e4m3
values multiplied in float32, the sum scaled by x_scale * w_scale.
"""

from __future__ import annotations

import torch

from kernels.quant_ref import per_token_quant_fp8_ref

GEMV_MAX_TOKENS = 16  # the engine's linears take the small-M path up to this many rows
GEMV_KERNEL_ROWS = 64  # what the kernel itself serves (x padded to 16, 32 or 64 dot rows)
# on a Hopper GPU the unquantized linear gives decode-sized batches to the small-M kernel when the
# 16-bit weight has fewer rows than this, cuBLAS otherwise: at M = 1 in the run-9b sweep (one
# H200) the kernel beat cuBLAS on Llama-3-8B's qkv, o_proj and down (15.4 / 11.4 / 30.1 against
# 16.4 / 12.7 / 31.0 us) and lost on gate_up (57.7 against 57.0 us)
CUBLAS_MIN_ROWS_16BIT = 16384
# ... and batches of 33 to 64 rows when the weight is at least this many times longer (K) than
# wide (N): at 64 rows (run 11b, one H200) the kernel beat cuBLAS on Llama-3-8B's down projection
# (33.3 against 36.1 us: cuBLAS splits K and adds a reduction kernel) and lost or tied on qkv,
# o_proj and gate_up; at 32 rows it lost on all four
GEMV_LONG_K_RATIO = 3


def gemv_ref(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
    weight: torch.Tensor,  # [N, K] bf16 / fp16 / fp32 / float8_e4m3fn / int8
    weight_scale: torch.Tensor | None = None,  # [N] float32: weight ~= weight * scale per row
    bias: torch.Tensor | None = None,  # [N]
    quantize_input: bool = False,  # x to e4m3 per token first (the FP8 scheme)
    input_scale: torch.Tensor | None = None,  # [] or [1] float32: a static x scale
) -> torch.Tensor:
    """-> [M, N] in x's dtype; the scales and the bias applied to the float32 sum."""
    if quantize_input:
        xq, x_scale = per_token_quant_fp8_ref(x, input_scale)  # [M, K] fp8, [M, 1]
        acc = xq.float() @ weight.float().t()  # [M, N]
        acc = acc * x_scale
    else:
        assert input_scale is None, "input_scale goes with quantize_input"
        acc = x.float() @ weight.float().t()  # [M, N]
    if weight_scale is not None:
        acc = acc * weight_scale.float()[None, :]
    if bias is not None:
        acc = acc + bias.float()[None, :]
    return acc.to(x.dtype)
