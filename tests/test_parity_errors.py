"""parity-check when something other than the model's numbers is wrong: a checkpoint that is
truncated, misses a shard, names an unknown architecture or holds a misshaped tensor is the
user's to fix (exit 2, one line naming it, no load verdict for a load that never happened);
without MODEL each model's failure, whatever it is, sits in that model's row under one summary
(exit 1)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli

FAST = ["--device", "cpu", "--no-chunked", "--max-new-tokens", "2"]
LOADED = "load: every checkpoint tensor used once"


def check(*args: str):
    return CliRunner().invoke(cli, ["parity-check", *args, *FAST])


def flat(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def copy_of(tiny_llama_dir, tmp_path):
    def make(name: str):
        return shutil.copytree(tiny_llama_dir, tmp_path / name)
    return make


def test_truncated_checkpoint_exits_2_without_a_load_verdict(copy_of):
    ckpt = copy_of("truncated")
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    res = check(str(ckpt))
    assert res.exit_code == 2, res.output
    assert "truncated or corrupt safetensors file" in flat(res)
    assert LOADED not in res.output and "Traceback" not in res.output


def test_missing_shard_exits_2(make_checkpoint):
    from engine.validate.tiny import tiny_llama_config

    ckpt = make_checkpoint(tiny_llama_config(), "sharded", shard_max_bytes=200_000)
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    res = check(str(ckpt))
    assert res.exit_code == 2, res.output
    assert shards[-1].name in flat(res) and LOADED not in res.output


def test_unknown_architecture_exits_2_with_a_suggestion(copy_of):
    ckpt = copy_of("unknown")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LLamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    res = check(str(ckpt))
    assert res.exit_code == 2, res.output
    assert "'LLamaForCausalLM' is not registered. Did you mean LlamaForCausalLM" in flat(res)
    assert LOADED not in res.output


def test_misshaped_tensor_is_named_before_transformers_error(copy_of):
    from safetensors.torch import load_file, save_file

    ckpt = copy_of("misshaped")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    res = check(str(ckpt))
    assert res.exit_code == 2, res.output
    text = flat(res)
    assert f"misshaped {name} (model expects [64, 128], checkpoint has [64, 127])" in text
    assert text.index(name) < text.index("transformers cannot load it either")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with three models: one right, one whose spec names a model_type
    transformers does not know, one whose model file does not even import."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    runner = CliRunner()
    for name in ("good", "broken"):
        assert runner.invoke(cli, ["new-model", name, "--like", "llama"]).exit_code == 0
    spec = tmp_path / "model_specs" / "broken.toml"
    spec.write_text(spec.read_text().replace('model_type = "llama"', 'model_type = "nosuch"'))
    for name in ("good", "broken"):
        res = runner.invoke(cli, ["new-model", f"model_specs/{name}.toml"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["new-model", "badfile", "--like", "llama", "--explicit"])
    assert res.exit_code == 0, res.output
    model = tmp_path / "aphro_models" / "badfile.py"
    model.write_text(model.read_text().replace("class BadfileMLP(nn.Module):",
                                               "class BadfileMLP(nn.Module)"))  # no colon
    yield ["GoodForCausalLM", "BrokenForCausalLM", "BadfileForCausalLM"]
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]


def test_every_models_failure_is_in_its_row(project, monkeypatch):
    from engine.models import registry

    everything = registry.supported_architectures
    monkeypatch.setattr(registry, "supported_architectures",
                        lambda: [a for a in everything() if a in project])
    res = CliRunner().invoke(cli, ["parity-check", *FAST])
    assert res.exit_code == 1, res.output
    text = flat(res)
    assert "1/3 models pass" in text
    assert "BrokenForCausalLM: error: aphro_models.broken.BrokenForCausalLM.hf_model_type: " \
           "transformers has no model type 'nosuch'" in text
    assert "BadfileForCausalLM: error: SyntaxError" in text
    assert "Traceback" not in res.output
    # the same run as JSON keeps each error beside the reports
    res = CliRunner().invoke(cli, ["parity-check", *FAST, "--json"])
    d = json.loads(res.stdout)
    assert [r["model"] for r in d["reports"]] == ["GoodForCausalLM"] and not d["passed"]
    assert set(d["errors"]) == {"BrokenForCausalLM", "BadfileForCausalLM"}


def test_a_failure_before_loading_reports_no_load(tiny_llama_dir, monkeypatch):
    """A model that cannot even be built: the engine failure, and no word about a load."""
    from engine.models import registry
    from engine.models.llama import LlamaForCausalLM

    class Unbuildable(LlamaForCausalLM):
        def __init__(self, config, linear_method=None):
            raise RuntimeError("this model cannot be built")

    monkeypatch.setattr(registry, "_OUT_OF_TREE", {"LlamaForCausalLM": Unbuildable})
    res = check(str(tiny_llama_dir))
    assert res.exit_code == 1, res.output
    assert "engine failed" in res.output and "cannot be built" in flat(res)
    assert "load:" not in res.output


def test_a_model_that_does_not_import_is_its_rows_failure(monkeypatch):
    """The summary still comes, with the other model's pass beside it (this was exit 3)."""
    from engine.models import registry

    monkeypatch.setattr(registry, "_OUT_OF_TREE",
                        {"GoneForCausalLM": "no_such_module_of_aphro:GoneForCausalLM"})
    monkeypatch.setattr(registry, "supported_architectures",
                        lambda: ["GoneForCausalLM", "LlamaForCausalLM"])
    res = CliRunner().invoke(cli, ["parity-check", *FAST])
    assert res.exit_code == 1, res.output
    text = flat(res)
    assert "1/2 models pass" in text
    assert "GoneForCausalLM: error: ModuleNotFoundError: No module named " \
           "'no_such_module_of_aphro'" in text
