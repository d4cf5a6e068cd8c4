"""The kernels the engine calls: Triton on CUDA tensors, the torch reference elsewhere."""

from __future__ import annotations

import torch

from kernels.attention_ref import paged_attention_ref, reshape_and_cache_ref
from kernels.elementwise_ref import gelu_and_mul_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref

# TODO(kernels): route CUDA tensors to the Triton kernels.


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_context_len: int,
                    num_prefills: int, num_prefill_tokens: int, scale: float,
                    alibi_slopes: torch.Tensor | None = None, sliding_window: int | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    return paged_attention_ref(query, key_cache, value_cache, block_tables, context_lens,
                               query_start_loc, max_query_len, max_context_len, scale,
                               alibi_slopes, sliding_window, logits_soft_cap)


reshape_and_cache = reshape_and_cache_ref
rms_norm = rms_norm_ref
rotary_embedding = rotary_ref
silu_and_mul = silu_and_mul_ref
gelu_and_mul = gelu_and_mul_ref
