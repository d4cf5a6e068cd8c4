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


def resolve_class_path(architectures: list[str]) -> str | type:
    """What serves the first supported name in a config's `architectures`: "module:Class", or
    the class registered as an object (tensor-parallel workers receive it pickled, by name)."""
    if not architectures:
        raise ModelNotSupportedError("config.json has no 'architectures' list")
    for arch in architectures:
        try:
            return resolve(arch)
        except ModelNotSupportedError:
            continue
    resolve(architectures[0])  # raises with the list of supported names
    raise AssertionError("unreachable")


def load_class(target: str | type) -> type:
    """Import "module:Class" (or take the class given). An import error in the model's module
    is raised as the ImportError it is."""
    if isinstance(target, type):
        return target
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    try:
        for part in cls_name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"{module_name} has no class {cls_name}") from None
    return obj


def load_model_class(architectures: list[str]) -> type:
    """The class for the first supported name in a config's `architectures`."""
    return load_class(resolve_class_path(architectures))
