"""PagedAttention: writes this step's K/V into the paged cache, then attends from the cache."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.layers.attention_metadata import AttentionMetadata
from engine.layers.rotary import RotaryEmbedding
from kernels import ops
from kernels.dense_prefill import dense_prefill_attention, dense_prefill_usable


def alibi_slopes(total_num_heads: int) -> torch.Tensor:
    """The ALiBi paper's head slopes (geometric; extra heads interleaved for non-powers of 2)."""
    closest = 2 ** math.floor(math.log2(total_num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != total_num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, total_num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(extra)]
    return torch.tensor(slopes, dtype=torch.float32)


class PagedAttention(nn.Module):
    """q [T, H * D], k/v [T, KVH * D] -> [T, H * D]. H and KVH are this rank's heads."""

    def __init__(self, num_heads: int, head_dim: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        self.sliding_window = sliding_window or None
        self.logits_soft_cap = logits_soft_cap or None
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata,
                rotary: RotaryEmbedding | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, heads * head_dim], k and v [T, kv_heads * head_dim] -> [T, heads * head_dim].
        With `rotary` (and the step's `positions`) q and k are rotated first, in the kernel
        that writes the cache: the same values as calling the rotary, then this, without."""
        num_tokens = q.shape[0]
        q3 = q.view(num_tokens, self.num_heads, self.head_dim)  # a wrong head count fails here
        k3 = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v3 = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block, KVH, D]
        m = attn_metadata
        if self._dense_prefill(q3, key_cache, m):
            return self._forward_dense_prefill(q, k, v, key_cache, value_cache, m, rotary,
                                               positions)
        if rotary is not None and type(rotary).forward is RotaryEmbedding.forward:
            assert positions is not None, "the rotary goes with the step's positions"
            q = rotary.rotate_and_cache(positions, q, k, v, key_cache, value_cache,
                                        m.slot_mapping, m.long_rope).view(q3.shape)
        else:
            if rotary is not None:  # a rotary of its own forward: called as it is
                q, k = rotary(positions, q, k, m.long_rope)
                q3, k3 = q.view(q3.shape), k.view(k3.shape)
            ops.reshape_and_cache(k3, v3, key_cache, value_cache, m.slot_mapping)
            q = q3
        out = ops.paged_attention(q, key_cache, value_cache, m.block_tables, m.context_lens,
                                  m.query_start_loc, m.max_query_len, m.max_context_len,
                                  m.num_prefills, m.num_prefill_tokens, self.scale,
                                  self.alibi_slopes, self.sliding_window, self.logits_soft_cap)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _dense_prefill(self, q3: torch.Tensor, key_cache: torch.Tensor,
                       m: AttentionMetadata) -> bool:
        """Whether this step's prefills take dense attention from the step's own keys
        (kernels/dense_prefill.py): prompts from position 0, no ALiBi / soft cap / window
        shorter than a prompt, a KV cache in the model's dtype (so both paths see the same
        keys)."""
        lens = m.fresh_prefill_lens
        if lens is None or self.alibi_slopes is not None or self.logits_soft_cap:
            return False
        if self.sliding_window is not None and self.sliding_window < max(lens):
            return False
        return (key_cache.dtype == q3.dtype
                and dense_prefill_usable(q3, self.num_kv_heads, lens))

    def _forward_dense_prefill(self, q, k, v, key_cache, value_cache, m, rotary, positions):
        num_tokens, p = q.shape[0], m.num_prefill_tokens
        if rotary is not None:
            q, k = rotary(positions, q, k, m.long_rope)
        q3 = q.view(num_tokens, self.num_heads, self.head_dim)
        k3 = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v3 = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        ops.reshape_and_cache(k3, v3, key_cache, value_cache, m.slot_mapping)
        prefill = dense_prefill_attention(q3[:p], k3[:p], v3[:p], m.fresh_prefill_lens,
                                          self.scale)
        if m.num_decode_tokens == 0:
            return prefill.view(num_tokens, self.num_heads * self.head_dim)
        out = torch.empty_like(q3)
        out[:p] = prefill
        n = m.num_prefills  # the decodes: one token each, from the cache
        out[p:] = ops.paged_attention(
            q3[p:], key_cache, value_cache, m.block_tables[n:], m.context_lens[n:],
            m.query_start_loc[n:] - p, 1, m.max_context_len, 0, 0, self.scale, None,
            self.sliding_window, None)
        return out.view(num_tokens, self.num_heads * self.head_dim)

