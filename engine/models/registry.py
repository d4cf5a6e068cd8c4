"""HF `architectures` name -> "module:Class", imported lazily (importing never starts CUDA).

Where a name is looked up, first to last (the first that has it serves it):

    register_model      `register_model(arch, "pkg.module:Class" or a class)` in this process
    user registry       `aphro register` (engine.models.records: a file, with the proof)
    plugin entry point  the `aphro.models` entry-point group (name = architecture,
                        value = "pkg.module:Class") of an installed package
    in-tree             engine/models/_generated.py (generated from model_specs/) and the
                        in-tree explicit models

A target is "module:Class" or "spec:PATH" (a spec file, built into a model class when loaded:
engine.models.from_spec). A user registry that cannot be read is skipped here, so in-tree
models keep working; `aphro models` and `aphro register` report it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from engine.errors import ModelNotSupportedError, RegistryFileError
from engine.models._generated import GENERATED_MODELS
from engine.models.records import user_records
from engine.models.sources import SPEC_TARGET

# every in-tree model is generated from model_specs/ by `aphro new-model`
_MODELS: dict[str, str] = dict(GENERATED_MODELS)
# register_model calls of this process: the one mutable registry state (a process-wide table by
# design, as a plugin system is); `registered` undoes its own change
_OUT_OF_TREE: dict[str, str | type] = {}

ORIGINS = ("register_model", "user registry", "plugin entry point", "in-tree")


@dataclass(frozen=True)
class Resolution:
    architecture: str
    target: str | type
    origin: str  # one of ORIGINS


def register_model(architecture: str, target: str | type) -> None:
    """Register (or override) the class serving HF architecture `architecture`."""
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"register_model({architecture!r}, {target!r}): expected 'module:Class'")
    _OUT_OF_TREE[architecture] = target


@contextlib.contextmanager
def registered(architecture: str, target: str | type) -> Iterator[None]:
    """register_model for the length of the block, then what was registered before again."""
    before = _OUT_OF_TREE.get(architecture)
    register_model(architecture, target)
    try:
        yield
    finally:
        if before is None:
            _OUT_OF_TREE.pop(architecture, None)
        else:
            _OUT_OF_TREE[architecture] = before


def spec_target(path: str | Path) -> str:
    """The target of a model built from a spec file."""
    return f"{SPEC_TARGET}{Path(path).resolve()}"


def target_name(target: str | type) -> str:
    """A target as text: "module:Class" for a class registered as an object."""
    if isinstance(target, type):
        return f"{target.__module__}:{target.__qualname__}"
    return target


def _entry_point_models() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="aphro.models")}


def _user_models() -> dict[str, str]:
    try:
        return {arch: rec.target for arch, rec in user_records().items()}
    except RegistryFileError:
        return {}


def _layers() -> list[tuple[str, dict]]:
    return list(zip(ORIGINS, (_OUT_OF_TREE, _user_models(), _entry_point_models(), _MODELS)))


def lookup_all(architecture: str) -> list[Resolution]:
    """Every registration of `architecture`, the one that serves it first."""
    return [Resolution(architecture, table[architecture], origin)
            for origin, table in _layers() if architecture in table]


def lookup(architecture: str) -> Resolution | None:
    found = lookup_all(architecture)
    return found[0] if found else None


def supported_architectures() -> list[str]:
    return sorted({arch for _, table in _layers() for arch in table})


def resolve(architecture: str) -> str | type:
    found = lookup(architecture)
    if found is None:
        unread = ""
        try:
            user_records()
        except RegistryFileError as e:
            unread = f" (the user registry was skipped: {e})"
        raise ModelNotSupportedError(
            f"architecture {architecture!r} is not supported. Supported: "
            f"{', '.join(supported_architectures())}. Add it with `aphro new-model SPEC` or "
            f"`aphro register`{unread}.")
    return found.target


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
    """Import "module:Class" (or take the class given; or build the model of "spec:PATH"). An
    import error in the model's module is raised as the ImportError it is."""
    if isinstance(target, type):
        return target
    if target.startswith(SPEC_TARGET):
        from engine.models.from_spec import model_class_from_spec

        return model_class_from_spec(target[len(SPEC_TARGET):])
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

