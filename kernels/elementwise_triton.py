"""Triton versions of the small fused kernels in elementwise_ref.py: add + RMSNorm, rotary
embedding, SiLU/GELU-and-mul. Each computes the same function as its reference, rounding where
the reference rounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_triton import reshape_and_cache_triton
from kernels.quant_ref import FP8_DTYPE, FP8_MAX
from kernels.triton_common import interpreting, next_pow2, runtime_args, tanh, to_cache


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, weight_offset, hidden,
    stride_x, stride_r, stride_o, stride_ro,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if HAS_OFFSET:
        y = h * (w.to(tl.float32) + weight_offset)
    else:  # the reference rounds h to x's dtype before the weight multiply
        y = w.to(tl.float32) * h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    out: torch.Tensor | None = None,  # [num_tokens, hidden]
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (norm(x + residual) * (w + offset), x + residual), written to new tensors (or to
    out / residual_out); the inputs are left untouched."""
    shape = x.shape
    hidden = shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous() and weight.shape[0] == hidden
    out_dtype = x.dtype if weight_offset else torch.result_type(weight, x)
    if out is None:
        out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    out = out.view(x2.shape)
    assert out.dtype == out_dtype and out.stride(-1) == 1
    res_out = None
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        assert r2.stride(-1) == 1 and r2.shape == x2.shape
        res_out = torch.empty_like(x2) if residual_out is None else residual_out.view(x2.shape)
        assert res_out.dtype == x.dtype and res_out.stride(-1) == 1
    if x2.shape[0] > 0:
        block = next_pow2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out if res_out is not None else out, eps,
            float(weight_offset), hidden, x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            BLOCK=block, HAS_RES=residual is not None, HAS_OFFSET=bool(weight_offset),
            num_warps=_warps(block),
        )
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


@triton.jit
def _cast_out(y, x_ptr, o_ptr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr):
    """y (float32, or already x's dtype) as o's elements: rounded to x's dtype first, as the
    unfused path's rotated tensor is; for an FP8 cache then saturated at +-FP8_MAX, as
    reshape_and_cache writes it."""
    return to_cache(y.to(x_ptr.dtype.element_ty), FP8, FP8_MAX, ROUND).to(o_ptr.dtype.element_ty)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, t, o_rows, t_mask, stride_xt, stride_ot, num_heads, cos, sin,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                  NEOX: tl.constexpr, COPY_REST: tl.constexpr, FP8: tl.constexpr,
                  FP8_MAX: tl.constexpr, ROUND: tl.constexpr):
    """Rotates heads [0, num_heads) of tokens t into rows o_rows of o: one [BLOCK_T, BLOCK_H,
    dims] tile."""
    h = tl.arange(0, BLOCK_H)
    th_mask = t_mask[:, None, None] & (h < num_heads)[None, :, None]
    x_base = x_ptr + t[:, None, None] * stride_xt + h[None, :, None] * HEAD_DIM
    o_base = o_ptr + o_rows[:, None, None] * stride_ot + h[None, :, None] * HEAD_DIM
    if NEOX:
        i = tl.arange(0, BLOCK_HALF)[None, None, :]
        mask = th_mask & (i < HALF)
        x1 = tl.load(x_base + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + HALF + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_base + i, _cast_out(x1 * cos - x2 * sin, x_ptr, o_ptr, FP8, FP8_MAX, ROUND),
                 mask=mask)
        tl.store(o_base + HALF + i,
                 _cast_out(x2 * cos + x1 * sin, x_ptr, o_ptr, FP8, FP8_MAX, ROUND), mask=mask)
    else:  # interleaved pairs: load the rotated span whole and split it into (even, odd)
        i = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
        mask = th_mask & (i < 2 * HALF)
        x = tl.load(x_base + i, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))
        o = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        o = tl.reshape(o, (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_base + i, _cast_out(o, x_ptr, o_ptr, FP8, FP8_MAX, ROUND), mask=mask)
    if COPY_REST:
        r = 2 * HALF + tl.arange(0, BLOCK_REST)[None, None, :]
        r_mask = th_mask & (r < HEAD_DIM)
        tl.store(o_base + r, _cast_out(tl.load(x_base + r, mask=r_mask), x_ptr, o_ptr, FP8,
                                       FP8_MAX, ROUND), mask=r_mask)


@triton.jit
def _tokens_cos_sin(pos_ptr, cache_ptr, num_tokens, stride_c, HALF: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """This program's tokens t (int64), their mask, and the cos and sin of their positions:
    [BLOCK_T, 1, BLOCK_HALF] each, float32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    t = t.to(tl.int64)
    pos = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cs_mask = t_mask[:, None] & (i < HALF)[None, :]
    cs = cache_ptr + pos[:, None] * stride_c + i[None, :]
    cos = tl.load(cs, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(cs + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    return t, t_mask, cos, sin


@triton.jit(**runtime_args("pos_ptr", "num_tokens"))
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cache_ptr, num_tokens, num_q_heads, num_k_heads,
    stride_qt, stride_kt, stride_qot, stride_kot, stride_c,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr, NEOX: tl.constexpr, COPY_REST: tl.constexpr,
):
    t, t_mask, cos, sin = _tokens_cos_sin(pos_ptr, cache_ptr, num_tokens, stride_c, HALF,
                                          BLOCK_T, BLOCK_HALF)
    _rotate_heads(q_ptr, qo_ptr, t, t, t_mask, stride_qt, stride_qot, num_q_heads, cos, sin,
                  HEAD_DIM, HALF, BLOCK_T, BLOCK_HQ, BLOCK_HALF, BLOCK_REST, NEOX, COPY_REST,
                  False, 0.0, False)
    _rotate_heads(k_ptr, ko_ptr, t, t, t_mask, stride_kt, stride_kot, num_k_heads, cos, sin,
                  HEAD_DIM, HALF, BLOCK_T, BLOCK_HK, BLOCK_HALF, BLOCK_REST, NEOX, COPY_REST,
                  False, 0.0, False)


@triton.jit(**runtime_args("pos_ptr", "slot_ptr", "num_tokens"))
def _rotary_cache_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, cache_ptr, num_tokens,
    num_q_heads, num_k_heads, stride_qt, stride_kt, stride_vt, stride_qot, stride_kcs,
    stride_vcs, stride_c,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, NEOX: tl.constexpr,
    COPY_REST: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr,
):
    """q rotated into qo; k rotated and v as it is into their cache slots (a slot < 0 is a
    padding token: not written). A cache slot is one row of stride_kcs / stride_vcs."""
    t, t_mask, cos, sin = _tokens_cos_sin(pos_ptr, cache_ptr, num_tokens, stride_c, HALF,
                                          BLOCK_T, BLOCK_HALF)
    _rotate_heads(q_ptr, qo_ptr, t, t, t_mask, stride_qt, stride_qot, num_q_heads, cos, sin,
                  HEAD_DIM, HALF, BLOCK_T, BLOCK_HQ, BLOCK_HALF, BLOCK_REST, NEOX, COPY_REST,
                  False, 0.0, False)
    slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
    s_mask = t_mask & (slot >= 0)
    _rotate_heads(k_ptr, kc_ptr, t, slot, s_mask, stride_kt, stride_kcs, num_k_heads, cos, sin,
                  HEAD_DIM, HALF, BLOCK_T, BLOCK_HK, BLOCK_HALF, BLOCK_REST, NEOX, COPY_REST,
                  FP8, FP8_MAX, ROUND)
    h = tl.arange(0, BLOCK_HK)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = s_mask[:, None, None] & (h < num_k_heads) & (d < HEAD_DIM)
    v = tl.load(v_ptr + t[:, None, None] * stride_vt + h * HEAD_DIM + d, mask=mask)
    tl.store(vc_ptr + slot[:, None, None] * stride_vcs + h * HEAD_DIM + d,
             _cast_out(v, v_ptr, vc_ptr, FP8, FP8_MAX, ROUND), mask=mask)


def _rotary_out(x: torch.Tensor, head_dim: int, inplace: bool,
                out: torch.Tensor | None) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % head_dim == 0
    if inplace:
        return x
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride(-1) == 1
    return out


def rotary_triton(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) float32
    head_dim: int,
    is_neox: bool,
    inplace: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first rotary_dim dims of each head; returns (query, key) rotated: new
    tensors (or `out`), or the inputs themselves rotated in place with inplace=True."""
    num_tokens = query.shape[0]
    assert cos_sin_cache.stride(-1) == 1 and positions.shape[0] == num_tokens
    assert key.shape[0] == num_tokens
    q_out, k_out = out if out is not None else (None, None)
    q_out = _rotary_out(query, head_dim, inplace, q_out)
    k_out = _rotary_out(key, head_dim, inplace, k_out)
    if num_tokens == 0:
        return q_out, k_out
    rot = cos_sin_cache.shape[1]
    num_q, num_k = query.shape[1] // head_dim, key.shape[1] // head_dim
    block_hq, block_hk, block_half = next_pow2(num_q), next_pow2(num_k), next_pow2(rot // 2)
    block_t = max(1, min(16, 8192 // (block_hq * block_half * 2)))
    _rotary_kernel[(triton.cdiv(num_tokens, block_t),)](
        positions.contiguous(), query, key, q_out, k_out, cos_sin_cache, num_tokens, num_q,
        num_k, query.stride(0), key.stride(0), q_out.stride(0), k_out.stride(0),
        cos_sin_cache.stride(0),
        HEAD_DIM=head_dim, HALF=rot // 2, BLOCK_T=block_t, BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        BLOCK_REST=next_pow2(max(head_dim - rot, 1)), NEOX=is_neox,
        COPY_REST=(not inplace) and rot < head_dim,
        num_warps=4 if block_t * block_hq * block_half <= 2048 else 8,
    )
    return q_out, k_out


def rotary_and_cache_triton(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) float32
    head_dim: int,
    is_neox: bool,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = skip (padding)
) -> torch.Tensor:
    """rotary_triton and reshape_and_cache_triton in one kernel: returns the query rotated (a
    new tensor); the key rotated and the value go straight to their cache slots, with the
    values, roundings and saturation of the two kernels one after the other."""
    num_tokens = query.shape[0]
    assert cos_sin_cache.stride(-1) == 1 and positions.shape[0] == num_tokens
    assert key.shape == value.shape and key.shape[0] == num_tokens
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    num_q, num_k = query.shape[1] // head_dim, key.shape[1] // head_dim
    assert value_cache.shape == key_cache.shape and key_cache.shape[2:] == (num_k, head_dim)
    assert slot_mapping.shape[0] >= num_tokens
    if not all(c.stride(3) == 1 and c.stride(2) == head_dim
               and c.stride(0) == c.shape[1] * c.stride(1) for c in (key_cache, value_cache)):
        # a cache whose slots are not evenly strided rows of heads: the two kernels
        q_out, k_out = rotary_triton(positions, query, key, cos_sin_cache, head_dim, is_neox)
        heads = (num_tokens, num_k, head_dim)
        reshape_and_cache_triton(k_out.view(heads), value.view(heads), key_cache, value_cache,
                                 slot_mapping)
        return q_out
    q_out = _rotary_out(query, head_dim, False, None)
    if num_tokens == 0:
        return q_out
    rot = cos_sin_cache.shape[1]
    block_hq, block_hk, block_half = next_pow2(num_q), next_pow2(num_k), next_pow2(rot // 2)
    block_t = max(1, min(16, 8192 // (block_hq * block_half * 2)))
    _rotary_cache_kernel[(triton.cdiv(num_tokens, block_t),)](
        positions.contiguous(), slot_mapping.contiguous(), query, key, value, q_out, key_cache,
        value_cache, cos_sin_cache, num_tokens, num_q, num_k, query.stride(0), key.stride(0),
        value.stride(0), q_out.stride(0), key_cache.stride(1), value_cache.stride(1),
        cos_sin_cache.stride(0),
        HEAD_DIM=head_dim, HALF=rot // 2, BLOCK_T=block_t, BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        BLOCK_REST=next_pow2(max(head_dim - rot, 1)), BLOCK_D=next_pow2(head_dim),
        NEOX=is_neox, COPY_REST=rot < head_dim, FP8=key_cache.dtype == FP8_DTYPE,
        FP8_MAX=FP8_MAX, ROUND=interpreting(),
        num_warps=4 if block_t * block_hq * block_half <= 2048 else 8,
    )
    return q_out


@triton.jit
def _act_and_mul_kernel(
    x_ptr, out_ptr, d, stride_x, stride_o,
    BLOCK: tl.constexpr, ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    # the reference rounds the activation to the input dtype before the multiply
    a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, act: int, out: torch.Tensor | None) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    out = out.view(x2.shape[0], d)
    assert out.dtype == x.dtype
    if out.numel() > 0:
        block = min(next_pow2(d), 2048)
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, ACT=act,
            num_warps=_warps(block) if block >= 512 else 2,
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:]"""
    return _act_and_mul(x, 0, out)


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "none",
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2d] -> gelu(x[..., :d]) * x[..., d:]; approximate is 'none' or 'tanh'."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act_and_mul(x, 1 if approximate == "none" else 2, out)
