"""Causal attention over prompts that start at position 0, from this step's own keys and values.

When no prefill sequence of a step has tokens cached before its chunk, its keys are exactly the
step's keys, laid out densely: torch's scaled-dot-product attention can serve it without
reading the paged cache. On Hopper the cuDNN backend runs causal prefill at 1.6-1.8x our
Triton kernel (docs/PERF.md, session 13), so the engine takes this path there for up to
DENSE_MAX_CALLS prompts of DENSE_MIN_LEN tokens or more, each padded to one of a few lengths a
octave (cuDNN plans every new length, ~37 ms). Anything else (prefix-cache hits, later chunks,
ALiBi, soft caps, windows, an FP8 KV cache, a GPU where cuDNN's attention does not run) stays
on the paged kernel.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

DENSE_MIN_LEN = 128  # shorter prompts: the paged kernel (cuDNN's call costs more than it saves)
DENSE_MAX_CALLS = 8  # one call a prompt: at most this many prompts in a step
DEVICES = ("cuda",)  # where the engine takes the path (tests add "cpu": SDPA's math backend)


@functools.cache
def _cudnn_runs(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                head_dim: int) -> bool:
    """Whether cuDNN's attention takes this shape on this GPU (one small call, once)."""
    try:
        q = torch.zeros(1, heads, DENSE_MIN_LEN, head_dim, dtype=dtype, device=device)
        k = torch.zeros(1, kv_heads, DENSE_MIN_LEN, head_dim, dtype=dtype, device=device)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            scaled_dot_product_attention(q, k, k, is_causal=True,
                                         enable_gqa=heads != kv_heads)
        return True
    except RuntimeError:
        return False


def dense_prefill_usable(query: torch.Tensor, num_kv_heads: int, lens: tuple[int, ...]) -> bool:
    """query [T, H, D]; lens: the prefill query lengths (all starting at position 0)."""
    if query.device.type not in DEVICES or min(lens) < DENSE_MIN_LEN:
        return False
    if len(lens) > DENSE_MAX_CALLS:
        return False
    if query.device.type != "cuda":
        return True
    return (query.dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cuda.cudnn_sdp_enabled()
            and _cudnn_runs(query.device, query.dtype, query.shape[1], num_kv_heads,
                            query.shape[2]))


def bucket_len(n: int) -> int:
    """n rounded up to a multiple of a quarter of the power of two at or below it (at most 25 %
    more): cuDNN builds an execution plan for every new sequence length (~37 ms on an H200,
    run 13d), so lengths are padded to a few per octave."""
    step = 1 << max(n.bit_length() - 3, 0)
    return -(-n // step) * step


def dense_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            lens: tuple[int, ...], scale: float) -> torch.Tensor:
    """query [T, H, D], key / value [T, KVH, D] (rotated, this step's), T = sum(lens): causal
    attention within each sequence of `lens` tokens -> [T, H, D]. One call a sequence, padded
    at its end to bucket_len (causal: no real query sees a padded key)."""
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[2]
    backend = SDPBackend.CUDNN_ATTENTION if query.is_cuda else SDPBackend.MATH
    outs, start = [], 0
    with sdpa_kernel([backend]):
        for n in lens:
            padded = bucket_len(n)

            def dense(t: torch.Tensor, n=n, padded=padded, start=start) -> torch.Tensor:
                rows = t[start:start + n]
                if padded != n:
                    rows = torch.cat([rows, rows.new_zeros(padded - n, *rows.shape[1:])])
                return rows.unsqueeze(0).transpose(1, 2)  # [1, heads, padded, D]
            o = scaled_dot_product_attention(dense(query), dense(key), dense(value),
                                             is_causal=True, scale=scale,
                                             enable_gqa=heads != kv_heads)
            # (cuDNN lays its output out as the query: [1, padded, H, D] underneath)
            outs.append(o[0].transpose(0, 1)[:n])
            start += n
    return outs[0].reshape(-1, heads, head_dim) if len(outs) == 1 else torch.cat(outs)
