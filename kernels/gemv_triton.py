"""Triton version of gemv_ref.py: the small-M linear (decode batches of 1 to 64 rows) that
streams the weight once.

Each program owns BLOCK_N rows of the weight [N, K] (K contiguous) and walks the whole of K in
BLOCK_K steps: one pass over the weight with wide coalesced loads, pipelined num_stages deep, no
split-K and no second kernel. The few rows of x (padded to 16, 32 or 64 for tl.dot, the
padding masked) are re-read from L2 by every program. INT8 weights are widened in registers
(exact: int8 values are fp16 / bf16 values) and multiplied on the tensor cores into float32.

With `quantize_input` (the FP8 scheme) a first pass over x finds each row's max |x| (or the
static scale is read), then every x tile is quantized to e4m3 in registers just before its dot,
so the products are those of per_token_quant_fp8_ref's values, multiplied as e4m3 x e4m3 on the
tensor cores. Their accumulation is not exact float32 (Hopper's FP8 MMA keeps fewer bits, as
torch._scaled_mm's does): ~2e-3 relative at K = 4096, measured. Widening both to fp16 first
was exact but 1.3-1.7x slower at batch 1 (docs/PERF.md). The quotient x / scale is
x * (1 / scale) corrected by one fused multiply-add (Markstein): the correctly rounded quotient,
as the reference's division, at a few instructions per element.

With SPLIT_K > 1 the programs of one BLOCK_N slice each take 1/SPLIT_K of K (more programs in
flight when N is narrow and K long, e.g. Llama's down projection: 4096 rows of 14336), store
their float32 partial sums to a workspace and count themselves in on a per-slice counter; the
program that arrives last adds the others' partials to its own, applies the epilogue, writes y
and resets the counter for the next call: one kernel, no memset, no second launch. The stores,
a CTA barrier, then one acquire-release atomic is the order CUDA's own grid synchronization
relies on; the partials are read past L1 (".cg"), which other SMs' writes do not update. The
workspace and counters are per device and shared by every call (kernels on one stream run one
after another): made on the first call at a size, before any CUDA graph captures it.

Meta-parameters come from small tables keyed on the weight kind and shape (gemv_config), never
from autotuning: the first call at a shape compiles, a CUDA graph captured after it replays the
same launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.gemv_ref import GEMV_KERNEL_ROWS
from kernels.quant_ref import FP8_DTYPE, FP8_MAX, MIN_SCALE
from kernels.triton_common import (
    count_in,
    interpreting,
    next_pow2,
    persistent_buffer,
    reset_if_last,
    round_to_e4m3,
    shared_memory_bytes,
)

DOT_ROWS = 16  # tl.dot's smallest M: x is padded to at least this many rows (masked)


def dot_rows(m: int) -> int:
    """The rows x is padded to: 16, or the power of two at or above m."""
    return max(DOT_ROWS, next_pow2(m))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (output columns) per program
    block_k: int  # weight columns per step; a step of one row is block_k * element bytes
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs sharing one BLOCK_N slice, each over 1/split_k of K


# (smallest N, smallest K, BLOCK_N, BLOCK_K in bytes of one weight row, num_warps, num_stages,
# split_k), first match wins; one table per weight kind, from sweeps at M = 1 on an H200 (runs 7b
# and 9b, docs/PERF.md; weights rotated past L2, in a CUDA graph). Wide N (gate_up, the LM head)
# takes 64 rows a program everywhere; narrow shards 16 rows with deeper steps, so a program
# keeps 16 KB in flight per stage.
# - "fp8" (e4m3 x e4m3 MMA): 6144 (Llama's qkv) 64 rows with deeper steps; 4096 x 4096 and
#   longer (o_proj, down) split K in two, 128 programs.
# - "int8" (widened in registers): 32-row programs split K in two for qkv and o_proj, down in
#   four: 14.9 -> 12.0, 10.6 -> 9.7 and 24.8 -> 21.3 us against the fp8 rows.
# - "dense" (weights in the model dtype: bf16, fp16, float32): no split; the 4096-row shapes
#   take 32 rows and 1 KB steps.
GEMV_TABLES: dict[str, tuple[tuple[int, int, int, int, int, int, int], ...]] = {
    "fp8": (
        (16384, 0, 64, 256, 4, 3, 1),
        (6144, 0, 64, 512, 4, 4, 1),
        (4096, 4096, 64, 512, 4, 4, 2),
        (3072, 0, 32, 512, 4, 4, 1),
        (0, 0, 16, 1024, 2, 4, 1),
    ),
    "int8": (
        (16384, 0, 64, 256, 4, 3, 1),
        (6144, 0, 32, 512, 4, 3, 2),
        (4096, 8192, 64, 512, 4, 3, 4),
        (4096, 0, 32, 512, 4, 3, 2),
        (3072, 0, 32, 512, 4, 4, 1),
        (0, 0, 16, 1024, 2, 4, 1),
    ),
    "dense": (
        (16384, 0, 64, 256, 4, 3, 1),
        (6144, 0, 64, 512, 4, 4, 1),
        (4096, 0, 32, 1024, 4, 4, 1),
        (3072, 0, 32, 512, 4, 4, 1),
        (0, 0, 16, 1024, 2, 4, 1),
    ),
}

def weight_kind(dtype: torch.dtype) -> str:
    """The GEMV_TABLES key of a weight dtype."""
    if dtype == FP8_DTYPE:
        return "fp8"
    return "int8" if dtype == torch.int8 else "dense"


# the pipelined tiles of one program (stages x (weight tile + the 16 x rows)) stay within this
# many bytes of shared memory on an H100 / H200 (227 KB an SM), and 27 KB under what a program
# may use on other GPUs (an A100's 164 KB, an L4's 99 KB): float32 activations halve BLOCK_K of
# the narrow row, whose 4 x (16 KB + 16 x 1024 x 4 B) would need 320 KB
SMEM_BUDGET = 200 * 1024
SMEM_MARGIN = 27 * 1024


def gemv_config(n: int, k: int, weight_dtype: torch.dtype, x_bytes: int = 2,
                shared_memory: int | None = None, rows: int = DOT_ROWS) -> GemvConfig:
    """The table's launch for a weight [n, k] of `weight_dtype` and `rows` (dot_rows) of
    activations of `x_bytes`-byte elements, on a device whose programs may use `shared_memory`
    bytes (default: an H200's)."""
    weight_bytes = weight_dtype.itemsize
    budget = SMEM_BUDGET if shared_memory is None else min(SMEM_BUDGET,
                                                           shared_memory - SMEM_MARGIN)
    for min_n, min_k, block_n, row_bytes, warps, stages, split in GEMV_TABLES[
            weight_kind(weight_dtype)]:
        if n >= min_n and k >= min_k:
            block_k = min(row_bytes // weight_bytes, max(16, next_pow2(k)))
            while block_k > 16 and stages * block_k * (
                    block_n * weight_bytes + rows * x_bytes) > budget:
                block_k //= 2
            return GemvConfig(block_n, block_k, warps, stages,
                              max(1, min(split, triton.cdiv(k, block_k))))
    raise AssertionError("every table ends with a row for every shape")


def split_buffers(device: torch.device, partial_floats: int, counters: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's split-K workspace (float32) and zeroed counters (int32), at least the
    sizes asked (triton_common.persistent_buffer: made before any graph captures them)."""
    return (persistent_buffer("gemv partials", device, partial_floats, torch.float32),
            persistent_buffer("gemv counters", device, max(counters, 1024), torch.int32,
                              zeroed=True))


@triton.jit
def _to_e4m3(v, s, r, FP8_MAX: tl.constexpr, ROUND: tl.constexpr):
    """v / s clamped to +-FP8_MAX and rounded to e4m3 (float8e4nv); r = 1 / s correctly
    rounded. q0 = v * r is within an ulp of v / s, and fma(fma(-q0, s, v), r, q0) is v / s
    correctly rounded; q0 is clamped first so that a quotient past float32 stays finite."""
    q0 = tl.clamp(v * r, -2.0 * FP8_MAX, 2.0 * FP8_MAX)
    q = tl.clamp(tl.fma(tl.fma(-q0, s, v), r, q0), -FP8_MAX, FP8_MAX)
    if ROUND:
        q = round_to_e4m3(q)
    return q.to(tl.float8e4nv)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, xs_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, K_SPLIT, stride_xm, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AMAX_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ONE_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr, STATIC: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, DOT_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, DOT_ROWS)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [16, 1]

    # x's scales (QUANT): s is a scalar (static, or the one row's) or [16, 1]; r = 1 / s
    s = 1.0
    r = 1.0
    if QUANT:
        if STATIC:
            s = tl.load(xs_ptr).to(tl.float32)
        elif ONE_ROW:
            amax = tl.zeros((AMAX_K,), tl.float32)
            for k0 in range(0, K, AMAX_K):
                k = k0 + tl.arange(0, AMAX_K)
                v = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)  # [AMAX_K]
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
        else:
            amax = tl.zeros((DOT_ROWS, AMAX_K), tl.float32)
            for k0 in range(0, K, AMAX_K):
                k = k0 + tl.arange(0, AMAX_K)
                v = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < K),
                            other=0.0).to(tl.float32)  # [16, AMAX_K]
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), FP8_MAX), MIN_SCALE)[:, None]
        r = tl.math.div_rn(s * 0.0 + 1.0, s)

    acc = tl.zeros((DOT_ROWS, BLOCK_N), dtype=tl.float32)
    k_start = tl.program_id(1) * K_SPLIT  # 0 and K without split-K
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BN, BK]
        if QUANT and ONE_ROW:  # quantize the one row; the 16 dot rows are copies of it
            v = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
            xq = _to_e4m3(v, s, r, FP8_MAX, ROUND)
            # a broadcast, not a masked pad: it reaches the dot operand without a trip through
            # shared memory (rows 1..15 are never stored)
            xt = tl.broadcast_to(xq[None, :], (DOT_ROWS, BLOCK_K))  # [16, BK]
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [16, BK]
            if QUANT:
                xt = _to_e4m3(xt.to(tl.float32), s, r, FP8_MAX, ROUND)
        if UPCAST:  # the interpreter, or float32 activations: float32 products
            acc += tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)),
                          input_precision="ieee")
        elif QUANT:  # e4m3 x e4m3 on the tensor cores (their float32 sums are not exact)
            acc += tl.dot(xt, tl.trans(w))
        else:  # e4m3 / int8 values are exact in fp16 / bf16
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))

    y_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:  # the last of the slice's programs to finish adds up and writes y
        part_rows = offs_m[:, None] * N + offs_n[None, :]  # [16, BN] in one [M, N] partial
        split = tl.program_id(1)
        tl.store(part_ptr + split * M * N + part_rows, acc, mask=y_ok)
        arrived = count_in(count_ptr + pid)
        # last: [16, BN], true everywhere in the program that arrived last (a comparison of
        # full tiles: the interpreter mishandles a scalar mask); the others only store
        last = y_ok & ((tl.zeros((DOT_ROWS, BLOCK_N), tl.int32) + arrived) == SPLIT_K - 1)
        for i in range(SPLIT_K - 1):  # every other program's partial
            other = i + (i >= split).to(tl.int32)
            acc += tl.load(part_ptr + other * M * N + part_rows, mask=last, other=0.0,
                           cache_modifier=".cg")
        reset_if_last(count_ptr + pid, arrived, SPLIT_K)
        y_ok = last

    if QUANT:
        acc = acc * s
    if HAS_SCALE:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def gemv_triton(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32, M <= GEMV_KERNEL_ROWS
    weight: torch.Tensor,  # [N, K] x's dtype, float8_e4m3fn or int8 (any with fp32 x)
    weight_scale: torch.Tensor | None = None,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
    quantize_input: bool = False,  # x to e4m3 per token inside the kernel (fp8 weight)
    input_scale: torch.Tensor | None = None,  # [] or [1] float32: static x scale
    config: GemvConfig | None = None,  # default: gemv_config of the shape
) -> torch.Tensor:
    """x @ (weight * weight_scale)^T + bias -> [M, N] in x's dtype, accumulated in float32."""
    assert x.dim() == 2 and x.stride(-1) == 1, "x: [M, K], rows contiguous"
    assert weight.dim() == 2 and weight.stride(-1) == 1 and (
        weight.shape[1] == x.shape[1]), (
        "weight: [N, K], rows contiguous", tuple(weight.shape), tuple(x.shape))
    m, k = x.shape[0], weight.shape[1]
    n = weight.shape[0]
    assert m <= GEMV_KERNEL_ROWS, f"gemv serves up to {GEMV_KERNEL_ROWS} rows, got {m}"
    if quantize_input:
        assert weight.dtype == FP8_DTYPE, "quantize_input multiplies e4m3 by e4m3"
    else:
        assert input_scale is None, "input_scale goes with quantize_input"
        assert x.dtype == torch.float32 or weight.dtype in (x.dtype, torch.int8, FP8_DTYPE), (
            f"{weight.dtype} weight with {x.dtype} x")
    if weight_scale is not None:
        assert weight_scale.shape == (n,) and weight_scale.dtype == torch.float32
    if bias is not None:
        assert bias.shape == (n,) and bias.stride(0) == 1
    if input_scale is not None:
        assert input_scale.numel() == 1 and input_scale.dtype == torch.float32
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    rows = dot_rows(m)
    cfg = config or gemv_config(n, k, weight.dtype, x.element_size(),
                                shared_memory_bytes(x.device), rows)
    amax_k = min(next_pow2(k), 8192 if m == 1 else 8192 // rows)  # [rows, amax_k] floats
    slices = triton.cdiv(n, cfg.block_n)
    # K per program: a whole number of BLOCK_K steps, so only the last program's last step
    # is masked; fewer programs than asked when K is too short for them all
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_split)
    # sized for GEMV_KERNEL_ROWS rows whatever m is: the warm-up of the first captured batch
    # size then makes it big enough for every later one
    part, count = (split_buffers(x.device, split * GEMV_KERNEL_ROWS * n, slices) if split > 1
                   else (y, y))
    _gemv_kernel[(slices, split)](
        x, weight, weight_scale if weight_scale is not None else y,
        bias if bias is not None else y, input_scale if input_scale is not None else y, y,
        part, count, m, n, k, k_split, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, AMAX_K=amax_k, SPLIT_K=split,
        ONE_ROW=m == 1,
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, QUANT=quantize_input,
        STATIC=input_scale is not None, UPCAST=interpreting() or x.dtype == torch.float32,
        ROUND=interpreting(), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, DOT_ROWS=rows,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
