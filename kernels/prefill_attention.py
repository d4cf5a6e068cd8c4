"""Prefill attention in Triton, reading keys and values from the paged cache.

Covers varlen batches, chunked prefill and prefix-cache hits: sequence s's queries are the last
query_len of its context_len positions, and the current chunk's keys are already in the cache.
One program handles BLOCK_M queries of one head; it streams key tiles with an online softmax
(flash-attention style) and visits only the key tiles its causal band (and window) can reach.
Tiles wholly inside every row's band run without masks; only the edge tiles are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    LOG2E,
    dot,
    interpreting,
    next_pow2,
    runtime_args,
    tanh,
    upcast_dots,
)


@triton.jit
def _tiles(
    acc, l_i, m_i, q, qpos, kvh, slope, bt_row, k_cache_ptr, v_cache_ptr,
    start, end, qk_scale, cap_in, cap_out, window,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        if MASKED:
            kmask = kpos < end
            blk = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + kpos // PAGE).to(tl.int64)
        slot = kpos % PAGE
        k_ptrs = k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_kt \
            + kvh * stride_kh + offs_d[None, :]
        v_ptrs = v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vt \
            + kvh * stride_vh + offs_d[None, :]
        if MASKED:
            ld_mask = kmask[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
            v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache is widened (to fp16)
        s = dot(q, tl.trans(k), UPCAST)  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:
            s = cap_out * tanh(s * cap_in)
        else:
            s = s * qk_scale
        if USE_ALIBI:
            s += slope * (kpos[None, :] - qpos[:, None]).to(tl.float32)
        if MASKED:
            allowed = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
            if USE_WINDOW:
                allowed &= kpos[None, :] > qpos[:, None] - window
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(**runtime_args("block_tables_ptr", "context_lens_ptr", "query_start_ptr",
                          "stride_bt"))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr,
    query_start_ptr, alibi_ptr,
    qk_scale, cap_in, cap_out, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, KV_FP8: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) query tiles first
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP

    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    m0 = tile * BLOCK_M
    if m0 >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    first = ctx - q_len  # position of the sequence's first query
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    qd_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    qpos = first + offs_m
    q = tl.load(q_ptr + (q_begin + offs_m)[:, None] * stride_qt + head * stride_qh
                + offs_d[None, :], mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if KV_FP8:  # a 16-bit query with an FP8 cache: e4m3 widens to fp16 in one instruction
        # (to bf16 it takes several); a float32 query widens the cache to float32
        q = q.to(tl.float16)
    slope = 0.0
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + head) * 1.4426950408889634

    q_lo = first + m0
    q_hi = first + tl.minimum(m0 + BLOCK_M, q_len) - 1
    # keys [a, b) are visible to every row of the tile: no mask needed there
    lo = 0
    a = 0
    if USE_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0)
        a = tl.maximum(q_hi - window + 1, 0)
    b = a + (tl.maximum(q_lo + 1 - a, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    if USE_WINDOW:
        acc, l_i, m_i = _tiles(
            acc, l_i, m_i, q, qpos, kvh, slope, bt_row, k_cache_ptr, v_cache_ptr,
            lo, a, qk_scale, cap_in, cap_out, window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_ALIBI, USE_WINDOW, USE_SOFTCAP, UPCAST)
    acc, l_i, m_i = _tiles(
        acc, l_i, m_i, q, qpos, kvh, slope, bt_row, k_cache_ptr, v_cache_ptr,
        a, b, qk_scale, cap_in, cap_out, window,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, USE_ALIBI, USE_WINDOW, USE_SOFTCAP, UPCAST)
    acc, l_i, m_i = _tiles(
        acc, l_i, m_i, q, qpos, kvh, slope, bt_row, k_cache_ptr, v_cache_ptr,
        b, q_hi + 1, qk_scale, cap_in, cap_out, window,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_ALIBI, USE_WINDOW, USE_SOFTCAP, UPCAST)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_begin + offs_m)[:, None] * stride_ot + head * stride_oh
             + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=qd_mask)


def default_prefill_config(head_dim: int, max_query_len: int) -> dict:
    """Tile shapes measured on an H200 (docs/KERNELS-NOTES.md); small tiles on the interpreter."""
    if interpreting():
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if next_pow2(head_dim) >= 256:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    if max_query_len <= 64:
        return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
    return {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}


def paged_prefill_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, cached prefix + this chunk
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    config: dict | None = None,  # block_m / block_n / num_warps / num_stages overrides
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    _, page, num_kv_heads, kd = key_cache.shape
    num_seqs = context_lens.shape[0]
    assert kd == head_dim and value_cache.shape == key_cache.shape, "cache shape mismatch"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert query_start_loc.shape[0] == num_seqs + 1 and block_tables.shape[0] == num_seqs
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1 and context_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    cfg = default_prefill_config(head_dim, max_query_len)
    cfg.update(config or {})
    use_alibi = alibi_slopes is not None
    use_softcap = bool(logits_soft_cap)
    cap = float(logits_soft_cap) if use_softcap else 1.0
    grid = (triton.cdiv(max_query_len, cfg["block_m"]), num_seqs, num_heads)
    _prefill_kernel[grid](
        query, key_cache, value_cache, out, block_tables, context_lens, query_start_loc,
        alibi_slopes if use_alibi else query,
        scale * LOG2E, scale / cap, cap * LOG2E, int(sliding_window or 0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], PAGE=page,
        USE_ALIBI=use_alibi, USE_WINDOW=bool(sliding_window), USE_SOFTCAP=use_softcap,
        UPCAST=upcast_dots(query.dtype),
        KV_FP8=key_cache.dtype == torch.float8_e4m3fn and query.element_size() == 2,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
