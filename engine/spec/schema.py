"""Model specs: one TOML file per architecture family (model_specs/*.toml, docs/SPEC.md).

The dataclasses below are the schema. Each TOML table is one dataclass and each key one field:
its type is the annotation, its allowed values a `Literal`, its default the field default, and a
field without a default must be given. engine/spec/loader.py reads a spec file into them.
Generated models hold the same dataclasses as constants (`arch = Arch(...)`) and
engine/models/blocks/ builds the network from them, so a spec, a generated file and the running
model cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class ConfigField:
    """Where an engine value comes from: HF config attribute `key` (absent or null in the config
    -> `default`), or the constant `value`. In TOML a bare string is `{ key = "..." }`."""

    key: str | None = None
    default: Any = None
    value: Any = None


ConfigSource = str | ConfigField | None


@dataclass(frozen=True)
class ConfigMap:
    """[config]: engine field <- HF config key. Fields without a default must be mapped;
    unmapped optional ones take the fallback noted beside them."""

    hidden_size: ConfigSource
    num_layers: ConfigSource
    num_heads: ConfigSource
    vocab_size: ConfigSource
    norm_eps: ConfigSource
    activation: ConfigSource  # HF activation name: silu, gelu, gelu_new, relu, ...
    num_kv_heads: ConfigSource = None  # attention kind gqa only
    head_dim: ConfigSource = None  # -> hidden_size / num_heads
    intermediate_size: ConfigSource = None  # -> 4 * hidden_size
    max_position: ConfigSource = None  # needed by rope and learned positions
    partial_rotary_factor: ConfigSource = None  # -> the rope parameters' value, else 1.0
    sliding_window: ConfigSource = None  # -> no window
    tie_word_embeddings: ConfigSource = None  # -> false
    qkv_bias: ConfigSource = None  # -> false
    o_bias: ConfigSource = None  # -> false
    mlp_bias: ConfigSource = None  # -> false
    num_experts: ConfigSource = None  # mlp kind moe
    experts_per_token: ConfigSource = None  # mlp kind moe
    shared_expert_intermediate_size: ConfigSource = None  # moe: a shared expert beside them
    rotary_dim: ConfigSource = None  # rotated dims per head, a number (GPT-J) -> partial factor
    layer_types: ConfigSource = None  # per layer "sliding_attention" | "full_attention"
    attention_multiplier: ConfigSource = None  # the attention-score scale itself (Granite)
    query_pre_attn_scalar: ConfigSource = None  # scale = value ** -0.5 (Gemma 2)
    attn_logit_softcap: ConfigSource = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: ConfigSource = None  # logits -> cap * tanh(logits / cap)
    embedding_multiplier: ConfigSource = None  # embeddings * value (Granite)
    residual_multiplier: ConfigSource = None  # each sub-layer's output * value (Granite)
    logit_scale: ConfigSource = None  # logits * value (Cohere)
    logit_divisor: ConfigSource = None  # logits / value (Granite's logits_scaling)
    lm_head_bias: ConfigSource = None  # the output head has a bias (GPT-J) -> false


@dataclass(frozen=True)
class AttentionSpec:
    """[attention]"""

    kind: Literal["mha", "mqa", "gqa"]  # kv heads: mha = heads, mqa = 1, gqa = from config
    qk_norm: bool = False  # norm of q and k before the rotary embedding (Qwen3, OLMo 2)
    # per_head: one head_dim-wide norm shared by every head (Qwen3); all_heads: one norm over
    # all heads' q (and k) at once, a weight per element (OLMo 2)
    qk_norm_scope: Literal["per_head", "all_heads"] = "per_head"


@dataclass(frozen=True)
class PositionSpec:
    """[position]"""

    kind: Literal["rope", "alibi", "learned", "none"]
    rope_style: Literal["neox", "gptj"] = "neox"  # neox rotates halves, gptj adjacent pairs
    offset: int = 0  # learned: table row = position + offset (OPT: 2)


@dataclass(frozen=True)
class NormSpec:
    """[norm]"""

    kind: Literal["rms", "rms_one_plus", "layer"]  # rms_one_plus: Gemma's x * (1 + w)
    bias: bool = True  # layer only


@dataclass(frozen=True)
class MlpSpec:
    """[mlp]"""

    kind: Literal["gated", "plain", "moe"]  # gated: down(act(gate) * up); plain: fc_out(act(fc_in))
    renormalize: bool = True  # moe: the top-k routing weights are renormalised to sum to 1
    shared_gate: Literal["none", "sigmoid"] = "none"  # shared expert * sigmoid(gate(x))


@dataclass(frozen=True)
class LayerSpec:
    """[layer]"""

    residual: Literal["sequential", "parallel"] = "sequential"  # parallel: x + attn + mlp
    shared_norm: bool = False  # parallel: attention and MLP read the same norm (Falcon)
    # pre: norm before each sub-layer; post: a norm on each sub-layer's output before it joins
    # the residual (OLMo 2); sandwich: both (Gemma 2)
    norm_position: Literal["pre", "post", "sandwich"] = "pre"


@dataclass(frozen=True)
class EmbeddingSpec:
    """[embedding]"""

    scale: Literal["none", "sqrt_hidden"] = "none"
    norm: bool = False  # a norm right after the embedding (Bloom)


@dataclass(frozen=True)
class CheckpointNames:
    """[checkpoint]: module names as the HF checkpoint spells them; they become our attribute
    names, so checkpoint tensors load without renaming."""

    model: str = "model"  # base model prefix, dotted for nesting (model.decoder)
    embed_tokens: str = "embed_tokens"
    embed_positions: str = "embed_positions"
    embed_norm: str = "embed_layernorm"
    layers: str = "layers"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"  # pre: before the MLP; else after attn
    pre_mlp_norm: str = "pre_feedforward_layernorm"  # sandwich: before the MLP
    post_mlp_norm: str = "post_feedforward_layernorm"  # post, sandwich: after the MLP
    attention: str = "self_attn"
    qkv: str | tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    qkv_layout: Literal["separate", "fused", "interleaved"] = "separate"
    o_proj: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    mlp: str = "mlp"
    gate_up: str | tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    fc_in: str = "fc1"
    fc_out: str = "fc2"
    router: str = "gate"
    experts: str = "experts"
    expert_gate: str = "w1"
    expert_up: str = "w3"
    expert_down: str = "w2"
    shared_expert: str = "shared_expert"  # moe: the shared expert (a gated MLP)
    shared_expert_gate: str = "shared_expert_gate"  # moe: its gate (shared_gate sigmoid)
    transpose: tuple[str, ...] = ()  # modules whose 2-D weights are stored [in, out] (Conv1D)
    rename: dict[str, str] | None = None  # checkpoint name piece -> ours
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq",)  # skip tensors whose name contains one


@dataclass(frozen=True)
class Arch:
    """Everything a generated model declares; the runtime numbers come from the HF config."""

    config: ConfigMap
    attention: AttentionSpec
    position: PositionSpec
    norm: NormSpec
    mlp: MlpSpec
    layer: LayerSpec = LayerSpec()
    embedding: EmbeddingSpec = EmbeddingSpec()
    checkpoint: CheckpointNames = CheckpointNames()


@dataclass(frozen=True)
class ModelInfo:
    """[model]"""

    name: str  # module name: engine/models/<name>.py
    architectures: tuple[str, ...]  # HF class names served; the first names the class
    model_type: str  # HF model_type of the tiny test config
    description: str = ""  # one line: the generated module's docstring


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    model: ModelInfo
    arch: Arch
    tiny: dict  # [tiny]: HF config overrides of the tiny test checkpoint


ARCH_TABLES = tuple(f.name for f in dataclasses.fields(Arch))
TABLES = ("model", *ARCH_TABLES, "tiny")
TABLE_CLASSES = {
    "model": ModelInfo,
    "config": ConfigMap,
    "attention": AttentionSpec,
    "position": PositionSpec,
    "norm": NormSpec,
    "mlp": MlpSpec,
    "layer": LayerSpec,
    "embedding": EmbeddingSpec,
    "checkpoint": CheckpointNames,
}
REQUIRED_TABLES = ("model", "config", "attention", "position", "norm", "mlp", "tiny")


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


__all__ = [
    "ARCH_TABLES",
    "REQUIRED_TABLES",
    "TABLES",
    "TABLE_CLASSES",
    "Arch",
    "AttentionSpec",
    "CheckpointNames",
    "ConfigField",
    "ConfigMap",
    "ConfigSource",
    "EmbeddingSpec",
    "LayerSpec",
    "MlpSpec",
    "ModelInfo",
    "ModelSpec",
    "NormSpec",
    "PositionSpec",
    "is_required",
]
