"""The kernels the engine calls: Triton on CUDA tensors, the torch reference elsewhere.

Triton is imported only when a CUDA tensor arrives, so CPU-only installs (no triton) work, and
tests can set TRITON_INTERPRET before the first import of the Triton modules.
"""

from __future__ import annotations

import functools
import types

import torch

from kernels.attention_ref import paged_attention_ref, reshape_and_cache_ref
from kernels.elementwise_ref import gelu_and_mul_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref
from kernels.gemv_ref import gemv_ref
from kernels.quant_ref import int8_weight_matmul_ref, per_token_quant_fp8_ref


@functools.lru_cache(maxsize=1)
def _triton() -> types.SimpleNamespace | None:
    """The Triton entry points, or None where triton is not installed."""
    try:
        from kernels import attention_triton, elementwise_triton, gemv_triton, quant_triton
    except ImportError:
        return None
    return types.SimpleNamespace(
        paged_attention=attention_triton.paged_attention_triton,
        reshape_and_cache=attention_triton.reshape_and_cache_triton,
        rms_norm=elementwise_triton.rms_norm_triton,
        rotary=elementwise_triton.rotary_triton,
        rotary_and_cache=elementwise_triton.rotary_and_cache_triton,
        silu_and_mul=elementwise_triton.silu_and_mul_triton,
        gelu_and_mul=elementwise_triton.gelu_and_mul_triton,
        per_token_quant_fp8=quant_triton.per_token_quant_fp8_triton,
        int8_weight_matmul=quant_triton.int8_weight_matmul_triton,
        gemv=gemv_triton.gemv_triton,
    )


def _use_triton(t: torch.Tensor) -> types.SimpleNamespace | None:
    return _triton() if t.is_cuda else None


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_context_len: int,
                    num_prefills: int, num_prefill_tokens: int, scale: float,
                    alibi_slopes: torch.Tensor | None = None, sliding_window: int | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    tri = _use_triton(query)
    if tri is not None:
        return tri.paged_attention(query, key_cache, value_cache, block_tables, context_lens,
                                   query_start_loc, max_query_len, max_context_len,
                                   num_prefills, num_prefill_tokens, scale, alibi_slopes,
                                   sliding_window, logits_soft_cap)
    return paged_attention_ref(query, key_cache, value_cache, block_tables, context_lens,
                               query_start_loc, max_query_len, max_context_len, scale,
                               alibi_slopes, sliding_window, logits_soft_cap)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    tri = _use_triton(key)
    if tri is not None:
        return tri.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    return reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None,
             weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    tri = _use_triton(x)
    if tri is not None:
        return tri.rms_norm(x, weight, eps, residual, weight_offset)
    return rms_norm_ref(x, weight, eps, residual, weight_offset)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int,
                     is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tri = _use_triton(query)
    if tri is not None:
        return tri.rotary(positions, query, key, cos_sin_cache, head_dim, is_neox)
    return rotary_ref(positions, query, key, cos_sin_cache, head_dim, is_neox)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
                     is_neox: bool, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding, then reshape_and_cache of the rotated key and the value: returns the
    rotated query. One kernel on CUDA (the rotated key is never written anywhere else)."""
    tri = _use_triton(query)
    if tri is not None:
        return tri.rotary_and_cache(positions, query, key, value, cos_sin_cache, head_dim,
                                    is_neox, key_cache, value_cache, slot_mapping)
    query, key = rotary_ref(positions, query, key, cos_sin_cache, head_dim, is_neox)
    heads = (key.shape[0], -1, head_dim)
    reshape_and_cache_ref(key.view(heads), value.view(heads), key_cache, value_cache,
                          slot_mapping)
    return query


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    tri = _use_triton(x)
    return tri.silu_and_mul(x) if tri is not None else silu_and_mul_ref(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    tri = _use_triton(x)
    return tri.gelu_and_mul(x, approximate) if tri is not None else gelu_and_mul_ref(x, approximate)


def per_token_quant_fp8(x: torch.Tensor, scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H] -> (float8_e4m3fn [T, H], scales [T, 1] float32); `scale`: one static scale."""
    tri = _use_triton(x)
    if tri is not None:
        return tri.per_token_quant_fp8(x, scale)
    return per_token_quant_fp8_ref(x, scale)


def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """[T, in] @ (int8 [out, in] * scale [out])^T -> [T, out] in x's dtype."""
    tri = _use_triton(x)
    if tri is not None:
        return tri.int8_weight_matmul(x, weight, scale)
    return int8_weight_matmul_ref(x, weight, scale)


def gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, quantize_input: bool = False,
         input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The small-M linear (M <= kernels.gemv_ref.GEMV_KERNEL_ROWS rows): [M, K] @ (weight [N, K]
    * weight_scale [N])^T + bias -> [M, N] in x's dtype. `quantize_input`: x to e4m3 per token
    (or with the static `input_scale`) first, for an e4m3 weight (the FP8 scheme)."""
    tri = _use_triton(x)
    if tri is not None:
        return tri.gemv(x, weight, weight_scale, bias, quantize_input, input_scale)
    return gemv_ref(x, weight, weight_scale, bias, quantize_input, input_scale)
