"""HF `architectures` name -> "module:Class", imported lazily (importing never starts CUDA).

Out-of-tree models register with `register_model(arch, "pkg.module:Class")` or through the
`aphro.models` entry-point group (name = architecture, value = "pkg.module:Class").
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from engine.errors import ModelNotSupportedError
from engine.models._generated import GENERATED_MODELS

# every in-tree model is generated from model_specs/ by `aphro new-model`
_MODELS: dict[str, str] = dict(GENERATED_MODELS)
_OUT_OF_TREE: dict[str, str | type] = {}


def register_model(architecture: str, target: str | type) -> None:
    """Register (or override) the class serving HF architecture `architecture`."""
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"register_model({architecture!r}, {target!r}): expected 'module:Class'")
    _OUT_OF_TREE[architecture] = target


def _entry_point_models() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="aphro.models")}


def supported_architectures() -> list[str]:
    return sorted({**_MODELS, **_entry_point_models(), **_OUT_OF_TREE})


def resolve(architecture: str) -> str | type:
    target = (_OUT_OF_TREE.get(architecture) or _entry_point_models().get(architecture)
              or _MODELS.get(architecture))
    if target is None:
        raise ModelNotSupportedError(
            f"architecture {architecture!r} is not supported. Supported: "
            f"{', '.join(supported_architectures())}. Add it with `aphro new-model SPEC` or "
            "engine.register_model().")
    return target


def load_model_class(architectures: list[str]) -> type:
    """The class for the first supported name in a config's `architectures`. An import error in
    the model's module is raised as the ImportError it is."""
    if not architectures:
        raise ModelNotSupportedError("config.json has no 'architectures' list")
    for arch in architectures:
        try:
            target = resolve(arch)
        except ModelNotSupportedError:
            continue
        if isinstance(target, type):
            return target
        module_name, _, cls_name = target.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, cls_name)
        except AttributeError:
            raise ImportError(f"{module_name} has no class {cls_name} (registered for {arch})")
    return resolve(architectures[0])  # raises with the list of supported names
