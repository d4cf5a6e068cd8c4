"""References for the small fused kernels: add+RMSNorm, rotary embedding, gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,  # 1.0 for Gemma's (1 + w)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (norm(x + residual) * (w + offset), x + residual) — the second is None without
    a residual. Math in float32, as HF does."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        out = (h * (weight.float() + weight_offset)).to(x.dtype)
    else:
        out = weight * h.to(x.dtype)
    return out, residual


def rotary_ref(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) float32
    head_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim dims of each head. neox: halves; gptj: interleaved pairs."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rot/2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, head_dim)
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        c, s = cos[:, None, :], sin[:, None, :]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return torch.cat((rot.to(x.dtype), rest), dim=-1).view(t, -1)

    return rotate(query), rotate(key)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:]"""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """[..., 2d] -> gelu(x[..., :d]) * x[..., d:]; approximate is 'none' or 'tanh'."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up
