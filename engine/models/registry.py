"""HF `architectures` name -> "module:Class", imported lazily (importing never starts CUDA).

Where a name is looked up, first match wins:
1. `register_model(arch, "pkg.module:Class")` (or the class) in this process;
2. the `aphro.models` entry-point group of installed packages (name = architecture, value =
   "pkg.module:Class");
3. the project in the current directory: aphro_models/_generated.py and _explicit.py, written by
   `aphro new-model` outside the checkout (the folder is put on sys.path to import them);
4. the in-tree models: engine/models/_generated.py (generated from model_specs/) and
   engine/models/_explicit.py (explicit model files).
Every class, whichever tier it comes from, is checked against the model contract
(engine/models/contract.py) when it is registered as a class or loaded.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path

from engine.errors import ModelContractError, ModelNotSupportedError

IN_TREE = Path(__file__).resolve().parent
PROJECT_PACKAGE = "aphro_models"  # a project's model package (outside the checkout)
REGISTRY_FILES = {"_generated.py": "GENERATED_MODELS", "_explicit.py": "EXPLICIT_MODELS"}

# the one process-wide table: what register_model() added in this process
_OUT_OF_TREE: dict[str, str | type] = {}


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


def _all_models() -> dict[str, str | type]:
    """Every registered architecture, the first source in the module docstring's order
    winning."""
    tables: list[dict] = [_registry_tables(IN_TREE)]
    root = project_root()
    if root is not None:
        tables.append(_registry_tables(root / PROJECT_PACKAGE))
    tables += [_entry_point_models(), _OUT_OF_TREE]
    merged: dict[str, str | type] = {}
    for table in tables:  # later tables override earlier ones
        merged.update(table)
    return merged


def supported_architectures() -> list[str]:
    return sorted(_all_models())


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
    target = _all_models().get(architecture)
    if target is None:
        raise ModelNotSupportedError(
            f"architecture {architecture!r} is not registered.{did_you_mean(architecture)} "
            f"Registered: {', '.join(supported_architectures())}. Add it with `aphro new-model "
            "NAME --like FAMILY` (a spec, or --explicit for a model file) or "
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


def _importable(module_name: str) -> None:
    """A project's models import as aphro_models.<name>: put the project folder on sys.path
    (tensor-parallel workers inherit it)."""
    root = project_root()
    if module_name.split(".")[0] == PROJECT_PACKAGE and root is not None \
            and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def load_class(target: str | type) -> type:
    """Import "module:Class" (or take the class given) and check it against the model
    contract. An import error in the model's module is raised as the ImportError it is."""
    from engine.models.contract import check_model_class

    if isinstance(target, type):
        check_model_class(target)
        return target
    module_name, _, cls_name = target.partition(":")
    _importable(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a model file written since this process looked: look again
        importlib.invalidate_caches()
        module = importlib.import_module(module_name)
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
