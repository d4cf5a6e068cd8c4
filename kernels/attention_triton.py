"""Triton entry points for a whole attention step: the mixed prefill + decode batch, and the
KV-cache write (reshape_and_cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.decode_attention import paged_decode_attention_triton
from kernels.prefill_attention import paged_prefill_attention_triton
from kernels.quant_ref import FP8_DTYPE, FP8_MAX
from kernels.triton_common import interpreting, next_pow2, runtime_args, to_cache


def paged_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_context_len: int,
    num_prefills: int,
    num_prefill_tokens: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Same function as paged_attention_ref. The batch holds num_prefills sequences
    (num_prefill_tokens tokens) first, then decodes of one token each."""
    out = torch.empty_like(query)
    num_seqs = context_lens.shape[0]
    if num_prefills > 0:
        paged_prefill_attention_triton(
            query[:num_prefill_tokens], key_cache, value_cache, block_tables[:num_prefills],
            context_lens[:num_prefills], query_start_loc[:num_prefills + 1], max_query_len,
            scale, alibi_slopes, sliding_window, logits_soft_cap,
            out=out[:num_prefill_tokens])
    num_decodes = num_seqs - num_prefills
    if num_decodes > 0:
        assert query.shape[0] - num_prefill_tokens == num_decodes, "one token per decode"
        paged_decode_attention_triton(
            query[num_prefill_tokens:], key_cache, value_cache, block_tables[num_prefills:],
            context_lens[num_prefills:], scale, alibi_slopes, sliding_window, logits_soft_cap,
            max_context_len=max_context_len, out=out[num_prefill_tokens:])
    return out


@triton.jit(**runtime_args("slot_ptr", "num_tokens"))
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr,
    FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    t = t.to(tl.int64)[:, None, None]
    blk = (slot // PAGE)[:, None, None]
    off = (slot % PAGE)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (slot >= 0)[:, None, None] & (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    k, v = to_cache(k, FP8, FP8_MAX, ROUND), to_cache(v, FP8, FP8_MAX, ROUND)
    tl.store(key_cache_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d,
             k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache_triton(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = skip (padding)
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and key_cache.shape[2:] == (num_kv_heads, head_dim)
    assert value_cache.shape == key_cache.shape and slot_mapping.shape[0] >= num_tokens
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    block_t = max(1, min(16, 4096 // (block_h * block_d)))
    _reshape_and_cache_kernel[(triton.cdiv(num_tokens, block_t),)](
        key, value, key_cache, value_cache, slot_mapping.contiguous(), num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_D=block_d, PAGE=key_cache.shape[1], FP8=key_cache.dtype == FP8_DTYPE,
        FP8_MAX=FP8_MAX, ROUND=interpreting(), num_warps=4,
    )
