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
    """Decoder layer `index`. Sequential: x + attn, then + mlp, with norms where
    `layer.norm_position` puts them: before each sub-layer (pre), on each sub-layer's output
    (post), or both (sandwich); each output times `residual_multiplier` if set. Parallel (pre
    only): x + attn(n1(x)) + mlp(n2(x)), or one shared norm. The residual stream is carried
    beside the hidden state so the next norm adds it in one fused pass."""

    def __init__(
        self, arch: Arch, dims: Dims, linear_method: LinearMethod | None, index: int = 0
    ) -> None:
        super().__init__()
        names, where = arch.checkpoint, arch.layer.norm_position
        self.parallel = arch.layer.residual == "parallel"
        self.multiplier = dims.residual_multiplier

        def norm(name: str, wanted: bool) -> nn.Module | None:
            if not wanted:
                return None
            module = make_norm(arch, dims, dims.hidden_size)
            self.add_module(name, module)
            return module

        in_norm = norm(names.input_norm, where != "post")
        attn = Attention(arch, dims, linear_method, index)
        self.add_module(names.attention, attn)
        # pre: post_attention_norm is the MLP's input norm; post / sandwich: attention's output
        post_attn = norm(names.post_attention_norm, where != "pre")
        mlp_in = None
        if where == "pre" and not arch.layer.shared_norm:
            mlp_in = norm(names.post_attention_norm, True)
        elif where == "sandwich":
            mlp_in = norm(names.pre_mlp_norm, True)
        mlp = MLP_KINDS[arch.mlp.kind](arch, dims, linear_method)
        self.add_module(names.mlp, mlp)
        post_mlp = norm(names.post_mlp_norm, where != "pre")
        self.parts = SimpleNamespace(
            in_norm=in_norm,
            attn=attn,
            post_attn=post_attn,
            mlp_in=mlp_in,
            mlp=mlp,
            post_mlp=post_mlp,
        )

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
        p, m = self.parts, self.multiplier
        normed, residual = _add_norm(p.in_norm, hidden, residual)
        attn_out = p.attn(positions, normed, kv_cache, attn_metadata)
        if p.post_attn is not None:
            attn_out = p.post_attn(attn_out)
        if self.parallel:
            mlp_in = normed if p.mlp_in is None else p.mlp_in(residual)
            update = attn_out + p.mlp(mlp_in)
            return (update if m is None else update * m), residual
        if m is not None:
            attn_out = attn_out * m
        normed, residual = _add_norm(p.mlp_in, attn_out, residual)
        update = p.mlp(normed)
        if p.post_mlp is not None:
            update = p.post_mlp(update)
        return (update if m is None else update * m), residual


def _add_norm(
    norm: nn.Module | None, hidden: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(hidden + residual), hidden + residual), the add fused into the norm; without a
    norm the sum itself is the sub-layer's input."""
    if residual is None:
        return (hidden if norm is None else norm(hidden)), hidden
    if norm is None:
        summed = hidden + residual
        return summed, summed
    return norm(hidden, residual)


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
        layers = nn.ModuleList(DecoderLayer(arch, d, linear_method, i) for i in range(d.num_layers))
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
        self.embed_multiplier = d.embedding_multiplier

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
        if self.embed_multiplier is not None:
            hidden = hidden * self.embed_multiplier
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
