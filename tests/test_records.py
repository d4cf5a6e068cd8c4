"""Validation records: the committed in-tree records match the model sources (hashed here, with
hashlib), the user registry file survives concurrent writers, a spec target builds what the
generator generates, and `aphro register --in-tree` re-validates exactly the stale records."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.models import records
from engine.models._generated import GENERATED_MODELS
from engine.models.records import ValidationRecord, read_records, update_records
from engine.validate.tiny import SPECS_DIR

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def in_tree_sources(target: str) -> dict[str, str]:
    """What an in-tree generated model's record must vouch for: its module and its spec."""
    module = target.partition(":")[0].replace(".", "/") + ".py"
    spec = f"model_specs/{Path(module).stem}.toml"
    return {module: sha256(ROOT / module), spec: sha256(ROOT / spec)}


def test_in_tree_records_match_the_sources():
    """Stale means a model changed since it was validated: run `aphro register --in-tree`."""
    committed = json.loads((ROOT / "engine" / "models" / "validation.json").read_text())
    assert sorted(committed["models"]) == sorted(GENERATED_MODELS)
    for arch, target in GENERATED_MODELS.items():
        rec = committed["models"][arch]
        assert rec["target"] == target, arch
        assert rec["status"] == "passed", f"{arch}: {rec['reason']}"
        assert rec["sources"] == in_tree_sources(target), (
            f"{arch}: its source changed since it was validated; run `aphro register --in-tree`")
        assert rec["worst"]["max_abs"] <= rec["tolerances"]["atol"] + 0.1  # logits of size ~1
        assert rec["worst"]["greedy"].split("/")[0] == rec["worst"]["greedy"].split("/")[1]


def test_a_spec_target_builds_the_class_the_generator_writes():
    from engine.models.from_spec import model_class_from_spec
    from engine.models.registry import load_class

    for arch, target in GENERATED_MODELS.items():
        generated = load_class(target)
        spec = SPECS_DIR / f"{target.partition(':')[0].rsplit('.', 1)[1]}.toml"
        built = model_class_from_spec(spec)
        assert built.arch == generated.arch, arch
        assert built.packed_modules == generated.packed_modules, arch


def record(arch: str) -> ValidationRecord:
    return ValidationRecord(architecture=arch, target="pkg.mod:Cls", status="not validated",
                            date="2026-01-01T00:00:00+00:00", versions={}, dtype="float32",
                            device="cpu", tp=1, checkpoint={}, sources={})


WRITER = """
import sys
from engine.models.records import ValidationRecord, update_records
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # start together
for i in range(n):
    rec = ValidationRecord(architecture=f"{tag}{i}", target="pkg.mod:Cls",
                           status="not validated", date="d", versions={}, dtype="float32",
                           device="cpu", tp=1, checkpoint={}, sources={})
    update_records(path, lambda records: records.__setitem__(rec.architecture, rec))
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    path, n = tmp_path / "registry.json", 40
    update_records(path, lambda r: r.__setitem__("Existing", record("Existing")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for tag in ("A", "B")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
    got = read_records(path)
    assert sorted(got) == sorted(["Existing"] + [f"{t}{i}" for t in "AB" for i in range(n)])
    assert not list(tmp_path.glob(".registry.json.*.tmp"))  # no temporary file left behind


def test_a_corrupt_file_is_an_error_that_names_it_and_is_left_alone(tmp_path):
    from engine.errors import RegistryFileError

    path = tmp_path / "registry.json"
    for text in ("{not json", '{"format": 1, "models": []}',
                 '{"format": 1, "models": {"X": {"target": "a:b"}}}'):
        path.write_text(text)
        with pytest.raises(RegistryFileError, match=str(path)):
            read_records(path)
        with pytest.raises(RegistryFileError, match=str(path)):
            update_records(path, lambda r: r.__setitem__("Y", record("Y")))
        assert path.read_text() == text


def test_refresh_in_tree_records_revalidates_what_is_missing_or_stale(tmp_path, monkeypatch):
    """`aphro register --in-tree`: the one command that regenerates the committed file."""
    copy = tmp_path / "validation.json"
    data = json.loads(records.IN_TREE_RECORDS.read_text())
    del data["models"]["GPT2LMHeadModel"]  # missing
    opt = data["models"]["OPTForCausalLM"]
    opt["sources"] = {k: "sha256:0" for k in opt["sources"]}  # stale
    copy.write_text(json.dumps(data))
    monkeypatch.setattr(records, "IN_TREE_RECORDS", copy)
    res = CliRunner().invoke(cli, ["register", "--in-tree", "--device", "cpu", "--no-chunked",
                                   "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "GPT2LMHeadModel: passed" in res.stdout and "OPTForCausalLM: passed" in res.stdout
    assert "11 in-tree record(s) up to date, 2 rewritten" in " ".join(res.stdout.split())
    new = json.loads(copy.read_text())["models"]
    for arch in ("GPT2LMHeadModel", "OPTForCausalLM"):
        assert new[arch]["status"] == "passed"
        assert new[arch]["sources"] == in_tree_sources(GENERATED_MODELS[arch])
        assert new[arch]["checks"]["max_new_tokens"] == 2
    for arch in set(GENERATED_MODELS) - {"GPT2LMHeadModel", "OPTForCausalLM"}:
        assert new[arch] == data["models"][arch], arch  # kept as it was
