"""`aphro register` / `aphro unregister`: a model enters the user registry only with the proof
it passed (engine.validate.proof), and in-tree models get theirs in a committed file.

MODEL names what to register:

    a spec             a name in model_specs/ or a .toml path; one that `aphro new-model`
                       generated in-tree is that in-tree module, any other is served from the
                       spec file itself ("spec:PATH")
    module:Class       an explicit or out-of-tree class (its module importable)
    a checkpoint       a local HF folder: the class serving its architecture, checked on it
    an architecture    a registered name: the class serving it now, checked again

A name that something else already serves is replaced only with `force`; so is a model that
fails (recorded as "not validated"). Without `force` a failing model writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.errors import AphroError, ModelNotSupportedError
from engine.models import records as records_module
from engine.models import registry
from engine.models.catalog import checkpoint_architecture
from engine.models.records import (
    ValidationRecord,
    read_records,
    registry_path,
    update_records,
    user_records,
)
from engine.models.sources import SPEC_TARGET, module_source, source_hashes
from engine.validate.proof import Proof, prove, versions
from engine.validate.tiny import spec_dirs

IN_TREE_NOTE = ("the last validation of every in-tree model: regenerate with `aphro register "
                "--in-tree` (tests/test_records.py checks it matches the sources)")


@dataclass
class Candidate:
    architecture: str
    target: str  # what will serve it: "module:Class" or "spec:PATH"
    check: str  # what parity runs on: a spec path, an architecture name or a folder


@dataclass
class Registration:
    candidate: Candidate
    record: ValidationRecord
    proof: Proof | None  # None when parity could not run (with force)
    written: bool
    replaces: str | None  # what served the name before, "origin: target"
    previous: ValidationRecord | None  # the user registry's record it replaced
    path: Path


def _spec_file(model: str) -> Path | None:
    """A .toml path, or a spec name in the project's model_specs/ or the checkout's."""
    path = Path(model)
    if path.suffix == ".toml":
        return path
    if "/" in model:
        return None
    return next((folder / f"{model}.toml" for folder in spec_dirs()
                 if (folder / f"{model}.toml").is_file()), None)


def candidate(model: str, architecture: str | None = None) -> Candidate:
    """What `aphro register MODEL [--arch NAME]` would register, resolved, nothing run."""
    from engine.spec.loader import load_spec

    if Path(model).is_dir():
        arch = architecture or checkpoint_architecture(model)
        found = registry.lookup(arch) if arch else None
        if found is None:
            raise ModelNotSupportedError(
                f"{model}: nothing serves its architecture {arch!r}: register its class first "
                f"(aphro register module:Class --arch {arch})")
        return Candidate(arch, registry.target_name(found.target), model)
    spec_path = _spec_file(model)
    if spec_path is not None:
        spec = load_spec(spec_path)  # a SpecError names the file
        arch = architecture or spec.model.architectures[0]
        if arch not in spec.model.architectures:
            raise AphroError(f"--arch {arch}: {spec_path} declares "
                             f"{', '.join(spec.model.architectures)}")
        return Candidate(arch, _generated_target(arch, spec_path)
                         or registry.spec_target(spec_path), str(spec_path))
    if ":" in model:
        try:
            cls = registry.load_class(model)
        except ImportError as e:
            raise AphroError(f"cannot import {model}: {e}") from None
        return Candidate(architecture or cls.__name__, model, architecture or cls.__name__)
    found = registry.lookup(model)
    if found is None:
        raise AphroError(f"{model!r} is not a spec, a module:Class, a checkpoint folder or a "
                         f"registered architecture (registered: "
                         f"{', '.join(registry.supported_architectures())})")
    if architecture not in (None, model):
        raise AphroError(f"--arch {architecture}: MODEL is the architecture {model}")
    target = registry.target_name(found.target)
    check = target[len(SPEC_TARGET):] if target.startswith(SPEC_TARGET) else model
    return Candidate(model, target, check)


def _generated_target(arch: str, spec_path: Path) -> str | None:
    """The module generated from this spec (in-tree, or the project's) that serves `arch`, if
    there is one."""
    for found in registry.lookup_all(arch):
        if found.origin not in ("in-tree", "project"):
            continue
        _, source = module_source(registry.target_name(found.target))
        if source is not None and source.resolve() == spec_path.resolve():
            return registry.target_name(found.target)
    return None


def register(model: str, *, architecture: str | None = None, force: bool = False,
             progress: Callable[[str], None] | None = None, **check) -> Registration:
    """Validate MODEL and, when it passes (or with `force`), record it in the user registry.
    `check`: prove's dtype, device, tp, seed, max_new_tokens, chunked. A failing model without
    `force` gives a Registration with written=False and the file untouched."""
    path = registry_path()
    user_records()  # an unreadable registry is the named error before anything runs
    cand = candidate(model, architecture)
    serving = registry.lookup(cand.architecture)
    replaces = None
    if serving is not None and registry.target_name(serving.target) != cand.target:
        replaces = f"{serving.origin}: {registry.target_name(serving.target)}"
        if not force:
            raise AphroError(f"{cand.architecture} is already served by {replaces}; "
                             f"registering {cand.target} would replace it: pass --force")
    try:
        proof = prove(cand.check, cand.architecture, cand.target, progress=progress, **check)
        record = proof.record
    except AphroError as e:
        if not force:
            raise
        proof, record = None, _unchecked(cand, str(e), check)
    if not proof or not proof.passed:
        if not force:
            return Registration(cand, record, proof, False, replaces, None, path)
        record.status = "not validated"
        record.reason = record.reason or "registered with --force"

    def put(records: dict[str, ValidationRecord]) -> ValidationRecord | None:
        before = records.get(cand.architecture)
        if before is not None and before.target != cand.target and not force:
            raise AphroError(f"{cand.architecture} was registered as {before.target} meanwhile "
                             f"(in {path}): pass --force to replace it")
        records[cand.architecture] = record
        return before

    previous = update_records(path, put)
    return Registration(cand, record, proof, True, replaces, previous, path)


def _unchecked(cand: Candidate, why: str, check: dict) -> ValidationRecord:
    """The record of a model registered with force although parity could not run."""
    return ValidationRecord(
        architecture=cand.architecture, target=cand.target, status="not validated",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=versions(),
        dtype=str(check.get("dtype", "auto")), device=str(check.get("device", "auto")),
        tp=int(check.get("tp", 1)), checkpoint={"kind": None, "path": None, "hash": None},
        sources=source_hashes(cand.target), reason=f"parity could not run: {why}")


def unregister(architecture: str) -> tuple[ValidationRecord, registry.Resolution | None]:
    """Remove `architecture` from the user registry: (the record removed, what serves the name
    now or None)."""
    path = registry_path()

    def drop(records: dict[str, ValidationRecord]) -> ValidationRecord:
        if architecture not in records:
            found = registry.lookup(architecture)
            where = f"it is served by {found.origin}: {registry.target_name(found.target)}" \
                if found else "nothing serves it"
            raise AphroError(f"{architecture} is not in the user registry {path} ({where}); "
                             "only models added with `aphro register` can be unregistered")
        return records.pop(architecture)

    removed = update_records(path, drop)
    return removed, registry.lookup(architecture)


def in_tree_architectures() -> dict[str, str]:
    """architecture -> target of every in-tree model (whatever else may override it)."""
    return dict(sorted(registry.in_tree_models().items()))


def refresh_in_tree_records(*, progress: Callable[[str], None] | None = None,
                            **check) -> dict[str, str]:
    """Re-validate every in-tree model whose committed record (records.IN_TREE_RECORDS) is
    missing, not passed, stale or for another class, and rewrite the file (records of models
    no longer in-tree dropped). Returns architecture -> "kept" | "passed" | "failed" |
    "removed"."""
    path = records_module.IN_TREE_RECORDS
    records = read_records(path)
    models = in_tree_architectures()
    outcome = {arch: "removed" for arch in records.keys() - models.keys()}
    fresh: dict[str, ValidationRecord] = {}
    for arch, target in sorted(models.items()):
        old = records.get(arch)
        if old is not None and old.target == target and old.status == "passed" \
                and not old.changed_sources():
            fresh[arch], outcome[arch] = old, "kept"
            continue
        proof = prove(arch, arch, target, progress=progress, **check)
        fresh[arch], outcome[arch] = proof.record, proof.record.status

    def replace(current: dict[str, ValidationRecord]) -> None:
        current.clear()
        current.update(fresh)

    update_records(path, replace, note=IN_TREE_NOTE)
    return outcome
