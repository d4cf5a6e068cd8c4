"""Paged decode attention in Triton: one query token per sequence, keys read from the paged cache.

One program handles one (sequence, KV head, split): the group's query heads are stacked into the
rows of one tile, so each KV head's keys and values are read once per group. With more than one
split (flash-decoding), each split writes a partial output and its log-sum-exp and counts itself
in on a per-(sequence, KV head) counter; the split that arrives last combines the others' partials
with its own, writes the output and resets the counter (one kernel: no second launch for the
reduction, as in kernels/gemv_triton.py's split-K); it reads each head's partials of all
splits in one load. Split ranges are computed in the kernel from each sequence's own context
length, so any context is covered whatever the split count (safe under CUDA-graph replay), and
a sequence whose context fills fewer splits than the grid has leaves the rest idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    LOG2E,
    count_in,
    dot,
    next_pow2,
    num_sms,
    persistent_buffer,
    reset_if_last,
    runtime_args,
    tanh,
    upcast_dots,
)

MAX_SPLITS = 64  # what the kernel serves (a caller's num_splits)
SPLIT_CAP = 32  # what choose_num_splits picks at most
TILE_TOKENS = 64  # keys a split must have at the least (the default tile)


@triton.jit(**runtime_args("block_tables_ptr", "context_lens_ptr", "part_out_ptr", "part_lse_ptr",
                          "count_ptr", "stride_bt", "num_splits", "min_tiles"))
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, alibi_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, count_ptr,
    qk_scale, cap_in, cap_out, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    num_heads, num_splits, min_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    # this sequence's own split count: at most num_splits (the grid's), each split at least
    # min_tiles tiles, so a short context in a graph captured for long ones splits little;
    # the grid's other programs return at once
    tiles = tl.cdiv(ctx - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, tl.maximum(tl.minimum(num_splits,
                                                           tl.cdiv(tiles, min_tiles)), 1))
    active = tl.maximum(tl.cdiv(tiles, tl.maximum(tiles_per_split, 1)), 1)
    if split >= active:
        return
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    hd_mask = h_mask[:, None] & d_mask[None, :]

    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hd_mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    if KV_FP8:  # a 16-bit query with an FP8 cache: e4m3 widens to fp16 in one instruction
        # (to bf16 it takes several); a float32 query widens the cache to float32
        q = q.to(tl.float16)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=h_mask, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        blk = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
        slot = kpos % PAGE
        ld_mask = kmask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_kt
                    + kvh * stride_kh + offs_d[None, :], mask=ld_mask, other=0.0)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vt
                    + kvh * stride_vh + offs_d[None, :], mask=ld_mask, other=0.0)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache is widened (to fp16)
        s = dot(q, tl.trans(k), UPCAST)  # [BLOCK_H, BLOCK_N]
        if USE_SOFTCAP:
            s = cap_out * tanh(s * cap_in)
        else:
            s = s * qk_scale
        if USE_ALIBI:
            s += slopes[:, None] * (kpos - (ctx - 1)).to(tl.float32)[None, :]
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if not SPLIT:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        row0 = (seq * num_heads + heads) * num_splits  # [BLOCK_H]: split 0's partial row
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + (row0 + split)[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=hd_mask)
        tl.store(part_lse_ptr + row0 + split, lse, mask=h_mask)
        counter = count_ptr + seq * tl.num_programs(1) + kvh
        arrived = count_in(counter)
        # the split that arrived last combines every split's partial (its own read back too),
        # head by head (unrolled): all splits' log-sum-exps and outputs of a head in one load
        # each. last_s: true in that split only (a full-tile comparison: the interpreter
        # mishandles a scalar mask)
        offs_s = tl.arange(0, BLOCK_S)
        last_s = (offs_s < active) & (
            (tl.zeros([BLOCK_S], tl.int32) + arrived) == active - 1)
        for h in tl.static_range(GROUP):
            _combine_head(part_out_ptr, part_lse_ptr, out_ptr + seq * stride_ot
                          + (kvh * GROUP + h) * stride_oh,
                          ((seq * num_heads + kvh * GROUP + h) * num_splits + offs_s),
                          last_s, offs_d, d_mask, HEAD_DIM)
        reset_if_last(counter, arrived, active)


@triton.jit
def _combine_head(part_out_ptr, part_lse_ptr, out_row_ptr, rows, last_s, offs_d, d_mask,
                  HEAD_DIM: tl.constexpr):
    """One head's output from its splits' partials (rows: [BLOCK_S] partial rows, masked
    past the split count and outside the last split): weights 2^(lse - max), 0 for an
    empty split; a head no split saw a key for gets 0."""
    lse = tl.load(part_lse_ptr + rows, mask=last_s, other=float("-inf"),
                  cache_modifier=".cg")  # [BLOCK_S]
    part = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=last_s[:, None] & d_mask[None, :], other=0.0,
                   cache_modifier=".cg")  # [BLOCK_S, BLOCK_D]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    den = tl.sum(w, 0)
    res = tl.sum(part * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)  # [BLOCK_D]
    any_last = tl.max(last_s.to(tl.int32), 0) + tl.zeros_like(offs_d)  # [BLOCK_D]
    tl.store(out_row_ptr + offs_d, res.to(out_row_ptr.dtype.element_ty),
             mask=d_mask & (any_last > 0))


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed arrival counters of split decode, one per (sequence, KV head), that the
    kernel leaves at zero (triton_common.persistent_buffer: made before any graph captures
    them). Split decode only runs with fewer than 3 programs per SM, so 1024 covers the
    engine's batches."""
    return persistent_buffer("decode counters", device, max(n, 1024), torch.int32, zeroed=True)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int,
                      sms: int) -> int:
    """The grid's split count: 1 when the (sequence, KV head) programs already keep HBM busy
    (>= 3 per SM); else enough splits for ~2 programs per SM, and for a split per 1024
    keys of the longest context, at most a split per tile of 64 keys and SPLIT_CAP in all.
    From the run-11c sweep on an H200 (docs/PERF.md; 8 KV heads): the best split counts were
    4 / 8 / 8 / 32 at batch 1 and contexts 256 / 512 / 1024 / 4096, 8 at batch 4 and context
    1024, 2 and 8 at batch 16 and contexts 1024 and 8192, and 1 from 512 programs up; more
    splits than that cost more in the combine than they gained (64 splits at batch 1 x 4096:
    34 against 15 us)."""
    programs = max(num_seqs * num_kv_heads, 1)
    if programs >= 3 * sms:
        return 1
    wanted = max(triton.cdiv(2 * sms, programs), max_context_len // 1024)
    return max(1, min(wanted, max_context_len // TILE_TOKENS, SPLIT_CAP))


def split_min_tokens(num_seqs: int, num_kv_heads: int) -> int:
    """The fewest keys a split of one sequence takes (fewer splits where its context is
    short): one 64-key tile per 16 programs of the batch, so 1 tile at batch 1 and 8 at batch
    16 with 8 KV heads, where the sweep found batch 16 at context 256 best unsplit (12.0 us
    against 16.5 with 4 splits) and batch 1 at 256 best with 4 (7.4 against 10.0). Computed per
    captured batch size, so a graph captured for long contexts splits short ones little."""
    return TILE_TOKENS * max(1, num_seqs * num_kv_heads // 16)


def default_decode_config(head_dim: int, block_h: int) -> dict:
    block_n = 32 if next_pow2(head_dim) >= 256 or block_h > 16 else 64
    return {"block_n": block_n, "num_warps": 4, "num_stages": 3}


def paged_decode_attention_triton(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim] (one token per sequence)
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    # a sequence's splits each take at least this many keys (default: split_min_tokens when
    # the split count is chosen here, one tile when num_splits is given)
    min_split_tokens: int | None = None,
    config: dict | None = None,  # block_n / num_warps / num_stages overrides (tuning)
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = query.shape
    _, page, num_kv_heads, kd = key_cache.shape
    assert kd == head_dim and value_cache.shape == key_cache.shape, "cache shape mismatch"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert block_tables.shape[0] == num_seqs and context_lens.shape[0] == num_seqs
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1 and context_lens.is_contiguous()
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(-1) == 1
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    block_h = max(16, next_pow2(group))
    cfg = default_decode_config(head_dim, block_h)
    cfg.update(config or {})
    if min_split_tokens is None:
        min_split_tokens = (split_min_tokens(num_seqs, num_kv_heads) if num_splits is None
                            else 1)
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max().item())
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len,
                                       num_sms(query.device))
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))

    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=query.device)
        count = split_counters(query.device, num_seqs * num_kv_heads)
    else:
        part_out = part_lse = count = out  # unused
    use_alibi = alibi_slopes is not None
    use_softcap = bool(logits_soft_cap)
    cap = float(logits_soft_cap) if use_softcap else 1.0
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, context_lens,
        alibi_slopes if use_alibi else query,
        out, part_out, part_lse, count,
        scale * LOG2E, scale / cap, cap * LOG2E, int(sliding_window or 0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), num_heads, num_splits,
        max(1, min_split_tokens // cfg["block_n"]),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim), BLOCK_H=block_h,
        BLOCK_N=cfg["block_n"], PAGE=page, SPLIT=num_splits > 1,
        BLOCK_S=max(2, next_pow2(num_splits)),
        USE_ALIBI=use_alibi, USE_WINDOW=bool(sliding_window), USE_SOFTCAP=use_softcap,
        UPCAST=upcast_dots(query.dtype),
        KV_FP8=key_cache.dtype == torch.float8_e4m3fn and query.element_size() == 2,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
