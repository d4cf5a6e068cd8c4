"""The attention block: fused QKV, optional qk-norm (per head or across all heads), rope or
ALiBi, paged attention (its scale, soft cap and this layer's window), out proj."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from engine.distributed.parallel_state import get_tp_rank
from engine.layers.attention import PagedAttention, alibi_slopes
from engine.layers.attention_metadata import AttentionMetadata
from engine.layers.layernorm import ShardedRMSNorm
from engine.layers.linear import LinearMethod, QKVParallelLinear, RowParallelLinear
from engine.layers.rotary import get_rope
from engine.models.blocks.dims import Dims, make_norm
from engine.spec import Arch


class Attention(nn.Module):
    """Fused-QKV attention: GQA/MQA/MHA, biases, qk-norm, rope (any style, partial, scaled),
    ALiBi, the score scale and soft cap, layer `index`'s sliding window. Submodules carry the
    checkpoint's names."""

    def __init__(
        self, arch: Arch, dims: Dims, linear_method: LinearMethod | None, index: int = 0
    ) -> None:
        super().__init__()
        names, d = arch.checkpoint, dims
        qkv = QKVParallelLinear(
            d.hidden_size,
            d.head_dim,
            d.num_heads,
            d.num_kv_heads,
            bias=d.qkv_bias,
            linear_method=linear_method,
        )
        o_proj = RowParallelLinear(
            d.num_heads * d.head_dim, d.hidden_size, bias=d.o_bias, linear_method=linear_method
        )
        self.add_module("qkv_proj" if names.qkv_layout == "separate" else names.qkv, qkv)
        self.add_module(names.o_proj, o_proj)
        q_norm = k_norm = None
        self.qk_norm_per_head = arch.attention.qk_norm_scope == "per_head"
        if arch.attention.qk_norm and self.qk_norm_per_head:
            q_norm, k_norm = make_norm(arch, d, d.head_dim), make_norm(arch, d, d.head_dim)
        elif arch.attention.qk_norm:  # one RMS norm over all heads, split like the heads
            offset = float(arch.norm.kind == "rms_one_plus")
            q_norm = ShardedRMSNorm(
                d.num_heads * d.head_dim, qkv.q_size, d.norm_eps, weight_offset=offset
            )
            k_norm = ShardedRMSNorm(
                d.num_kv_heads * d.head_dim,
                qkv.kv_size,
                d.norm_eps,
                qkv.num_kv_head_replicas,
                offset,
            )
        if q_norm is not None:
            self.add_module(names.q_norm, q_norm)
            self.add_module(names.k_norm, k_norm)
        # plain references (a namespace is not registered, so no module gets two names)
        self.parts = SimpleNamespace(qkv=qkv, o_proj=o_proj, q_norm=q_norm, k_norm=k_norm)
        self.head_dim, self.q_size, self.kv_size = d.head_dim, qkv.q_size, qkv.kv_size
        self.rotary_emb = None
        if arch.position.kind == "rope":
            self.rotary_emb = get_rope(
                d.head_dim,
                d.rotary_dim,
                d.max_position,
                d.rope,
                is_neox_style=arch.position.rope_style == "neox",
            )
        slopes = None
        if arch.position.kind == "alibi":
            first = get_tp_rank() * qkv.num_heads
            slopes = alibi_slopes(d.num_heads)[first : first + qkv.num_heads]
        self.attn = PagedAttention(
            qkv.num_heads,
            d.head_dim,
            d.attn_scale,
            qkv.num_kv_heads,
            alibi_slopes=slopes,
            sliding_window=d.sliding_windows[index],
            logits_soft_cap=d.attn_soft_cap,
        )

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        p = self.parts
        q, k, v = p.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if p.q_norm is not None and self.qk_norm_per_head:  # [T * heads, head_dim]
            q = p.q_norm(q.reshape(-1, self.head_dim)).view(q.shape[0], -1)
            k = p.k_norm(k.reshape(-1, self.head_dim)).view(k.shape[0], -1)
        elif p.q_norm is not None:  # across heads: [T, heads * head_dim]
            q, k = p.q_norm(q), p.k_norm(k)
        # the rotary is applied in the attention's cache-write kernel
        return p.o_proj(self.attn(q, k, v, kv_cache, attn_metadata, self.rotary_emb, positions))
