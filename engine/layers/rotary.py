"""Rotary position embedding with the HF scaling schemes, as a cos/sin table indexed by position.

LongRoPE (Phi-3) is the one scheme whose frequencies depend on more than the position: HF uses
the long factors for every token of a forward pass that reaches past the original length. Here
a decode token uses them from that position on, and the tokens of a prompt longer than it use
them at every position (AttentionMetadata.long_rope marks those; the table has a second, all-long
half for them), so a long prompt, chunked or not, matches HF's forward over the whole prompt.

`rope_params` is HF's `config.rope_parameters` (transformers >= 5) or the older `rope_theta` +
`rope_scaling` pair folded into one dict: {"rope_type": ..., "rope_theta": ..., scaling keys}.
"""

from __future__ import annotations

import json
import math
import weakref

import torch
from torch import nn

from engine.errors import ConfigError
from kernels import ops


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, out)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(base: float, rotary_dim: int, p: dict) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    old_len = p.get("original_max_position_embeddings")
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor,
                                                                            p["mscale_all_dim"])
        else:
            attn_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _default_inv_freq(base, rotary_dim)
    keep = 1 - ramp  # 1 = keep the original frequency, 0 = interpolate
    return extrapolation / factor * (1 - keep) + extrapolation * keep, attn_factor


def _longrope(base: float, rotary_dim: int, max_position: int, p: dict
              ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """LongRoPE (Phi-3 128k): per-frequency factors, `short_factor` for positions below
    original_max_position_embeddings and `long_factor` from there on, and one attention factor
    on cos/sin. Returns (short inv_freq, long inv_freq, attention factor, original length)."""
    original = p.get("original_max_position_embeddings")
    if not original:
        raise ConfigError("rope_type 'longrope' needs original_max_position_embeddings")
    factor = p.get("factor") or max_position / original
    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        attn_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    default = _default_inv_freq(base, rotary_dim)
    factors = [torch.tensor(p[k], dtype=torch.float64) for k in ("short_factor", "long_factor")]
    if any(f.shape != default.shape for f in factors):
        raise ConfigError(f"longrope short_factor / long_factor need {rotary_dim // 2} entries "
                          f"each (rotary_dim {rotary_dim} / 2)")
    return default / factors[0], default / factors[1], attn_factor, int(original)


def long_rope_from(hf_config) -> int | None:
    """The original context length of a LongRoPE model (a prompt longer than it takes the long
    factors at every position), else None."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    params = rope_params_from_config(text)
    if params["rope_type"] != "longrope":
        return None
    return int(params.get("original_max_position_embeddings") or 0) or None


def rope_params_from_config(config) -> dict:
    """HF config -> one rope dict, whichever transformers version wrote the config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    original = getattr(config, "original_max_position_embeddings", None)
    if original and params["rope_type"] == "longrope":  # Phi-3 keeps it beside rope_scaling
        params.setdefault("original_max_position_embeddings", original)
    return params


# one cos/sin table per distinct rotary, shared by every layer that has it (a 128k-context
# LongRoPE table is ~100 MB), freed with the last module holding it
_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _cos_sin_table(rotary_dim: int, max_position: int, rope_params: dict) -> torch.Tensor:
    """[rows, rotary_dim] float32 cos | sin: rows 0 .. max_position - 1 by position; LongRoPE
    also has rows max_position .. 2 * max_position - 1, long at every position."""
    base = float(rope_params.get("rope_theta", 10000.0))
    kind = rope_params.get("rope_type", "default")
    inv_freq = _default_inv_freq(base, rotary_dim)
    t_scale, mscale, long_freq, long_from = 1.0, 1.0, None, max_position
    if kind == "default":
        pass
    elif kind == "linear":
        t_scale = 1.0 / rope_params["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_params)
    elif kind == "yarn":
        inv_freq, mscale = _yarn_inv_freq(base, rotary_dim, rope_params)
    elif kind == "dynamic":
        # vLLM's choice: the NTK-scaled base for the longest supported context, fixed.
        # (HF rescales per forward once the sequence passes the original length.)
        factor = rope_params["factor"]
        old_len = rope_params.get("original_max_position_embeddings") or max_position
        new_len = int(old_len * factor)
        base = base * ((factor * new_len / old_len) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        inv_freq = _default_inv_freq(base, rotary_dim)
        max_position = max(max_position, new_len)
    elif kind == "longrope":
        inv_freq, long_freq, mscale, long_from = _longrope(base, rotary_dim, max_position,
                                                           rope_params)
    else:
        raise ConfigError(f"rope_type {kind!r} is not supported; one of default, linear, "
                          "dynamic, yarn, llama3, longrope")
    t = torch.arange(max_position, dtype=torch.float64) * t_scale
    freqs = torch.outer(t, inv_freq.to(torch.float32).double())
    if long_freq is not None:  # longrope: other frequencies past the original length
        long_all = torch.outer(t, long_freq.to(torch.float32).double())
        freqs[long_from:] = long_all[long_from:]
        freqs = torch.cat((freqs, long_all))
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1).float()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, rope_params: dict,
                 is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox_style
        key = (rotary_dim, max_position, json.dumps(rope_params, sort_keys=True, default=str),
               str(torch.get_default_device()))
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = _cos_sin_table(rotary_dim, max_position, rope_params)
        # longrope: rows [max_position, 2 * max_position) are long at every position
        self.long_rows = max_position if rope_params.get("rope_type") == "longrope" else 0
        self.register_buffer("cos_sin_cache", table, persistent=False)  # [rows, rotary_dim]

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                long_rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, H * head_size]; key [T, KVH * head_size]; long_rope [T]
        bool or None (AttentionMetadata.long_rope: tokens of a prompt past LongRoPE's original
        length, which take the long factors at every position; ignored by other schemes)."""
        return ops.rotary_embedding(self._table_rows(positions, long_rope), query, key,
                                    self.cos_sin_cache, self.head_size, self.is_neox_style)

    def rotate_and_cache(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         slot_mapping: torch.Tensor,
                         long_rope: torch.Tensor | None = None) -> torch.Tensor:
        """forward, then the rotated key and the value written to their cache slots (one
        kernel on CUDA: engine.layers.attention.Attention calls this when given the rotary).
        Returns the rotated query."""
        return ops.rotary_and_cache(self._table_rows(positions, long_rope), query, key, value,
                                    self.cos_sin_cache, self.head_size, self.is_neox_style,
                                    key_cache, value_cache, slot_mapping)

    def _table_rows(self, positions: torch.Tensor,
                    long_rope: torch.Tensor | None) -> torch.Tensor:
        """The cos/sin table row of each token: its position, or past the short rows for
        LongRoPE's long tokens."""
        if long_rope is not None and self.long_rows:
            return positions + long_rope.to(positions.dtype) * self.long_rows
        return positions


def get_rope(head_size: int, rotary_dim: int, max_position: int, rope_params: dict,
             is_neox_style: bool = True) -> RotaryEmbedding:
    return RotaryEmbedding(head_size, rotary_dim, max_position, rope_params, is_neox_style)
