"""Reading a model spec: TOML text -> the engine/spec/schema.py dataclasses, validated.

Every problem (bad TOML, an unknown or missing table or key, a value of the wrong type or outside
its `Literal`, a rule across keys) is a one-line SpecError `file: table.key: problem` that says
what was expected (docs/SPEC.md). `tiny_hf_config` turns a loaded spec's [tiny] table into the
HF config of its tiny test checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from engine.errors import AphroError, SpecError
from engine.spec.schema import (
    ARCH_TABLES,
    REQUIRED_TABLES,
    TABLE_CLASSES,
    TABLES,
    Arch,
    ConfigField,
    ConfigSource,
    ModelInfo,
    ModelSpec,
    is_required,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Where:
    """Builds the one-line error `file: table.key: problem` (the key's dotted TOML path; no
    square brackets, which rich would take for markup)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, table: str | None, key: str | None, problem: str) -> SpecError:
        where = f"{table}.{key}" if table and key else f"table {table}" if table else key
        return SpecError(f"{self.path}: {where}: {problem}")


def _type_name(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if typing.get_origin(tp) is tuple:
        return "an array of strings"
    if typing.get_origin(tp) is dict:
        return "a table of strings"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return str(tp)


def _describe(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def _convert(value: Any, tp: Any, where: _Where, table: str, key: str) -> Any:
    """TOML value -> the field's type, or SpecError naming the key and what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if ConfigField in args:
            return _config_source(value, where, table, key)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], where, table, key)
        if isinstance(value, str):
            return _convert(value, str, where, table, key)
        if isinstance(value, list):
            return _convert(value, tuple[str, ...], where, table, key)
        raise where.error(
            table, key, f"expected a string or an array of strings, got {_describe(value)}"
        )
    if origin is Literal:
        if not isinstance(value, str):
            raise where.error(table, key, f"expected {_type_name(tp)}, got {_describe(value)}")
        if value not in args:
            close = difflib.get_close_matches(value, args, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise where.error(table, key, f"{value!r} is not one of {', '.join(args)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise where.error(table, key, f"expected {_type_name(tp)}, got {_describe(value)}")
        return tuple(value)
    if origin is dict:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
        )
        if not ok:
            raise where.error(table, key, f"expected {_type_name(tp)}, got {_describe(value)}")
        return dict(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok or (tp is str and not value):
        got = "an empty string" if value == "" else _describe(value)
        raise where.error(table, key, f"expected {_type_name(tp)}, got {got}")
    return value


def _config_source(value: Any, where: _Where, table: str, key: str) -> ConfigSource:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"key", "default", "value"})
        if unknown:
            raise where.error(
                table,
                f"{key}.{unknown[0]}",
                "unknown key; an inline config table has key, default or value",
            )
        if ("key" in value) == ("value" in value):
            raise where.error(
                table,
                key,
                "expected exactly one of `key` (an HF config key) or `value` (a constant)",
            )
        if "key" in value and not (isinstance(value["key"], str) and value["key"]):
            raise where.error(
                table, f"{key}.key", f"expected a string, got {_describe(value['key'])}"
            )
        if "value" in value and "default" in value:
            raise where.error(table, f"{key}.default", "a constant `value` takes no default")
        return ConfigField(
            key=value.get("key"), default=value.get("default"), value=value.get("value")
        )
    raise where.error(
        table,
        key,
        "expected an HF config key (a string) or an inline table "
        f"{{ key = ..., default = ... }} / {{ value = ... }}, got "
        f"{_describe(value)}",
    )


def _build(cls: type, raw: Any, where: _Where, table: str) -> Any:
    if not isinstance(raw, dict):
        raise where.error(table, None, f"expected a table, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise where.error(table, key, f"unknown key; {hint}known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], where, table, name)
        elif is_required(f):
            expected = _type_name(hints[name])
            if ConfigField in typing.get_args(hints[name]):
                expected = "the HF config key it is read from"
            raise where.error(table, name, f"missing; expected {expected}")
    return cls(**kwargs)


def _check_arch(model: ModelInfo, a: Arch, where: _Where) -> None:
    """Rules that involve more than one key."""
    c, ck = a.config, a.checkpoint
    if not model.name.isidentifier() or keyword.iskeyword(model.name) or model.name.startswith("_"):
        raise where.error(
            "model", "name", f"expected a Python module name (like my_model), got {model.name!r}"
        )
    for arch in model.architectures:
        if not arch.isidentifier():
            raise where.error("model", "architectures", f"{arch!r} is not a class name")
    if a.attention.kind == "gqa" and c.num_kv_heads is None:
        raise where.error("config", "num_kv_heads", "missing; attention kind gqa reads it")
    if a.position.kind in ("rope", "learned") and c.max_position is None:
        raise where.error(
            "config", "max_position", f"missing; position kind {a.position.kind} needs it"
        )
    if a.position.offset and a.position.kind != "learned":
        raise where.error("position", "offset", "only position kind learned takes an offset")
    if a.mlp.kind == "moe":
        for key in ("num_experts", "experts_per_token"):
            if getattr(c, key) is None:
                raise where.error("config", key, "missing; mlp kind moe reads it")
    if a.layer.shared_norm and a.layer.residual != "parallel":
        raise where.error("layer", "shared_norm", "only residual = parallel can share a norm")
    if a.norm.kind != "layer" and not a.norm.bias:
        raise where.error("norm", "bias", "only norm kind layer has a bias")
    if ck.qkv_layout == "separate":
        if not (isinstance(ck.qkv, tuple) and len(ck.qkv) == 3):
            raise where.error(
                "checkpoint",
                "qkv",
                'qkv_layout separate needs three names ["q_proj", "k_proj", "v_proj"]',
            )
    elif not isinstance(ck.qkv, str):
        raise where.error(
            "checkpoint",
            "qkv",
            f'qkv_layout {ck.qkv_layout} needs one name (like "query_key_value")',
        )
    if ck.qkv_layout == "interleaved" and a.attention.kind != "mha":
        raise where.error(
            "checkpoint", "qkv_layout", "interleaved (q, k, v per head) needs attention kind mha"
        )
    if isinstance(ck.gate_up, tuple) and len(ck.gate_up) != 2:
        raise where.error(
            "checkpoint", "gate_up", 'expected two names ["gate_proj", "up_proj"] or one fused name'
        )
    if a.position.kind == "alibi" and c.partial_rotary_factor is not None:
        raise where.error("config", "partial_rotary_factor", "only position kind rope rotates")
    _check_mechanisms(a, where)


def _check_mechanisms(a: Arch, where: _Where) -> None:
    """Rules of the keys that reach scales, soft caps, per-layer windows, norm placement,
    qk-norm scope and shared experts."""
    c = a.config
    if c.rotary_dim is not None:
        if a.position.kind != "rope":
            raise where.error("config", "rotary_dim", "only position kind rope rotates")
        if c.partial_rotary_factor is not None:
            raise where.error(
                "config",
                "rotary_dim",
                "give rotary_dim (a number of dims) or partial_rotary_factor (a share), not both",
            )
    if c.attention_multiplier is not None and c.query_pre_attn_scalar is not None:
        raise where.error(
            "config",
            "query_pre_attn_scalar",
            "the attention scale is attention_multiplier or query_pre_attn_scalar ** -0.5, "
            "not both",
        )
    if c.layer_types is not None and c.sliding_window is None:
        raise where.error(
            "config", "layer_types", "names the layers that use sliding_window: map that too"
        )
    if a.attention.qk_norm_scope != "per_head" and not a.attention.qk_norm:
        raise where.error("attention", "qk_norm_scope", "only with qk_norm = true")
    if a.attention.qk_norm_scope == "all_heads" and a.norm.kind == "layer":
        raise where.error("attention", "qk_norm_scope", "all_heads needs an RMS norm kind")
    if a.layer.norm_position != "pre" and a.layer.residual != "sequential":
        raise where.error(
            "layer",
            "norm_position",
            f"{a.layer.norm_position!r} needs residual = sequential (parallel layers are pre-norm)",
        )
    if c.shared_expert_intermediate_size is not None and a.mlp.kind != "moe":
        raise where.error(
            "config", "shared_expert_intermediate_size", "a shared expert needs mlp kind moe"
        )
    if a.mlp.shared_gate != "none" and c.shared_expert_intermediate_size is None:
        raise where.error(
            "mlp",
            "shared_gate",
            "gates a shared expert: map config.shared_expert_intermediate_size too",
        )


def parse_spec(text: str, path: str | Path) -> ModelSpec:
    """Validate spec `text` (read from `path`, which only names it in errors)."""
    path = Path(path)
    where = _Where(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    for table in raw:
        if table not in TABLES:
            close = difflib.get_close_matches(table, TABLES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise where.error(table, None, f"unknown table; {hint}known: {', '.join(TABLES)}")
    for table in REQUIRED_TABLES:
        if table not in raw:
            raise where.error(table, None, "missing table")
    if not isinstance(raw["tiny"], dict):
        raise where.error("tiny", None, f"expected a table, got {_describe(raw['tiny'])}")
    model = _build(ModelInfo, raw["model"], where, "model")
    if not model.architectures:
        raise where.error("model", "architectures", "expected at least one HF class name")
    parts = {t: _build(TABLE_CLASSES[t], raw[t], where, t) for t in ARCH_TABLES if t in raw}
    arch = Arch(**parts)
    _check_arch(model, arch, where)
    return ModelSpec(path=path, model=model, arch=arch, tiny=dict(raw["tiny"]))


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate one spec file; any problem is a one-line SpecError naming the file
    and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from None
    return parse_spec(text, path)


def build_hf_config(model_type: str | None, architecture: str, fields: dict, where: str):
    """AutoConfig.for_model(model_type, architectures=[architecture], **fields); a model_type
    the installed transformers does not know is an AphroError that starts with `where` (the
    key that declared it) and names close types."""
    from transformers import AutoConfig

    from engine.spec.project import check_model_type

    check_model_type(str(model_type), where)
    try:
        return AutoConfig.for_model(model_type, architectures=[architecture], **fields)
    except (ValueError, TypeError) as e:
        raise AphroError(f"{where} {model_type!r}: transformers cannot build its config from "
                         f"the tiny fields: {e}") from None


def tiny_hf_config(spec: ModelSpec):
    """The HF config of the spec's tiny test checkpoint: the model_type's defaults, then the
    [tiny] overrides, with `architectures` = the spec's first. A model_type transformers does
    not know is a SpecError naming model.model_type."""
    try:
        return build_hf_config(spec.model.model_type, spec.model.architectures[0], spec.tiny,
                               f"{spec.path}: model.model_type")
    except SpecError:
        raise
    except AphroError as e:
        raise SpecError(str(e)) from None
