"""`aphro new-model`: committed generated files are current, output is formatted, re-running
changes nothing, hand-written files are protected, the registry holds every generated model,
and a family started with --like works end to end (generated, registered, parity-checked)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.models import registry
from engine.spec import generator
from engine.spec.generator import HEADER_PREFIX, generate, read_registry, spec_paths
from engine.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "engine" / "models"
SPECS = spec_paths()


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["new-model", *args])


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regenerated")
    for path in SPECS:
        generate(load_spec(path), out, package="engine.models")
    return out


def test_committed_generated_files_are_current(regenerated):
    stale = []
    for new in sorted(regenerated.glob("*.py")):
        committed = MODELS / new.name
        if not committed.is_file() or committed.read_text() != new.read_text():
            stale.append(committed.name)
    assert not stale, f"stale generated files {stale}: run `aphro new-model --all`"
    for path in MODELS.glob("*.py"):  # a generated module whose spec is gone
        if path.read_text().startswith(HEADER_PREFIX):
            assert (regenerated / path.name).is_file(), f"{path.name} has no spec"


def test_generated_modules_are_short_wiring(regenerated):
    for path in regenerated.glob("*.py"):
        if path.name == "_generated.py":
            continue
        text = path.read_text()
        spec_name = f"model_specs/{path.stem}.toml"
        assert text.splitlines()[0] == (
            f"{HEADER_PREFIX} from {spec_name} — do not edit; edit the spec and regenerate"
        )
        assert "def " not in text and len(text.splitlines()) < 120, path.name


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_output_is_ruff_clean(regenerated):
    files = [str(p) for p in sorted(regenerated.glob("*.py"))]
    fmt = subprocess.run(
        ["ruff", "format", "--check", "--line-length", "100", *files],
        capture_output=True,
        check=False,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(
        ["ruff", "check", "--select", "E9,F,I", "--line-length", "100", *files],
        capture_output=True,
        check=False,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_registry_serves_every_spec():
    entries = read_registry(MODELS / "_generated.py")
    for path in SPECS:
        spec = load_spec(path)
        for arch in spec.model.architectures:
            assert entries[arch] == f"engine.models.{spec.model.name}:{arch}"
            assert arch in registry.supported_architectures()
            cls = registry.load_model_class([arch])
            assert cls.__module__ == f"engine.models.{spec.model.name}"
            assert cls.arch == spec.arch


def test_rerun_is_idempotent(tmp_path):
    first = run_cli("llama", "qwen2", "--out-dir", str(tmp_path))
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 3  # two modules and the registry
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = run_cli("llama", "qwen2", "--out-dir", str(tmp_path))
    assert again.exit_code == 0, again.output
    assert "created" not in again.output and "updated" not in again.output
    assert again.output.count("unchanged") == 4
    after = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before
    assert read_registry(tmp_path / "_generated.py") == {
        "LlamaForCausalLM": "llama:LlamaForCausalLM",
        "Qwen2ForCausalLM": "qwen2:Qwen2ForCausalLM",
    }
    assert "aphro parity-check" in first.output


def test_hand_written_file_is_not_overwritten_without_force(tmp_path):
    target = tmp_path / "llama.py"
    target.write_text("# my own llama\nclass LlamaForCausalLM: ...\n")
    result = run_cli("llama", "--out-dir", str(tmp_path))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--force" in " ".join(result.output.split())
    assert target.read_text() == "# my own llama\nclass LlamaForCausalLM: ...\n"
    forced = run_cli("llama", "--out-dir", str(tmp_path), "--force")
    assert forced.exit_code == 0, forced.output
    assert target.read_text() == (MODELS / "llama.py").read_text()


def test_stale_generated_file_is_regenerated_without_force(tmp_path):
    target = tmp_path / "qwen2.py"
    target.write_text((MODELS / "qwen2.py").read_text().replace("qkv_bias", "o_bias"))
    result = run_cli("qwen2", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "updated" in result.output
    assert target.read_text() == (MODELS / "qwen2.py").read_text()


def test_like_refuses_to_replace_a_spec(tmp_path):
    assert run_cli("mine", "--like", "llama", "--specs-dir", str(tmp_path)).exit_code == 0
    again = run_cli("mine", "--like", "llama", "--specs-dir", str(tmp_path))
    assert again.exit_code != 0 and "already exists" in " ".join(again.output.split())
    assert run_cli("mine", "--like", "nosuch", "--specs-dir", str(tmp_path)).exit_code != 0


def _register_hf_variant():
    """An HF 'my_qwen2': Qwen2 whose config calls the norm epsilon layer_norm_epsilon."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    class MyQwen2Config(Qwen2Config):
        model_type = "my_qwen2"
        attribute_map: ClassVar[dict[str, str]] = {
            **Qwen2Config.attribute_map,
            "rms_norm_eps": "layer_norm_epsilon",
        }

    class MyQwen2ForCausalLM(Qwen2ForCausalLM):
        config_class = MyQwen2Config

    AutoConfig.register("my_qwen2", MyQwen2Config, exist_ok=True)
    AutoModelForCausalLM.register(MyQwen2Config, MyQwen2ForCausalLM, exist_ok=True)


def test_like_variant_end_to_end(tmp_path, monkeypatch):
    from test_families import check_family  # the same parity assertions as every family

    from engine.models.blocks import Dims

    specs, out = tmp_path / "specs", tmp_path / "models"
    # the variant's HF code exists (as a model_type transformers knows) before the spec names it
    _register_hf_variant()
    result = run_cli("my_qwen2", "--like", "qwen2", "--specs-dir", str(specs))
    assert result.exit_code == 0, result.output
    path = specs / "my_qwen2.toml"
    text = path.read_text()
    assert 'architectures = ["MyQwen2ForCausalLM"]' in text and 'model_type = "my_qwen2"' in text
    # the variant's edits: another epsilon key, and a tiny value that makes it matter
    text = text.replace('norm_eps = "rms_norm_eps"', 'norm_eps = "layer_norm_epsilon"')
    path.write_text(text + "layer_norm_epsilon = 0.01\n")

    result = run_cli(str(path), "--out-dir", str(out))
    assert result.exit_code == 0, result.output
    module_text = (out / "my_qwen2.py").read_text()
    assert module_text.startswith(f"{HEADER_PREFIX} from {path.as_posix()}")
    assert 'norm_eps="layer_norm_epsilon"' in module_text
    entries = read_registry(out / "_generated.py")
    assert entries == {"MyQwen2ForCausalLM": "my_qwen2:MyQwen2ForCausalLM"}

    # register as a user would (module on sys.path + engine.register_model), undone afterwards
    monkeypatch.syspath_prepend(str(out))
    monkeypatch.setattr(registry, "_OUT_OF_TREE", dict(registry._OUT_OF_TREE))
    for arch, target in entries.items():
        registry.register_model(arch, target)
    cls = registry.load_model_class(["MyQwen2ForCausalLM"])
    assert cls.__name__ == "MyQwen2ForCausalLM"

    # the engine reads the renamed key (a plain config, without HF's attribute_map)
    from transformers import PretrainedConfig

    from engine.spec.loader import tiny_hf_config

    spec = load_spec(path)
    raw = tiny_hf_config(spec).to_dict()
    assert "rms_norm_eps" not in raw and raw["layer_norm_epsilon"] == 0.01
    assert Dims.from_hf(PretrainedConfig(**raw), cls.arch).norm_eps == 0.01

    check_family(path)
    importlib.invalidate_caches()


def test_generator_rejects_engine_module_names(tmp_path):
    spec_text = (
        (ROOT / "model_specs" / "llama.toml")
        .read_text()
        .replace('name = "llama"', 'name = "blocks"')
    )
    (tmp_path / "blocks.toml").write_text(spec_text)
    result = run_cli(str(tmp_path / "blocks.toml"), "--out-dir", str(tmp_path / "m"))
    assert result.exit_code != 0 and "model.name" in result.output


def test_module_prefix():
    assert generator.module_prefix(MODELS) == "engine.models."
    assert generator.module_prefix(Path("/tmp/x")) == ""
    assert generator.module_prefix(Path("/tmp/x"), "pkg.models") == "pkg.models."
