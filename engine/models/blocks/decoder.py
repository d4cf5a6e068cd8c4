"""The decoder stack: one decoder layer (norms, attention, MLP, residuals), learned absolute
positions, and the model body (embeddings, layers, final norm)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention_metadata import AttentionMetadata
from engine.layers.linear import LinearMethod
from engine.layers.sharding import REPLICATED, ShardSpec
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.blocks.attention import Attention
from engine.models.blocks.dims import Dims, make_norm
from engine.models.blocks.mlp import MLP_KINDS
from engine.spec import Arch


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer, sequential (x + attn, then + mlp) or parallel (x + attn(n1(x)) +
    mlp(n2(x)), or one shared norm). The residual stream is carried beside the hidden state so
    the next norm adds it in one fused pass."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names = arch.checkpoint
        self.parallel = arch.layer.residual == "parallel"
        in_norm = make_norm(arch, dims, dims.hidden_size)
        attn = Attention(arch, dims, linear_method)
        post_norm = None
        if not arch.layer.shared_norm:
            post_norm = make_norm(arch, dims, dims.hidden_size)
        mlp = MLP_KINDS[arch.mlp.kind](arch, dims, linear_method)
        self.add_module(names.input_norm, in_norm)
        self.add_module(names.attention, attn)
        if post_norm is not None:
            self.add_module(names.post_attention_norm, post_norm)
        self.add_module(names.mlp, mlp)
        self.parts = SimpleNamespace(in_norm=in_norm, attn=attn, post_norm=post_norm, mlp=mlp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's update, the residual stream before it); their sum is the
        layer's output."""
        p = self.parts
        if residual is None:
            residual, normed = hidden, p.in_norm(hidden)
        else:
            normed, residual = p.in_norm(hidden, residual)
        attn_out = p.attn(positions, normed, kv_cache, attn_metadata)
        if self.parallel:
            mlp_in = normed if p.post_norm is None else p.post_norm(residual)
            return attn_out + p.mlp(mlp_in), residual
        normed, residual = p.post_norm(attn_out, residual)
        return p.mlp(normed), residual


class LearnedPositions(nn.Module):
    """Absolute position table (replicated); row = position + offset (OPT keeps 2 spare rows)."""

    def __init__(self, num_positions: int, dim: int, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(num_positions + offset, dim), requires_grad=False)

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        return REPLICATED if param_name == "weight" else None

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)


class DecoderModel(nn.Module):
    """Embeddings (optionally scaled, plus learned positions, plus a norm), the layers and the
    final norm."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, d = arch.checkpoint, dims
        embed = VocabParallelEmbedding(d.vocab_size, d.hidden_size)
        self.add_module(names.embed_tokens, embed)
        positions = embed_norm = None
        if arch.position.kind == "learned":
            positions = LearnedPositions(d.max_position, d.hidden_size, arch.position.offset)
            self.add_module(names.embed_positions, positions)
        if arch.embedding.norm:
            embed_norm = make_norm(arch, d, d.hidden_size)
            self.add_module(names.embed_norm, embed_norm)
        layers = nn.ModuleList(DecoderLayer(arch, d, linear_method) for _ in range(d.num_layers))
        self.add_module(names.layers, layers)
        final_norm = make_norm(arch, d, d.hidden_size)
        self.add_module(names.final_norm, final_norm)
        self.parts = SimpleNamespace(
            embed=embed,
            positions=positions,
            embed_norm=embed_norm,
            layers=layers,
            final_norm=final_norm,
        )
        self.embed_scale = None
        if arch.embedding.scale == "sqrt_hidden":  # rounded to the model dtype, as HF does
            dtype = torch.get_default_dtype()
            self.embed_scale = torch.tensor(d.hidden_size**0.5, dtype=dtype, device="cpu").item()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        p = self.parts
        hidden = p.embed(input_ids)  # [T, hidden]
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        if p.positions is not None:
            hidden = hidden + p.positions(positions)
        if p.embed_norm is not None:
            hidden = p.embed_norm(hidden)
        residual = None
        for layer, kv_cache in zip(p.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        if residual is None:
            return p.final_norm(hidden)
        return p.final_norm(hidden, residual)[0]
