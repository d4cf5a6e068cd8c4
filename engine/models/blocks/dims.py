"""The numbers of one checkpoint (`Dims`), read from its HF config through the spec's [config]
(`Arch.config`), and `make_norm`, the norm every block builds from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.errors import ConfigError
from engine.layers.layernorm import LayerNorm, RMSNorm
from engine.layers.rotary import rope_params_from_config
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
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    num_experts: int
    experts_per_token: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    sliding_windows: tuple[int | None, ...]  # per layer: the window, or None for full attention
    attn_scale: float  # multiplies q.k
    attn_soft_cap: float | None
    final_soft_cap: float | None
    embedding_multiplier: float | None
    residual_multiplier: float | None
    logit_scale: float  # logits * logit_scale / logit_divisor
    lm_head_bias: bool

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
        rotary_dim = int(read("rotary_dim", None) or head_dim * partial)
        moe = arch.mlp.kind == "moe"
        num_layers = int(read("num_layers"))
        window = read("sliding_window", None)
        scale = read("attention_multiplier", None)
        if scale is None:
            scale = float(read("query_pre_attn_scalar", head_dim)) ** -0.5
        optional = {k: read(k, None) for k in _OPTIONAL_FLOATS}
        for key, value in optional.items():
            if value is not None and not float(value) > 0:
                raise ConfigError(f"{key} = {value!r}: must be a positive number")
        dims = cls(
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(read("intermediate_size", 4 * hidden)),
            vocab_size=int(read("vocab_size")),
            max_position=int(read("max_position", 2048)),
            norm_eps=float(read("norm_eps")),
            activation=str(read("activation")),
            rotary_dim=rotary_dim,
            rope=rope,
            tie_word_embeddings=bool(read("tie_word_embeddings", False)),
            qkv_bias=bool(read("qkv_bias", False)),
            o_bias=bool(read("o_bias", False)),
            mlp_bias=bool(read("mlp_bias", False)),
            num_experts=int(read("num_experts")) if moe else 0,
            experts_per_token=int(read("experts_per_token")) if moe else 0,
            shared_expert_intermediate_size=int(read("shared_expert_intermediate_size", 0)),
            sliding_windows=_layer_windows(read("layer_types", None), window, num_layers),
            attn_scale=float(scale),
            attn_soft_cap=_float_or_none(optional["attn_logit_softcap"]),
            final_soft_cap=_float_or_none(optional["final_logit_softcap"]),
            embedding_multiplier=_float_or_none(optional["embedding_multiplier"]),
            residual_multiplier=_float_or_none(optional["residual_multiplier"]),
            logit_scale=float(optional["logit_scale"] or 1.0)
            / float(optional["logit_divisor"] or 1.0),
            lm_head_bias=bool(read("lm_head_bias", False)),
        )
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ConfigError(
                f"rotary_dim={rotary_dim}: must be even and at most head_dim={head_dim}"
            )
        if heads % kv_heads:
            raise ConfigError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
        return dims


_OPTIONAL_FLOATS = (
    "attn_logit_softcap",
    "final_logit_softcap",
    "embedding_multiplier",
    "residual_multiplier",
    "logit_scale",
    "logit_divisor",
)
LAYER_TYPES = ("sliding_attention", "full_attention")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_windows(layer_types: Any, window: int | None, num_layers: int) -> tuple:
    """Each layer's window: the sliding window on "sliding_attention" layers, none on the
    others; without layer_types the window (if any) on every layer."""
    if layer_types is None:
        return (window,) * num_layers
    types = list(layer_types)
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(
            f"layer_types={types!r}: expected {num_layers} entries, each one of "
            f"{', '.join(LAYER_TYPES)}"
        )
    return tuple(window if t == "sliding_attention" else None for t in types)


def make_norm(arch: Arch, dims: Dims, size: int) -> nn.Module:
    if arch.norm.kind == "layer":
        return LayerNorm(size, dims.norm_eps, bias=arch.norm.bias)
    return RMSNorm(size, dims.norm_eps, weight_offset=float(arch.norm.kind == "rms_one_plus"))
