"""The shared blocks every generated model is wired from, driven by an `engine.spec.Arch`.

A generated `engine/models/<family>.py` only subclasses `DecoderOnlyForCausalLM` with its `arch`
constant and `packed_modules`. Modules carry the checkpoint's names (`Arch.checkpoint`), so HF
tensors load under their own names and hooks find the same module paths on both sides. The
numbers (widths, heads, eps, biases, ...) are read from the HF config through `Arch.config`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.distributed import REPLICATED, ShardSpec, get_tp_rank
from engine.errors import ConfigError
from engine.layers.activation import get_act_fn, get_gated_act
from engine.layers.attention import PagedAttention, alibi_slopes
from engine.layers.layernorm import LayerNorm, RMSNorm
from engine.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from engine.layers.logits import LogitsProcessor
from engine.layers.moe import FusedMoE
from engine.layers.rotary import get_rope, rope_params_from_config
from engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from engine.loader import LoadTracker
from engine.models.weights import load_params
from engine.spec import Arch, ConfigField, ConfigSource

_MISSING: Any = object()


def _read(config, source: ConfigSource, field: str, fallback: Any = _MISSING) -> Any:
    """The value `source` names in the HF config; `fallback` when unmapped, absent or null."""
    if isinstance(source, str):
        source = ConfigField(key=source)
    value = None
    if source is not None:
        value = source.value
        if value is None:
            value = getattr(config, source.key, None)
        if value is None:
            value = source.default
    if value is None:
        if fallback is _MISSING:
            key = source.key if source is not None else field
            raise ConfigError(f"the model config has no {key!r} (the spec reads {field} from it)")
        value = fallback
    return value


@dataclass(frozen=True)
class Dims:
    """The numbers of one checkpoint, read from its HF config through the spec's [config]."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    norm_eps: float
    activation: str
    rotary_dim: int
    rope: dict
    sliding_window: int | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    num_experts: int
    experts_per_token: int

    @classmethod
    def from_hf(cls, config, arch: Arch) -> Dims:
        c = arch.config

        def read(name: str, fallback: Any = _MISSING) -> Any:
            return _read(config, getattr(c, name), name, fallback)

        hidden, heads = int(read("hidden_size")), int(read("num_heads"))
        kv_heads = {"mha": heads, "mqa": 1}.get(arch.attention.kind)
        if kv_heads is None:
            kv_heads = int(read("num_kv_heads", heads))
        if heads <= 0 or hidden % heads and read("head_dim", None) is None:
            raise ConfigError(f"hidden_size={hidden} is not a multiple of num_heads={heads}")
        head_dim = int(read("head_dim", hidden // heads))
        rope = rope_params_from_config(config) if arch.position.kind == "rope" else {}
        partial = float(read("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)))
        moe = arch.mlp.kind == "moe"
        dims = cls(
            hidden_size=hidden,
            num_layers=int(read("num_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(read("intermediate_size", 4 * hidden)),
            vocab_size=int(read("vocab_size")),
            max_position=int(read("max_position", 2048)),
            norm_eps=float(read("norm_eps")),
            activation=str(read("activation")),
            rotary_dim=int(head_dim * partial),
            rope=rope,
            sliding_window=read("sliding_window", None),
            tie_word_embeddings=bool(read("tie_word_embeddings", False)),
            qkv_bias=bool(read("qkv_bias", False)),
            o_bias=bool(read("o_bias", False)),
            mlp_bias=bool(read("mlp_bias", False)),
            num_experts=int(read("num_experts")) if moe else 0,
            experts_per_token=int(read("experts_per_token")) if moe else 0,
        )
        if heads % kv_heads:
            raise ConfigError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
        return dims


def make_norm(arch: Arch, dims: Dims, size: int) -> nn.Module:
    if arch.norm.kind == "layer":
        return LayerNorm(size, dims.norm_eps, bias=arch.norm.bias)
    return RMSNorm(size, dims.norm_eps, weight_offset=float(arch.norm.kind == "rms_one_plus"))


class Attention(nn.Module):
    """Fused-QKV attention: GQA/MQA/MHA, biases, qk-norm, rope (any style, partial, scaled),
    ALiBi, sliding window. Submodules carry the checkpoint's names."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
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
        if arch.attention.qk_norm:
            q_norm, k_norm = make_norm(arch, d, d.head_dim), make_norm(arch, d, d.head_dim)
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
            d.head_dim**-0.5,
            qkv.num_kv_heads,
            alibi_slopes=slopes,
            sliding_window=d.sliding_window,
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
        if p.q_norm is not None:  # per head: [T * heads, head_dim]
            q = p.q_norm(q.reshape(-1, self.head_dim)).view(q.shape[0], -1)
            k = p.k_norm(k.reshape(-1, self.head_dim)).view(k.shape[0], -1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return p.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class GatedMLP(nn.Module):
    """down(act(gate) * up), gate and up in one column-parallel matmul (SwiGLU, GeGLU)."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, h, i = arch.checkpoint, dims.hidden_size, dims.intermediate_size
        gate_up = MergedColumnParallelLinear(
            h, [i, i], bias=dims.mlp_bias, linear_method=linear_method
        )
        down = RowParallelLinear(i, h, bias=dims.mlp_bias, linear_method=linear_method)
        self.add_module(
            "gate_up_proj" if isinstance(names.gate_up, tuple) else names.gate_up, gate_up
        )
        self.add_module(names.down, down)
        self.parts = SimpleNamespace(gate_up=gate_up, down=down)
        self.act_fn = get_gated_act(dims.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.down(self.act_fn(self.parts.gate_up(x)))


class PlainMLP(nn.Module):
    """fc_out(act(fc_in(x))) (GELU, ReLU, ...)."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, h, i = arch.checkpoint, dims.hidden_size, dims.intermediate_size
        fc_in = ColumnParallelLinear(h, i, bias=dims.mlp_bias, linear_method=linear_method)
        fc_out = RowParallelLinear(i, h, bias=dims.mlp_bias, linear_method=linear_method)
        self.add_module(names.fc_in, fc_in)
        self.add_module(names.fc_out, fc_out)
        self.parts = SimpleNamespace(fc_in=fc_in, fc_out=fc_out)
        self.act_fn = get_act_fn(dims.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.fc_out(self.act_fn(self.parts.fc_in(x)))


class MoEMLP(nn.Module):
    """Router (replicated linear) + fused experts, top-k softmax routing (Mixtral)."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, d = arch.checkpoint, dims
        router = ReplicatedLinear(
            d.hidden_size, d.num_experts, bias=False, linear_method=linear_method
        )
        experts = FusedMoE(
            d.num_experts,
            d.experts_per_token,
            d.hidden_size,
            d.intermediate_size,
            d.activation,
            arch.mlp.renormalize,
        )
        self.add_module(names.router, router)
        self.add_module(names.experts, experts)
        self.parts = SimpleNamespace(router=router, experts=experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.experts(x, self.parts.router(x))


MLP_KINDS: dict[str, type[nn.Module]] = {"gated": GatedMLP, "plain": PlainMLP, "moe": MoEMLP}


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


def packed_modules_for(arch: Arch) -> dict[str, tuple[str, int | str]]:
    """Checkpoint piece -> (our fused module, shard id), for separate q/k/v and gate/up."""
    names, packed = arch.checkpoint, {}
    if names.qkv_layout == "separate":
        packed.update(zip(names.qkv, (("qkv_proj", s) for s in "qkv")))
    if arch.mlp.kind == "gated" and isinstance(names.gate_up, tuple):
        packed.update(zip(names.gate_up, (("gate_up_proj", 0), ("gate_up_proj", 1))))
    return packed


def _attach(parent: nn.Module, dotted: str, module: nn.Module) -> None:
    """parent.<a>.<b> = module, creating empty containers for the outer names."""
    *outer, last = dotted.split(".")
    for name in outer:
        if not hasattr(parent, name):
            parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    parent.add_module(last, module)


class DecoderOnlyForCausalLM(nn.Module):
    """A decoder-only causal LM described by `arch`. Subclasses set `arch` and `packed_modules`
    (engine/models/<family>.py, generated from model_specs/<family>.toml)."""

    arch: ClassVar[Arch]
    packed_modules: ClassVar[dict[str, tuple[str, int | str]]] = {}

    def __init__(self, config, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        arch, names = self.arch, self.arch.checkpoint
        self.config = config
        self.dims = dims = Dims.from_hf(config, arch)
        model = DecoderModel(arch, dims, linear_method)
        _attach(self, names.model, model)
        head = ParallelLMHead(dims.vocab_size, dims.hidden_size)
        self.add_module(names.lm_head, head)
        self.tie_word_embeddings = dims.tie_word_embeddings
        if self.tie_word_embeddings:
            head.weight = model.parts.embed.weight
        self.parts = SimpleNamespace(model=model, lm_head=head)
        self.logits_processor = LogitsProcessor(dims.vocab_size)
        self.lm_head_weight_name = f"{names.lm_head}.weight"
        self.embed_weight_name = f"{names.model}.{names.embed_tokens}.weight"
        # the KV cache contract: layers, this rank's KV heads, head size
        self.num_layers = dims.num_layers
        self.num_kv_heads = model.parts.layers[0].parts.attn.attn.num_kv_heads
        self.head_dim = dims.head_dim
        self._expert_re = None
        if arch.mlp.kind == "moe":
            n, esc = names, re.escape
            which = "|".join(esc(w) for w in (n.expert_gate, n.expert_up, n.expert_down))
            self._expert_re = re.compile(
                rf"^(.*\.{esc(n.mlp)}\.{esc(n.experts)})\.(\d+)\.({which})\.weight$"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.parts.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.parts.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadTracker:
        shards = {
            f"{name}.{param}": ids
            for name, module in self.named_modules()
            if isinstance(module, FusedMoE)
            for param, ids in module.expected_shards().items()
        }
        return load_params(
            self,
            weights,
            self.packed_modules,
            skip=self.arch.checkpoint.ignore,
            transform=self.checkpoint_transform,
            shards=shards,
        )

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> tuple | None:
        """One checkpoint tensor -> (our name, tensor[, shard id]): renames, Conv1D transposes,
        per-head interleaved qkv -> [q; k; v], per-expert MoE weights."""
        names = self.arch.checkpoint
        for src, dst in (names.rename or {}).items():
            if f".{src}." in f".{name}":
                name = f".{name}".replace(f".{src}.", f".{dst}.", 1)[1:]
        if tensor.dim() == 2 and any(f".{m}.weight" in f".{name}" for m in names.transpose):
            tensor = tensor.t()
        if names.qkv_layout == "interleaved" and f".{names.attention}.{names.qkv}." in name:
            tensor = _deinterleave_qkv(tensor, self.dims.num_heads)
        if self._expert_re is not None:
            m = self._expert_re.match(name)
            if m is not None:
                prefix, expert, which = m.groups()
                canonical = {
                    names.expert_gate: "w1",
                    names.expert_up: "w3",
                    names.expert_down: "w2",
                }[which]
                param = "w2_weight" if canonical == "w2" else "w13_weight"
                return f"{prefix}.{param}", tensor, (int(expert), canonical)
        return name, tensor


def _deinterleave_qkv(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[heads * (q, k, v) * head_dim, ...] (per-head interleaved) -> [q; k; v]. A tensor of the
    wrong size is passed on unchanged for the loader to report."""
    if tensor.shape[0] % (3 * num_heads):
        return tensor
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(tensor.shape)
