"""`aphro register` / `unregister` / `models`, end to end. The model registered here is one no
in-tree spec serves: StableLM (LayerNorm, partial rotary), written as a spec in a temporary
folder and checked against HF's StableLmForCausalLM; the planted bug is a copy of that spec with
one key wrong. Every test has its own registry file (APHRO_REGISTRY)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.models._generated import GENERATED_MODELS
from engine.spec.loader import load_spec
from engine.validate.register import in_tree_architectures
from engine.validate.tiny import SPECS_DIR

ROOT = Path(__file__).resolve().parent.parent
CHECK = ["--device", "cpu", "--no-chunked", "--max-new-tokens", "4"]
ARCH = "StableLmForCausalLM"
STABLELM_CONFIG = """\
hidden_size = "hidden_size"
num_layers = "num_hidden_layers"
num_heads = "num_attention_heads"
num_kv_heads = "num_key_value_heads"
intermediate_size = "intermediate_size"
vocab_size = "vocab_size"
max_position = "max_position_embeddings"
norm_eps = "layer_norm_eps"
activation = "hidden_act"
partial_rotary_factor = "partial_rotary_factor"
tie_word_embeddings = "tie_word_embeddings"
qkv_bias = { key = "use_qkv_bias", default = false }
"""
STABLELM_SPEC = f"""\
[model]
name = "stablelm"
architectures = ["{ARCH}"]
model_type = "stablelm"

[config]
{STABLELM_CONFIG}
[attention]
kind = "gqa"

[position]
kind = "rope"
rope_style = "neox"

[norm]
kind = "layer"

[mlp]
kind = "gated"

[tiny]
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 128
vocab_size = 512
max_position_embeddings = 512
tie_word_embeddings = false
"""


def write_spec(path: Path, old: str = "", new: str = "") -> Path:
    """The StableLM spec at `path`, with `old` replaced by `new` (a planted bug)."""
    assert not old or STABLELM_SPEC.count(old) == 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STABLELM_SPEC.replace(old, new) if old else STABLELM_SPEC)
    return path


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def aphro(*args: str):
    return CliRunner().invoke(cli, list(args))


def listed(*args: str) -> dict:
    res = aphro("models", "--json", *args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    return data if args else {m["architecture"]: m for m in data["models"]}


def hint(text: str) -> list[str]:
    """The command a message tells the user to run, `aphro ...` between backquotes."""
    command = re.search(r"`aphro ([^`]+)`", text).group(1)
    return shlex.split(command)


@pytest.fixture
def registry_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry" / "registry.json"
    monkeypatch.setenv("APHRO_REGISTRY", str(path))
    return path


def test_register_a_correct_model_stores_the_report_it_passed(registry_file, tmp_path):
    from engine import LLM, SamplingParams
    from engine.errors import ModelNotSupportedError
    from engine.models import registry
    from engine.spec.loader import tiny_hf_config
    from engine.validate.tiny import make_tiny_checkpoint

    spec = write_spec(tmp_path / "specs" / "stablelm.toml")
    with pytest.raises(ModelNotSupportedError):
        registry.resolve(ARCH)  # nothing serves it before it is registered
    res = aphro("register", str(spec), *CHECK)
    assert res.exit_code == 0, res.output
    assert f"registered {ARCH} -> spec:{spec.resolve()}: passed" in res.stdout
    rec = json.loads(registry_file.read_text())["models"][ARCH]
    assert rec["status"] == "passed" and rec["target"] == f"spec:{spec.resolve()}"
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["versions"]["transformers"] == transformers.__version__
    assert (rec["dtype"], rec["device"], rec["tp"]) == ("float32", "cpu", 1)
    age = datetime.now(timezone.utc) - datetime.fromisoformat(rec["date"])
    assert timedelta(0) <= age < timedelta(hours=1)
    assert rec["sources"] == {str(spec.resolve()): sha256(spec)}
    assert rec["worst"]["greedy"] == "4/4" and rec["worst"]["min_top1"] == 1.0
    assert 0 <= rec["worst"]["max_abs"] < 1e-3 and rec["tolerances"]["atol"] == 1e-4
    # the tiny config it ran on, by content
    ckpt = make_tiny_checkpoint(tiny_hf_config(load_spec(spec)), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("transformers_version")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert rec["checkpoint"] == {"kind": "tiny", "path": None, "hash": f"sha256:{digest}"}

    # registered, the engine serves it: greedy tokens equal HF's StableLM on the same weights
    assert registry.resolve(ARCH) == f"spec:{spec.resolve()}"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = [0, 17, 93, 260, 301, 42]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    with LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_bytes=1 << 22) as llm:
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        out = llm.engine.add_request(None, params, ids, request_id="r")
        tokens = []
        while llm.engine.has_unfinished_requests():
            tokens += [list(o.outputs[0].token_ids) for o in llm.engine.step() if o.finished]
    assert out == "r" and tokens == [expected[0, len(ids):].tolist()]


def test_a_changed_model_source_is_stale_until_registered_again(registry_file, tmp_path):
    spec = write_spec(tmp_path / "stablelm.toml")
    assert aphro("register", str(spec), *CHECK).exit_code == 0
    entry = listed()[ARCH]
    assert entry["status"] == "passed" and not entry["stale"] and entry["source"] == "spec"
    assert aphro("generate", ARCH, "-p", "hi", "--max-tokens", "2").stderr.count("warning") == 0

    spec.write_text(spec.read_text() + "# edited after it was validated\n")
    entry = listed()[ARCH]
    assert entry["stale"] and entry["changed"] == [str(spec.resolve())]
    assert "(stale)" in aphro("models").stdout
    res = aphro("generate", ARCH, "-p", "hi", "--max-tokens", "2")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "changed since it was validated" in warnings[0]
    strict = aphro("generate", ARCH, "-p", "hi", "--max-tokens", "2", "--strict")
    assert strict.exit_code == 2 and "changed since it was validated" in strict.stderr

    res = aphro(*hint(warnings[0]))  # the warning's own advice, followed literally
    assert res.exit_code == 0, res.output
    assert not listed()[ARCH]["stale"]
    res = aphro("generate", ARCH, "-p", "hi", "--max-tokens", "2", "--strict")
    assert res.exit_code == 0 and "warning" not in res.stderr


def test_a_served_name_needs_force_and_says_what_it_replaces(registry_file, tmp_path):
    copy = tmp_path / "llama.toml"
    copy.write_text((SPECS_DIR / "llama.toml").read_text())
    res = aphro("register", str(copy), *CHECK)
    assert res.exit_code == 2
    message = " ".join(res.stderr.split())
    assert ("LlamaForCausalLM is already served by in-tree: "
            "engine.models.llama:LlamaForCausalLM") in message and "pass --force" in message
    assert not registry_file.exists()

    res = aphro("register", str(copy), *CHECK, "--force")
    assert res.exit_code == 0, res.output
    assert "replaces in-tree: engine.models.llama:LlamaForCausalLM" in res.stdout
    entry = listed("LlamaForCausalLM")
    assert entry["source"] == "spec" and entry["target"] == f"spec:{copy.resolve()}"
    assert entry["status"] == "passed" and entry["record_from"] == "user registry"
    assert entry["overrides"] == ["in-tree: engine.models.llama:LlamaForCausalLM"]

    res = aphro("unregister", "LlamaForCausalLM")
    assert res.exit_code == 0, res.output
    assert "now served by engine.models.llama:LlamaForCausalLM (in-tree)" in res.stdout
    entry = listed("LlamaForCausalLM")
    assert entry["source"] == "in-tree generated" and entry["record_from"] == "in-tree records"
    table = aphro("models")  # its last line: `aphro models ARCH` shows one model's full record
    assert table.exit_code == 0 and hint(table.stdout) == ["models", "ARCH"]
    res = aphro("models", "LlamaForCausalLM")
    assert res.exit_code == 0, res.output
    assert "in-tree generated" in res.stdout and "model_specs/llama.toml" in res.stdout
    assert entry["record"]["date"] in res.stdout
    res = aphro("unregister", "LlamaForCausalLM")
    assert res.exit_code == 2 and "not in the user registry" in res.stderr


def test_a_planted_bug_is_refused_and_force_records_not_validated(registry_file, tmp_path):
    from engine.models.records import in_tree_records, update_records

    gpt2 = in_tree_records()["GPT2LMHeadModel"]  # a genuine record already in the file
    update_records(registry_file, lambda r: r.__setitem__("GPT2LMHeadModel", gpt2))
    before = registry_file.read_bytes()
    planted = write_spec(tmp_path / "planted" / "stablelm.toml",
                         'rope_style = "neox"', 'rope_style = "gptj"')
    res = aphro("register", str(planted), *CHECK)
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.stdout and "first divergence: layer 0 self_attn" in res.stdout
    refusal = " ".join(res.stderr.split())
    assert "refused:" in refusal and "Nothing was written" in refusal
    assert registry_file.read_bytes() == before

    # the refusal's advice: add --force to register it as not validated
    assert "add --force to register it as not validated" in refusal
    res = aphro("register", str(planted), *CHECK, "--force")
    assert res.exit_code == 0, res.output
    assert "NOT VALIDATED" in res.stdout
    models = json.loads(registry_file.read_text())["models"]
    assert models["GPT2LMHeadModel"] == gpt2.to_dict()
    rec = models[ARCH]
    assert rec["status"] == "not validated" and "layer 0 self_attn" in rec["reason"]
    assert rec["worst"]["greedy"] != "4/4"
    assert listed()[ARCH]["status"] == "not validated"
    res = aphro("generate", ARCH, "-p", "hi", "--max-tokens", "2", "--strict")
    assert res.exit_code == 2 and "not validated" in res.stderr


def test_an_explicit_class_with_tp_records_the_sharding_check(registry_file, tmp_path,
                                                              monkeypatch):
    """module:Class: a hand-written copy of the GPT-2 model (its generated line dropped), on
    sys.path; --tp 2 runs parity at TP=2 and the sharding check (gloo on CPU)."""
    module = tmp_path / "mine" / "my_gpt2.py"
    module.parent.mkdir()
    module.write_text((ROOT / "engine" / "models" / "gpt2.py").read_text().split("\n", 1)[1])
    monkeypatch.syspath_prepend(str(module.parent))
    res = aphro("register", "my_gpt2:GPT2LMHeadModel", "--tp", "2", *CHECK, "--force")
    assert res.exit_code == 0, res.output
    assert "replaces in-tree: engine.models.gpt2:GPT2LMHeadModel" in res.stdout
    rec = json.loads(registry_file.read_text())["models"]["GPT2LMHeadModel"]
    assert rec["status"] == "passed" and rec["tp"] == 2 and rec["target"] == "my_gpt2:GPT2LMHeadModel"
    assert rec["sharding"]["ok"] and rec["sharding"]["failed_params"] == 0
    assert rec["sharding"]["logits_max_abs"] <= rec["sharding"]["logits_tolerance"]
    assert rec["sources"] == {str(module.resolve()): sha256(module)}
    entry = listed("GPT2LMHeadModel")
    assert entry["source"] == "user registry" and entry["module"] == str(module.resolve())


def test_a_checkpoint_folder_is_checked_on_itself(registry_file, tmp_path, tiny_llama_dir):
    """A folder registers the class serving its architecture, with the folder's content hash
    (every file, by name and content) in the record."""
    import shutil

    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "ckpt"))
    res = aphro("register", str(folder), *CHECK)
    assert res.exit_code == 0, res.output
    rec = json.loads(registry_file.read_text())["models"]["LlamaForCausalLM"]
    assert rec["target"] == "engine.models.llama:LlamaForCausalLM" and rec["status"] == "passed"
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + sha256(f).encode() + b"\0")
    assert rec["checkpoint"] == {"kind": "folder", "path": str(folder.resolve()),
                                 "hash": f"sha256:{digest.hexdigest()}"}
    entry = listed("LlamaForCausalLM")  # the latest record of the in-tree class: this one
    assert entry["record_from"] == "user registry" and entry["source"] == "in-tree generated"


def test_what_cannot_be_registered_is_one_line_that_says_why(registry_file):
    res = aphro("register", "no_such_module:MyForCausalLM")
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: cannot import no_such_module:MyForCausalLM: No module "
                                  "named 'no_such_module'")
    res = aphro("register", "NoSuchForCausalLM")
    assert res.exit_code == 2 and "is not a spec, a module:Class" in res.stderr
    assert not registry_file.exists()


def test_two_processes_registering_at_once_both_land(registry_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "aphro_cli.main", "register", spec, *CHECK],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for spec in ("gpt2", "opt")]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    models = json.loads(registry_file.read_text())["models"]
    assert sorted(models) == ["GPT2LMHeadModel", "OPTForCausalLM"]
    assert all(m["status"] == "passed" for m in models.values())


def test_a_corrupt_registry_is_named_and_in_tree_models_still_work(registry_file,
                                                                  tiny_llama_dir):
    from engine.errors import ModelNotSupportedError
    from engine.models import registry

    registry_file.parent.mkdir(parents=True)
    registry_file.write_text('{"format": 1, "models": {"X": ')
    res = aphro("register", "gpt2", *CHECK)
    assert res.exit_code == 2 and str(registry_file) in " ".join(res.stderr.split())
    assert "corrupt" in res.stderr and registry_file.read_text().endswith('"X": ')
    res = aphro("models", "--json")
    assert res.exit_code == 2 and str(registry_file) in " ".join(res.stderr.split())
    data = json.loads(res.stdout)
    assert str(registry_file) in data["registry_error"]
    assert {m["architecture"] for m in data["models"]} == set(in_tree_architectures())
    with pytest.raises(ModelNotSupportedError, match=str(registry_file)):
        registry.resolve("NoSuchForCausalLM")
    res = aphro("generate", str(tiny_llama_dir), "-p", "hello", "--max-tokens", "3", "--strict")
    assert res.exit_code == 0, res.output  # an in-tree model with its committed record
    assert "warning" not in res.stderr

    # the error's advice: remove it, and `aphro register` starts a new one
    registry_file.unlink()
    res = aphro("register", "gpt2", *CHECK)
    assert res.exit_code == 0, res.output
    assert list(json.loads(registry_file.read_text())["models"]) == ["GPT2LMHeadModel"]


PLUGIN = f'''\
"""An out-of-tree aphro model: StableLM over aphro's shared blocks."""
from engine.models.blocks import DecoderOnlyForCausalLM, packed_modules_for
from engine.spec import Arch, AttentionSpec, ConfigField, ConfigMap, MlpSpec, NormSpec
from engine.spec import PositionSpec


class {ARCH}(DecoderOnlyForCausalLM):
    arch = Arch(
        config=ConfigMap(
            {", ".join(line.replace(" = ", "=", 1) for line in STABLELM_CONFIG.splitlines()
                       if "{" not in line)},
            qkv_bias=ConfigField(key="use_qkv_bias", default=False)),
        attention=AttentionSpec(kind="gqa"), position=PositionSpec(kind="rope"),
        norm=NormSpec(kind="layer"), mlp=MlpSpec(kind="gated"))
    packed_modules = packed_modules_for(arch)
'''
PLUGIN_PROJECT = f"""\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "aphro-test-plugin"
version = "0.0.1"

[project.entry-points."aphro.models"]
{ARCH} = "aphro_test_plugin:{ARCH}"

[tool.setuptools]
py-modules = ["aphro_test_plugin"]
"""


def test_models_lists_the_in_tree_families_validated_and_an_installed_plugin(registry_file,
                                                                              tmp_path):
    """The plugin is pip-installed into a folder of its own (not the shared environment), so
    only the processes started here see it; removing the folder uninstalls it."""
    import shutil

    pkg, site = tmp_path / "plugin", tmp_path / "site"
    pkg.mkdir()
    (pkg / "aphro_test_plugin.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(PLUGIN_PROJECT)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aphro_cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                              "--no-build-isolation", "--no-index", "--target", str(site),
                              str(pkg)], capture_output=True, text=True, timeout=300,
                             check=False)
        assert pip.returncode == 0, pip.stderr
        before = {m["architecture"]: m for m in json.loads(run("models", "--json").stdout)[
            "models"]}
        assert before[ARCH]["source"] == "plugin entry point"
        assert before[ARCH]["status"] == "missing"
        reg = run("register", ARCH, *CHECK)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        res = run("models", "--json")
        assert res.returncode == 0, res.stderr
        models = {m["architecture"]: m for m in json.loads(res.stdout)["models"]}
    finally:
        shutil.rmtree(site, ignore_errors=True)
    in_tree = in_tree_architectures()
    assert set(models) == set(in_tree) | {ARCH}
    families = [a for p in SPECS_DIR.glob("*.toml") for a in load_spec(p).model.architectures]
    # every family model_specs/ holds (the 13 the issue names, and those added since)
    assert len(families) == len(list(SPECS_DIR.glob("*.toml"))) >= 13
    assert set(families) <= set(in_tree)
    for arch, target in in_tree.items():
        m = models[arch]
        source = "in-tree generated" if arch in GENERATED_MODELS else "in-tree explicit"
        assert (m["source"], m["target"], m["status"], m["stale"]) == (
            source, target, "passed", False), arch
        assert m["record_from"] == "in-tree records"
    plugin = models[ARCH]
    assert plugin["source"] == "plugin entry point"
    assert plugin["target"] == f"aphro_test_plugin:{ARCH}"
    assert plugin["module"] == str((site / "aphro_test_plugin.py").resolve())
    assert plugin["features"]["attention"] == "gqa" and plugin["features"]["moe"] is False
    assert plugin["status"] == "passed" and not plugin["stale"]
    assert plugin["record"]["sources"] == {plugin["module"]: sha256(pkg / "aphro_test_plugin.py")}
