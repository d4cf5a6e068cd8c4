"""Llama (1/2/3, and Mistral-style GQA) built from engine/layers. Attribute names are the HF
checkpoint's, so load_weights only declares the fusions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.activation import get_gated_act
from engine.layers.attention import PagedAttention
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import (LinearMethod, MergedColumnParallelLinear, QKVParallelLinear,
                                  RowParallelLinear)
from engine.layers.logits import LogitsProcessor
from engine.layers.rotary import get_rope, rope_params_from_config
from engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from engine.models.weights import load_params


class LlamaMLP(nn.Module):
    def __init__(self, config, linear_method: LinearMethod | None) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias=bias,
                                                       linear_method=linear_method)
        self.down_proj = RowParallelLinear(i, h, bias=bias, linear_method=linear_method)
        self.act_fn = get_gated_act(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, linear_method: LinearMethod | None) -> None:
        super().__init__()
        h = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or h // total_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(h, self.head_dim, total_heads, total_kv, bias=bias,
                                          linear_method=linear_method)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, h, bias=bias,
                                        linear_method=linear_method)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings,
                                   rope_params_from_config(config), is_neox_style=True)
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   self.qkv_proj.num_kv_heads,
                                   sliding_window=getattr(config, "sliding_window", None))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, linear_method: LinearMethod | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, linear_method)
        self.mlp = LlamaMLP(config, linear_method)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, linear_method: LinearMethod | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, linear_method)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name piece -> (our fused parameter piece, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, linear_method)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_processor = LogitsProcessor(config.vocab_size)
        # the KV cache contract: layers, this rank's KV heads, head size
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = self.model.layers[0].self_attn.attn.num_kv_heads
        self.head_dim = self.model.layers[0].self_attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        return load_params(self, weights, self.packed_modules,
                           skip=("rotary_emb.inv_freq",))
