"""The model of a spec file, built when it is loaded: what `aphro new-model` would generate
(a `DecoderOnlyForCausalLM` subclass holding the spec's `Arch` and its `packed_modules`), without
writing a module. It serves the "spec:PATH" targets of the registry (a spec registered with
`aphro register path/to/model.toml`); tensor-parallel workers get the target, not the class."""

from __future__ import annotations

from pathlib import Path

from engine.models.blocks import DecoderOnlyForCausalLM, packed_modules_for
from engine.spec.loader import load_spec


def model_class_from_spec(path: str | Path) -> type[DecoderOnlyForCausalLM]:
    """The model class of the spec at `path`, named after its first architecture."""
    spec = load_spec(path)
    name = spec.model.architectures[0]
    return type(name, (DecoderOnlyForCausalLM,), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": spec.model.description or f"{spec.model.name}, from the spec {path}.",
        "arch": spec.arch, "packed_modules": packed_modules_for(spec.arch)})
