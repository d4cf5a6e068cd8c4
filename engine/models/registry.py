"""HF `architectures` name -> "module:Class", imported lazily (importing never starts CUDA).

Where a name is looked up, first to last (the first that has it serves it):

    register_model      `register_model(arch, "pkg.module:Class" or a class)` in this process
    user registry       `aphro register` (engine.models.records: a file, with the proof)
    plugin entry point  the `aphro.models` entry-point group (name = architecture,
                        value = "pkg.module:Class") of an installed package
    project             the project in the current directory: aphro_models/_generated.py and
                        _explicit.py, written by `aphro new-model` outside the checkout (the
                        folder is put on sys.path to import them)
    in-tree             engine/models/_generated.py (generated from model_specs/) and
                        engine/models/_explicit.py (explicit model files)

A target is "module:Class" or "spec:PATH" (a spec file, built into a model class when loaded:
engine.models.from_spec). Every class, whichever tier it comes from, is checked against the
model contract (engine/models/contract.py) when it is registered as a class or loaded. A user
registry that cannot be read is skipped here, so in-tree models keep working; `aphro models`
and `aphro register` report it.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from engine.errors import ModelContractError, ModelNotSupportedError, RegistryFileError
from engine.models.records import user_records
from engine.models.sources import REPO, SPEC_TARGET

IN_TREE = Path(__file__).resolve().parent
PROJECT_PACKAGE = "aphro_models"  # a project's model package (outside the checkout)
REGISTRY_FILES = {"_generated.py": "GENERATED_MODELS", "_explicit.py": "EXPLICIT_MODELS"}

# register_model calls of this process: the one mutable registry state (a process-wide table by
# design, as a plugin system is); `registered` undoes its own change
_OUT_OF_TREE: dict[str, str | type] = {}

ORIGINS = ("register_model", "user registry", "plugin entry point", "project", "in-tree")


@dataclass(frozen=True)
class Resolution:
    architecture: str
    target: str | type
    origin: str  # one of ORIGINS


def register_model(architecture: str, target: str | type) -> None:
    """Register (or override) the class serving HF architecture `architecture`. A class is
    checked against the model contract now, a "module:Class" string when it is loaded."""
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError(f"register_model({architecture!r}, {target!r}): "
                             "expected 'module:Class'")
    else:
        from engine.models.contract import check_model_class

        check_model_class(target)
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


def read_registry_file(path: Path) -> dict[str, str]:
    """The {architecture: "module:Class"} table of a registry file (empty when there is none)."""
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = set(REGISTRY_FILES.values())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        if value is not None and any(isinstance(t, ast.Name) and t.id in names for t in targets):
            return dict(ast.literal_eval(value))
    return {}


def project_root(cwd: Path | None = None) -> Path | None:
    """The project in the current directory: a folder holding aphro_models/ or model_specs/
    (not the engine's own checkout, whose models are in-tree)."""
    cwd = (cwd or Path.cwd()).resolve()
    if cwd == IN_TREE.parents[1]:
        return None
    if (cwd / PROJECT_PACKAGE / "__init__.py").is_file() or (cwd / "model_specs").is_dir():
        return cwd
    return None


def _registry_tables(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for file in REGISTRY_FILES:
        out.update(read_registry_file(folder / file))
    return out


def _entry_point_models() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="aphro.models")}


def _user_models() -> dict[str, str]:
    try:
        return {arch: rec.target for arch, rec in user_records().items()}
    except RegistryFileError:
        return {}


def _project_models() -> dict[str, str]:
    root = project_root()
    return _registry_tables(root / PROJECT_PACKAGE) if root is not None else {}


def _layers() -> list[tuple[str, dict]]:
    return list(zip(ORIGINS, (_OUT_OF_TREE, _user_models(), _entry_point_models(),
                              _project_models(), _registry_tables(IN_TREE))))


def lookup_all(architecture: str) -> list[Resolution]:
    """Every registration of `architecture`, the one that serves it first."""
    return [Resolution(architecture, table[architecture], origin)
            for origin, table in _layers() if architecture in table]


def lookup(architecture: str) -> Resolution | None:
    found = lookup_all(architecture)
    return found[0] if found else None


def supported_architectures() -> list[str]:
    return sorted({arch for _, table in _layers() for arch in table})


def in_tree_models() -> dict[str, str]:
    """The in-tree table, {architecture: "module:Class"} (whatever else may override it)."""
    return _registry_tables(IN_TREE)


def served_architecture(architectures: list[str] | None) -> str | None:
    """The name in a config's `architectures` the engine serves it as: the first that is
    registered, else the first (None for none)."""
    if not architectures:
        return None
    return next((a for a in architectures if lookup(a) is not None), architectures[0])


def _hf_causal_lm_names() -> dict[str, str]:
    """transformers' causal-LM class names -> their model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = {}
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in names if isinstance(names, (tuple, list)) else [names]:
            out.setdefault(name, model_type)
    return out


_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _stem(name: str) -> str:
    """LlamaForCausalLM -> llama: what tells architectures apart."""
    for suffix in _CLASS_SUFFIXES:
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)].lower()
    return name.lower()


def suggest_architecture(name: str, candidates: list[str]) -> list[str]:
    """Names close to `name` (a different capitalisation first), compared without the
    ForCausalLM-style suffix they share."""
    same = [c for c in candidates if c.lower() == name.lower() and c != name]
    by_stem: dict[str, list[str]] = {}
    for c in candidates:
        by_stem.setdefault(_stem(c), []).append(c)
    close = difflib.get_close_matches(_stem(name), list(by_stem), n=3, cutoff=0.7)
    return same + [c for stem in close for c in by_stem[stem] if c not in same and c != name]


def did_you_mean(architecture: str) -> str:
    """" Did you mean X?" naming registered and transformers' architectures close to the name
    (a different capitalisation first), or ""."""
    known, hf = supported_architectures(), _hf_causal_lm_names()
    close = suggest_architecture(architecture, sorted(set(known) | set(hf)))[:3]
    labels = [n if n in known else f"{n} (transformers' name, model_type {hf[n]})" for n in close]
    return f" Did you mean {' or '.join(labels)}?" if labels else ""


def resolve(architecture: str) -> str | type:
    found = lookup(architecture)
    if found is None:
        unread = ""
        try:
            user_records()
        except RegistryFileError as e:
            unread = f" (the user registry was skipped: {e})"
        raise ModelNotSupportedError(
            f"architecture {architecture!r} is not registered.{did_you_mean(architecture)} "
            f"Registered: {', '.join(supported_architectures())}. Add it with `aphro new-model "
            "NAME --like FAMILY` (a spec, or --explicit for a model file), `aphro register` or "
            f"engine.register_model(){unread}.")
    return found.target


def resolve_class_path(architectures: list[str]) -> str | type:
    """What serves the first supported name in a config's `architectures`: "module:Class", or
    the class registered as an object (tensor-parallel workers receive it pickled, by name)."""
    arch = served_architecture(architectures)
    if arch is None:
        raise ModelNotSupportedError("config.json has no 'architectures' list")
    return resolve(arch)  # an unregistered name raises with the list of supported names


def ensure_importable(module_name: str) -> None:
    """A project's models import as aphro_models.<name>: put the project folder on sys.path
    (tensor-parallel workers inherit it). That is the project in the current directory, else
    the one a user-registry record of this module was validated in (its source files say), so
    a registered project model serves from any directory."""
    if module_name.split(".")[0] != PROJECT_PACKAGE:
        return
    root = project_root()
    here = root is not None and (root / PROJECT_PACKAGE).is_dir()
    for folder in [root] if here else _recorded_projects(module_name):
        if (folder / PROJECT_PACKAGE).is_dir():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


def _recorded_projects(module_name: str) -> list[Path]:
    try:
        records = user_records()
    except RegistryFileError:
        return []
    files = [Path(name) if Path(name).is_absolute() else REPO / name  # sources.shown's names
             for rec in records.values() if rec.target.partition(":")[0] == module_name
             for name in rec.sources]
    return [f.parent.parent for f in files if f.parent.name == PROJECT_PACKAGE]


def load_class(target: str | type) -> type:
    """Import "module:Class" (or take the class given; or build the model of "spec:PATH")
    and check it against the model contract. An import error in the model's module is raised as the ImportError it is."""
    from engine.models.contract import check_model_class

    if isinstance(target, type):
        check_model_class(target)
        return target
    if target.startswith(SPEC_TARGET):
        from engine.models.from_spec import model_class_from_spec

        return model_class_from_spec(target[len(SPEC_TARGET):])
    module_name, _, cls_name = target.partition(":")
    ensure_importable(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a model file written since this process looked: look again
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if module_name.split(".")[0] != PROJECT_PACKAGE or e.name is None or not (
                    module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # not a project's model, or its module is there and an import is not
            loaded = sys.modules.get(PROJECT_PACKAGE)
            other = [str(Path(p).parent) for p in getattr(loaded, "__path__", [])]
            raise ModelNotSupportedError(
                f"{target}: a project's model, and no project with it is found from "
                f"{Path.cwd()}"
                + (f" (this process serves the models of the project in {other[0]}: one "
                   "project's aphro_models at a time)" if other else "")
                + ": run aphro in the folder that holds its aphro_models/, or put that "
                "folder on PYTHONPATH") from None
    obj = module
    try:
        for part in cls_name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"{module_name} has no class {cls_name}") from None
    try:
        check_model_class(obj)
    except ModelContractError as e:
        raise ModelContractError(f"{target}: {e}") from None
    return obj


def load_model_class(architectures: list[str]) -> type:
    """The class for the first supported name in a config's `architectures`."""
    return load_class(resolve_class_path(architectures))
