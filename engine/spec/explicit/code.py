"""Code-writing helpers of the explicit tier: calls and literals laid out as ruff format
lays them out (line length 100), the Python that reads a spec's [config] source from an HF
config, and the names an explicit file's classes get."""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.errors import AphroError
from engine.spec.schema import ConfigField, ModelSpec

LINE = 100


def call(pad: int, lead: str, func: str, args: list[str], tail: str = "") -> list[str]:
    """`lead + func(args) + tail` laid out as ruff format does: one line, else the arguments
    on one indented line, else one per line with a trailing comma."""
    ind = " " * pad
    one = f"{ind}{lead}{func}({', '.join(args)}){tail}"
    if len(one) <= LINE:
        return [one]
    inner = f"{ind}    {', '.join(args)}"
    if len(inner) <= LINE:
        return [f"{ind}{lead}{func}(", inner, f"{ind}){tail}"]
    return [f"{ind}{lead}{func}(", *(f"{ind}    {a}," for a in args), f"{ind}){tail}"]


def literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        body = ", ".join(literal(v) for v in value)
        if isinstance(value, list):
            return f"[{body}]"
        return f"({body},)" if len(value) == 1 else f"({body})"
    return repr(value)


def dict_lines(pad: int, lead: str, items: dict, tail: str = "") -> list[str]:
    ind = " " * pad
    one = f"{ind}{lead}{literal(items)}{tail}"
    if len(one) <= LINE or not items:
        return [one]
    lines = [f"{ind}{lead}{{"]
    for k, v in items.items():
        if isinstance(v, dict) and len(f"{ind}    {json.dumps(k)}: {literal(v)},") > LINE:
            lines += dict_lines(pad + 4, f"{json.dumps(k)}: ", v, ",")
        else:
            lines.append(f"{ind}    {json.dumps(k)}: {literal(v)},")
    return [*lines, f"{ind}}}{tail}"]


def config_expr(source, fallback: str | None = None) -> str:
    """Python reading `source` (a spec [config] source) from `config`; `fallback` where the
    spec leaves it unmapped, the config lacks it or has it null."""
    if source is None:
        if fallback is None:
            raise AphroError("internal: a required config value has no source")
        return fallback
    if isinstance(source, str):
        source = ConfigField(key=source)
    if source.value is not None:
        return literal(source.value)
    if source.default is not None:
        return f"getattr(config, {json.dumps(source.key)}, {literal(source.default)})"
    if fallback is None:
        return f"config.{source.key}" if source.key.isidentifier() else \
            f"getattr(config, {json.dumps(source.key)})"
    if fallback in ("None", "False", "True"):
        return f"getattr(config, {json.dumps(source.key)}, {fallback})"
    return f"getattr(config, {json.dumps(source.key)}, None) or {fallback}"


def paren(expr: str) -> str:
    """`expr` safe inside a larger expression."""
    return f"({expr})" if " or " in expr else expr


# what an explicit file does not wire yet: (test on the spec, what it is)
@dataclass(frozen=True)
class Names:
    prefix: str  # class name prefix: <Prefix>Attention, <Prefix>Model, ...
    arch: str  # the *ForCausalLM class
    name: str  # module name
    family: str
    model_type: str


def norm_expr(spec: ModelSpec, size: str, eps: str) -> str:
    kind = spec.arch.norm.kind
    if kind == "layer":
        return f"LayerNorm({size}, {eps}" + (")" if spec.arch.norm.bias else ", bias=False)")
    return f"RMSNorm({size}, {eps}" + (", weight_offset=1.0)" if kind == "rms_one_plus" else ")")


ARG_TYPES = {"positions": "torch.Tensor", "hidden_states": "torch.Tensor",
          "kv_cache": "torch.Tensor", "attn_metadata": "AttentionMetadata",
          "residual": "torch.Tensor | None", "input_ids": "torch.Tensor",
          "kv_caches": "list[torch.Tensor]"}


def forward_sig(params: list[str], returns: str) -> list[str]:
    typed = ", ".join(f"{p}: {ARG_TYPES[p]}" for p in params)
    one = f"    def forward(self, {typed}) -> {returns}:"
    if len(one) <= LINE:
        return [one]
    return ["    def forward(", "        self,", *(f"        {p}: {ARG_TYPES[p]}," for p in params),
            f"    ) -> {returns}:"]
