"""Triton versions of quant_ref.py: per-token FP8 activation quantization (one pass over each
row: max, scale, quantize) and the weight-only INT8 matmul that dequantizes tiles on the fly.
Each computes the same function as its reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_ref import FP8_DTYPE, FP8_MAX, MIN_SCALE
from kernels.triton_common import next_pow2, num_sms, round_to_e4m3, upcast_dots


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, hidden, stride_x, stride_q,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
    STATIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
    v = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, round_to_e4m3(v).to(q_ptr.dtype.element_ty),
             mask=mask)
    tl.store(s_ptr + row, scale)


def per_token_quant_fp8_triton(
    x: torch.Tensor,  # [num_tokens, hidden]
    scale: torch.Tensor | None = None,  # [] or [1] float32: static; None: per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q [num_tokens, hidden] float8_e4m3fn, scales [num_tokens, 1] float32)."""
    assert x.dim() == 2 and x.stride(-1) == 1, "x: [num_tokens, hidden], rows contiguous"
    tokens, hidden = x.shape
    q = torch.empty((tokens, hidden), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if scale is not None:
        assert scale.numel() == 1 and scale.dtype == torch.float32
    if tokens:
        block = next_pow2(hidden)
        _per_token_quant_kernel[(tokens,)](
            x, q, scales, scale if scale is not None else scales, hidden, x.stride(0),
            q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK=block,
            STATIC=scale is not None, num_warps=max(1, min(16, block // 256)),
        )
    return q, scales


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K),
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_cols + k[:, None], mask=(k[:, None] < K) & (offs_n[None, :] < N),
                    other=0)  # [BLOCK_K, BLOCK_N] int8
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        elif IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))  # int8 values are exact in bf16 / fp16
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc * scale[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _int8_config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Decode-sized batches stream the
    weight once: narrow column tiles so there are programs for every SM."""
    if m <= 16:
        block_n = 64 if triton.cdiv(n, 64) >= 2 * num_sms(device) else 32
        return 16, block_n, 128, 4, 4
    if m <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 64, 8, 3


def int8_weight_matmul_triton(
    x: torch.Tensor,  # [num_tokens, in] bf16 / fp16 / fp32
    weight: torch.Tensor,  # [out, in] int8
    scale: torch.Tensor,  # [out] float32
) -> torch.Tensor:
    """x @ (weight * scale)^T -> [num_tokens, out] in x's dtype, accumulated in float32."""
    assert x.dim() == 2 and x.stride(-1) == 1, "x: [num_tokens, in], rows contiguous"
    assert weight.dtype == torch.int8 and weight.stride(-1) == 1
    assert weight.shape[1] == x.shape[1] and scale.shape == (weight.shape[0],)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bm, bn, bk, warps, stages = _int8_config(m, n, x.device)
    bk = min(bk, max(16, next_pow2(k)))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_matmul_kernel[grid](
        x, weight, scale.float().contiguous(), y, m, n, k, x.stride(0), weight.stride(0),
        y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=upcast_dots(x.dtype),
        IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return y
