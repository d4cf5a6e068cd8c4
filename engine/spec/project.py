"""Where `aphro new-model` reads and writes, and what a new model is called.

`Project`: the checkout (model_specs/ and engine/models/) when run inside it, else a project
folder (the current directory, or `--out DIR`) holding model_specs/ and the package
aphro_models/, which the registry finds when aphro runs in that folder. `family_spec` finds the
spec a new model starts from; `new_identity` picks its HF model_type and architecture name from
what the installed transformers knows, and says why.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import AphroError
from engine.models.registry import PROJECT_PACKAGE, suggest_architecture

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPECS_DIR = REPO / "model_specs"
DEFAULT_OUT_DIR = REPO / "engine" / "models"
PACKAGE_DOC = '"""This project\'s aphro models (`aphro new-model` writes them; docs/MODELS.md)."""\n'


@dataclass(frozen=True)
class Project:
    root: Path | None  # None: the engine's checkout
    specs_dir: Path
    models_dir: Path
    package: str | None  # import prefix of models_dir's modules (None: bare module names)

    def describe(self) -> str:
        return "this checkout" if self.root is None else f"the project in {self.root}"


def in_checkout(cwd: Path) -> bool:
    """Is `cwd` inside the source checkout the engine runs from (an editable install)?"""
    if not (REPO / "pyproject.toml").is_file():
        return False
    return cwd.resolve() == REPO or REPO in cwd.resolve().parents


def project_for(out: Path | None = None, cwd: Path | None = None) -> Project:
    """The checkout when working inside it (and no `out`), else the project folder `out` or
    the current directory."""
    cwd = cwd or Path.cwd()
    if out is None and in_checkout(cwd):
        return Project(None, DEFAULT_SPECS_DIR, DEFAULT_OUT_DIR, "engine.models")
    root = Path(out or cwd).resolve()
    return Project(root, root / "model_specs", root / PROJECT_PACKAGE, PROJECT_PACKAGE)


def ensure_package(models_dir: Path) -> None:
    """A project's aphro_models/ is a package: give it an __init__.py."""
    init = models_dir / "__init__.py"
    if models_dir.name == PROJECT_PACKAGE and not init.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        init.write_text(PACKAGE_DOC, encoding="utf-8")


def families(specs_dirs: list[Path]) -> list[str]:
    return sorted({p.stem for d in specs_dirs for p in Path(d).glob("*.toml")})


def family_spec(like: str, specs_dirs: list[Path]) -> Path:
    """The spec `like` names: a path, or a family in the first of specs_dirs that has it. An
    unknown family lists the families and suggests the closest."""
    path = Path(like)
    if path.suffix == ".toml" or "/" in like:
        if not path.is_file():
            raise AphroError(f"--like {like}: no such spec file")
        return path
    for folder in specs_dirs:
        if (Path(folder) / f"{like}.toml").is_file():
            return Path(folder) / f"{like}.toml"
    known = families(specs_dirs)
    close = difflib.get_close_matches(like, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise AphroError(f"--like {like}: no family of that name; {hint}families: {', '.join(known)}")


def class_prefix(name: str) -> str:
    """my_qwen2 -> MyQwen2."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


@dataclass(frozen=True)
class Identity:
    architecture: str  # the HF architecture name the model is registered under
    model_type: str  # the HF model_type whose transformers code is the parity reference
    notes: list[str] = field(default_factory=list)  # what was chosen and why, for the user


def _hf_names() -> tuple[dict[str, str], set[str]]:
    """(causal-LM model_type -> its class name, every model_type transformers knows)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {t: (c[0] if isinstance(c, (tuple, list)) else c)
              for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    return causal, set(CONFIG_MAPPING.keys())


def check_model_type(model_type: str, what: str) -> None:
    """An AphroError unless the installed transformers knows `model_type`."""
    _, types = _hf_names()
    if model_type not in types:
        close = difflib.get_close_matches(model_type, sorted(types), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise AphroError(f"{what}: transformers has no model type {model_type!r}{hint}; give "
                         "the HF model_type whose transformers code is the reference")


def new_identity(name: str, family_type: str, family: str, architecture: str | None = None,
                 model_type: str | None = None,
                 setting: str = "[model] model_type in the spec") -> Identity:
    """The HF model_type and architecture of a new model NAME started from a family.

    model_type: `model_type` if given (checked against transformers); else NAME when
    transformers knows it (porting an HF architecture, e.g. stablelm); else the family's, whose
    HF code is then the parity reference (said in a note). architecture: `architecture` if
    given (a different capitalisation of one of transformers' names is refused); else HF's
    causal-LM class of that model_type when the type is NAME's; else <Name>ForCausalLM.
    `setting`: where the user changes the model type afterwards (named in the note)."""
    causal, types = _hf_names()
    notes = []
    if model_type is not None:
        check_model_type(model_type, "--model-type")
    elif name in types:
        model_type = name
    else:
        model_type = family_type
        notes.append(
            f"model_type {model_type!r} (from {family}): transformers knows no model type "
            f"{name!r}, so parity-check compares with HF's {model_type} code. If your model has "
            f"an HF model type of its own, set {setting} (or run this new-model again with "
            "--model-type TYPE --force)")
    if architecture is not None:
        same_case = [a for a in suggest_architecture(architecture, sorted(set(causal.values())))
                     if a.lower() == architecture.lower()]
        if same_case:
            raise AphroError(f"--arch {architecture}: transformers spells it {same_case[0]}; "
                             "checkpoints name the architecture exactly so")
    elif model_type == name and model_type in causal:
        architecture = causal[model_type]
        notes.append(f"architecture {architecture} (transformers' causal-LM class of {name})")
    else:
        architecture = f"{class_prefix(name)}ForCausalLM"
        hf = [a for a in causal.values() if a.lower() == architecture.lower()]
        architecture = hf[0] if hf else architecture
    return Identity(architecture, model_type, notes)
