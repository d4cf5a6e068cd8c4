"""Every known architecture with where it comes from, what it is built of and what was proven
about it (`aphro models`), and the check `aphro serve` / `aphro generate` make before serving.

An entry's record is the latest of the user registry's and the committed in-tree one
(engine/models/validation.json) that is for the class serving the architecture now; a record for
another class does not count. A record whose source files changed since
(engine.models.sources) is stale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import RegistryFileError, UnvalidatedModelError
from engine.models import registry
from engine.models.records import ValidationRecord, in_tree_records, user_records
from engine.models.sources import SPEC_TARGET, module_source, shown

SOURCES = ("in-tree generated", "in-tree explicit", "spec", "project", "plugin entry point",
           "user registry", "register_model")


@dataclass
class ModelEntry:
    architecture: str
    source: str  # one of SOURCES
    target: str  # "module:Class" or "spec:PATH"
    spec: str | None  # the spec file of a generated or spec model
    module: str | None  # the module file of the class
    # attention kind, position scheme, MoE, sliding window (None: the class does not say);
    # quantization: the schemes the model supports (engine.layers.quantization)
    features: dict
    status: str  # "passed" | "failed" | "not validated" | "missing" (no record)
    stale: bool
    changed: list[str]  # source files changed since the record was made
    record: ValidationRecord | None
    record_from: str | None  # "user registry" | "in-tree records"
    overrides: list[str] = field(default_factory=list)  # "origin: target" it takes over from
    error: str | None = None  # the class could not be loaded

    def to_dict(self) -> dict:
        d = asdict(self)
        d["record"] = self.record.to_dict() if self.record else None
        return d


@dataclass
class Records:
    """Both record files, read once; a user registry that cannot be read is `user_error`."""
    user: dict[str, ValidationRecord]
    in_tree: dict[str, ValidationRecord]
    user_error: str | None

    @classmethod
    def read(cls) -> Records:
        try:
            user, error = user_records(), None
        except RegistryFileError as e:
            user, error = {}, str(e)
        return cls(user, in_tree_records(), error)

    def find(self, architecture: str, target: str) -> tuple[ValidationRecord | None, str | None]:
        """The latest record of `target` serving `architecture`, and which file holds it."""
        found = [(records[architecture], where) for where, records in
                 (("user registry", self.user), ("in-tree records", self.in_tree))
                 if architecture in records and records[architecture].target == target]
        return max(found, key=lambda f: f[0].date, default=(None, None))


def _source(found: list[registry.Resolution],
            target: str) -> tuple[str, Path | None, Path | None]:
    """(source, module file, the spec it was generated from) of what serves an architecture:
    its source is where its class comes from, the lowest registration of the same target (an
    in-tree or plugin class that `aphro register` checked again is still in-tree or a
    plugin)."""
    if target.startswith(SPEC_TARGET):
        return "spec", None, None
    module, generated = module_source(target)
    origin = [r.origin for r in found if registry.target_name(r.target) == target][-1]
    if origin == "in-tree":
        origin = "in-tree generated" if generated is not None else "in-tree explicit"
    return origin, module, generated


def features_of(cls: type) -> dict:
    """What the model is built of, read from its spec `Arch` (generated and spec models)."""
    from engine.layers.quantization import supported_schemes
    from engine.spec import Arch

    arch = getattr(cls, "arch", None)
    out = {"attention": None, "position": None, "moe": None, "sliding_window": None,
           "quantization": list(supported_schemes(cls))}
    if isinstance(arch, Arch):
        rope = arch.position.kind == "rope"
        out.update(
            attention=arch.attention.kind + ("+qk_norm" if arch.attention.qk_norm else ""),
            position=arch.position.kind + (f" ({arch.position.rope_style})" if rope else ""),
            moe=arch.mlp.kind == "moe", sliding_window=arch.config.sliding_window is not None)
    return out


def describe(architecture: str, records: Records | None = None) -> ModelEntry:
    """The entry of one known architecture (ModelNotSupportedError when unknown)."""
    records = records or Records.read()
    found = registry.lookup_all(architecture)
    if not found:
        registry.resolve(architecture)  # raises, listing the known ones
    target = registry.target_name(found[0].target)
    source, module, generated = _source(found, target)
    spec = target[len(SPEC_TARGET):] if source == "spec" else None
    if spec is None and generated is not None:
        spec = shown(generated)
    features, error = {}, None
    try:
        features = features_of(registry.load_class(found[0].target))
    except Exception as e:  # noqa: BLE001 - a model that cannot be imported is listed as such
        error = f"{type(e).__name__}: {e}"
    record, where = records.find(architecture, target)
    changed = record.changed_sources() if record else []
    return ModelEntry(
        architecture=architecture, source=source, target=target, spec=spec,
        module=shown(module) if module else None, features=features,
        status=record.status if record else "missing", stale=bool(changed), changed=changed,
        record=record, record_from=where, error=error,
        overrides=[f"{r.origin}: {registry.target_name(r.target)}" for r in found[1:]
                   if registry.target_name(r.target) != target])


def list_models() -> tuple[list[ModelEntry], str | None]:
    """Every known architecture's entry, and the user registry's error when it is unreadable
    (its models are then missing from the list; in-tree ones are there)."""
    records = Records.read()
    return ([describe(arch, records) for arch in registry.supported_architectures()],
            records.user_error)


def validation_problem(entry: ModelEntry) -> str | None:
    """One line on what is wrong with an entry's validation, or None when it passed and is
    current."""
    what, rec = f"{entry.architecture} ({entry.target})", entry.record
    hint = f"`aphro register {entry.architecture}` validates and records it"
    if rec is None:
        return f"{what} has no validation record; {hint}"
    where = f"{rec.date[:10]}, {rec.dtype} on {rec.device}, tp {rec.tp}"
    if rec.status == "failed":
        return f"{what} failed validation ({where}): {rec.reason}; {hint}"
    if rec.status != "passed":
        return (f"{what} was registered with --force, not validated ({where})"
                + (f": {rec.reason}" if rec.reason else "") + f"; {hint}")
    if entry.stale:
        return (f"{what} changed since it was validated ({where}): "
                f"{', '.join(entry.changed)}; {hint}")
    return None


def check_validated(architecture: str, strict: bool = False) -> str | None:
    """Before serving `architecture`: None when its class has a passing, current record, else
    a one-line warning (raised as UnvalidatedModelError with `strict`). An architecture nothing
    serves gives None: the engine reports that itself."""
    if registry.lookup(architecture) is None:
        return None
    problem = validation_problem(describe(architecture))
    if problem and strict:
        raise UnvalidatedModelError(f"{problem} (--strict refuses unvalidated models)")
    return problem


def checkpoint_architecture(folder: str | Path) -> str | None:
    """The architecture the engine will serve a checkpoint folder as: the first name in its
    config.json `architectures` that is registered (else the first; None without any)."""
    try:
        names = json.loads((Path(folder) / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return registry.served_architecture(names)
