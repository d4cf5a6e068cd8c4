"""Reference paged attention: any mix of prefill chunks and decodes, read from the paged cache."""

from __future__ import annotations

import torch

from kernels.quant_ref import FP8_DTYPE, FP8_MAX


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_context_len: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Each sequence's queries are its last query_len positions; each attends causally to the
    sequence's cached keys (and, with a sliding window W, only to the last W of them)."""
    num_tokens, num_heads, _ = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = context_lens.shape[0]
    device = query.device
    if num_tokens == 0:
        return torch.empty_like(query)

    ctx = context_lens.long()
    q_start = query_start_loc.long()
    q_lens = q_start[1:] - q_start[:-1]  # [S]

    # gather keys/values of every sequence into [S, max_ctx, kv_heads, D]
    kpos = torch.arange(max_context_len, device=device)  # [C]
    blk_idx = (kpos // block_size).clamp(max=block_tables.shape[1] - 1)
    blocks = block_tables.long()[:, blk_idx]  # [S, C]
    offs = (kpos % block_size).expand(num_seqs, -1)
    k = key_cache[blocks, offs].float()  # [S, C, KVH, D]
    v = value_cache[blocks, offs].float()

    # pad queries into [S, max_q, H, D]
    j = torch.arange(max_query_len, device=device)  # [Q]
    q_valid = j[None, :] < q_lens[:, None]  # [S, Q]
    tok = (q_start[:-1, None] + j[None, :]).clamp(max=num_tokens - 1)
    q = query[tok].float()  # [S, Q, H, D]
    qpos = ctx[:, None] - q_lens[:, None] + j[None, :]  # [S, Q]

    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)  # [S, C, H, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("sqhd,schd->shqc", q, k) * scale  # [S, H, Q, C]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    rel = (kpos[None, None, :] - qpos[:, :, None]).float()  # [S, Q, C]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float()[None, :, None, None] * rel[:, None]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    if sliding_window:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    mask &= q_valid[:, :, None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("shqc,schd->sqhd", probs, v)  # [S, Q, H, D]
    return out[q_valid].to(query.dtype)  # [num_tokens, H, D]


def reshape_and_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = skip (padding)
) -> None:
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key, value = key[valid], value[valid]
    if key_cache.dtype == FP8_DTYPE:  # e4m3 saturates at +-FP8_MAX (the scale is 1)
        key, value = key.float().clamp(-FP8_MAX, FP8_MAX), value.float().clamp(-FP8_MAX, FP8_MAX)
    key_cache[slots // block_size, slots % block_size] = key.to(key_cache.dtype)
    value_cache[slots // block_size, slots % block_size] = value.to(value_cache.dtype)
