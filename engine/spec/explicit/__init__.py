"""Explicit model files: `aphro new-model NAME --like FAMILY --explicit`.

An explicit file is written once and is the user's from then on (nothing regenerates it): a
complete `*ForCausalLM` in the shape vLLM and nano-vllm models have, its layers wired directly
from engine/layers in `__init__`, its own `forward` and a `load_weights` with a stacked-params
table. The family's spec decides what is wired, each number read straight from the HF config as
the spec maps it; structure an explicit file does not wire yet (`UNSUPPORTED`) is refused with
what to start from instead. The output is ruff-formatted at line length 100.

    code.py    layout helpers (calls, literals), config expressions, Names
    layers.py  the attention and MLP classes
    stack.py   the decoder layer, the model body, the *ForCausalLM class
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import AphroError
from engine.spec.explicit.code import LINE, Names
from engine.spec.explicit.layers import attention_class, mlp_class
from engine.spec.explicit.stack import causal_lm_class, layer_class, model_class
from engine.spec.project import Identity
from engine.spec.schema import ModelSpec

HEADER = "# Written by `aphro new-model {name} --like {family} --explicit`: yours to edit."

UNSUPPORTED = (
    (lambda s: s.arch.position.kind in ("learned", "alibi"), "position kind learned / alibi"),
    (lambda s: s.arch.mlp.kind == "moe", "mixture-of-experts MLPs"),
    (lambda s: s.arch.checkpoint.qkv_layout == "interleaved", "per-head interleaved qkv"),
    (lambda s: bool(s.arch.checkpoint.transpose), "transposed (Conv1D) checkpoint weights"),
    (lambda s: bool(s.arch.checkpoint.rename), "renamed checkpoint modules"),
    (lambda s: "." in s.arch.checkpoint.model, "a nested base-model prefix"),
    (lambda s: s.arch.embedding.norm, "a norm after the embedding"),
)


def unsupported(spec: ModelSpec) -> list[str]:
    return [what for test, what in UNSUPPORTED if test(spec)]


def imports(spec: ModelSpec) -> list[str]:
    a = spec.arch
    layers = {
        "activation": ["get_gated_act" if a.mlp.kind == "gated" else "get_act_fn"],
        "attention": ["PagedAttention"],
        "attention_metadata": ["AttentionMetadata"],
        "layernorm": ["LayerNorm" if a.norm.kind == "layer" else "RMSNorm"],
        "linear": sorted(["LinearMethod", "QKVParallelLinear", "RowParallelLinear",
                          "MergedColumnParallelLinear" if a.mlp.kind == "gated"
                          else "ColumnParallelLinear"]),
        "logits": ["LogitsProcessor"],
        "rotary": ["get_rope", "rope_params_from_config"] if a.position.kind == "rope" else [],
        "vocab_embedding": ["ParallelLMHead", "VocabParallelEmbedding"],
    }
    if a.attention.qk_norm and a.attention.qk_norm_scope == "all_heads":
        layers["layernorm"] = sorted({*layers["layernorm"], "ShardedRMSNorm"})
    lines = ["from __future__ import annotations", "", "from collections.abc import Iterable",
             "from typing import ClassVar", "", "import torch", "from torch import nn", "",
             "from engine.checkpoint.report import LoadTracker"]
    for module, names in layers.items():
        one = f"from engine.layers.{module} import {', '.join(names)}"
        if names and len(one) <= LINE:
            lines.append(one)
        elif names:
            lines += [f"from engine.layers.{module} import (", *(f"    {n}," for n in names), ")"]
    return [*lines, "from engine.models.weights import load_params"]


def render_explicit(spec: ModelSpec, names: Names) -> str:
    """The source of an explicit model file for `spec` (the family's), named by `names`."""
    gaps = unsupported(spec)
    if gaps:
        raise AphroError(
            f"--explicit from {names.family}: an explicit file does not wire "
            f"{', '.join(gaps)} yet; start from a family without them (--like llama) and add "
            "them by hand (docs/MODELS.md, Adding a mechanism), or use the spec route")
    doc = [
        f'"""{names.name}: an explicit model file, started from {names.family}.',
        "",
        "Nothing regenerates this file: edit it. It is wired as every engine model is",
        "(docs/MODELS.md): the step's tokens flattened into `input_ids` and `positions`,",
        "PagedAttention reading and writing the paged KV cache, tensor-parallel layers that cut",
        "their own shard of each checkpoint tensor, and `load_weights` mapping checkpoint names",
        "onto them. Module names are the checkpoint's, so `aphro parity-check` compares every",
        "sub-layer with HF's and names the first that diverges.",
        '"""']
    parts = [[HEADER.format(name=names.name, family=names.family), *doc, "",
              *imports(spec)], attention_class(spec, names), mlp_class(spec, names),
             layer_class(spec, names), model_class(spec, names), causal_lm_class(spec, names)]
    return "\n\n\n".join("\n".join(p) for p in parts) + "\n"


# -- writing -----------------------------------------------------------------------------------
REGISTRY_FILE = "_explicit.py"
RESERVED = ("blocks", "registry", "weights", "contract", "_generated", "_explicit")
SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def render_registry(entries: dict[str, str]) -> str:
    from engine.spec.explicit.code import dict_lines

    lines = [
        "# Explicit model files: `aphro new-model NAME --like FAMILY --explicit` adds one",
        '"""HF architecture -> "module:Class" of every explicit (hand-written) model (merged by',
        'engine/models/registry.py). Edit it by hand to add or remove a model file you wrote."""',
        "",
        *dict_lines(0, "EXPLICIT_MODELS: dict[str, str] = ", dict(sorted(entries.items()))),
    ]
    return "\n".join(lines) + "\n"


def write_explicit(name: str, like: str, specs_dirs: list[Path], models_dir: Path,
                   package: str | None, architecture: str | None = None,
                   model_type: str | None = None, force: bool = False
                   ) -> tuple[Path, Path, dict[str, str], Identity]:
    """Write models_dir/<name>.py from the family `like` (found in the first of specs_dirs
    that has it) and register it in models_dir/_explicit.py, its module imported as
    `package`.<name> (bare <name> without a package). Returns (model file, registry file,
    {architecture: "module:Class"}, the Identity chosen)."""
    from engine.models.registry import read_registry_file
    from engine.spec.loader import load_spec
    from engine.spec.project import ensure_package, family_spec, new_identity

    if not name.isidentifier() or name in RESERVED or name.startswith("_"):
        raise AphroError(f"{name!r}: the model's module name must be a Python identifier not "
                         f"starting with _ and not one of {', '.join(RESERVED)}")
    base = load_spec(family_spec(like, specs_dirs))
    ident = new_identity(name, base.model.model_type, base.model.name, architecture, model_type,
                         setting="the class's hf_model_type in the model file")
    prefix = ident.architecture
    for suffix in SUFFIXES:
        prefix = prefix.removesuffix(suffix)
    names = Names(prefix or ident.architecture, ident.architecture, name, base.model.name,
                  ident.model_type)
    text = render_explicit(base, names)
    models_dir = Path(models_dir)
    target = models_dir / f"{name}.py"
    if target.exists() and not force:
        raise AphroError(f"{target} exists: an explicit file is never overwritten (it is yours); "
                         "move it away, or pass --force to start it over")
    ensure_package(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    module = f"{package}.{name}" if package else name
    new = {ident.architecture: f"{module}:{ident.architecture}"}
    registry = models_dir / REGISTRY_FILE
    entries = {a: t for a, t in read_registry_file(registry).items()
               if a not in new and t.partition(":")[0] != module}
    registry.write_text(render_registry({**entries, **new}), encoding="utf-8")
    return target, registry, new, ident
