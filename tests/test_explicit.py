"""Explicit model files (`aphro new-model NAME --like FAMILY --explicit`) go through exactly the
checks generated models do: parity with HF at every position, the tensor-parallel sharding
check, and localization of a planted bug (the same plants, made in the spec of a generated
model and in the text of an explicit one, are found at the same place). A hand edit that breaks
an explicit file is caught and localized; a class that breaks the model contract is told which
piece it lacks."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from test_families import check_family  # the same parity assertions as every family

from aphro_cli.main import cli
from engine import LLM
from engine.errors import ModelContractError
from engine.models import registry
from engine.models.blocks import DecoderOnlyForCausalLM, packed_modules_for
from engine.models.contract import check_model_class
from engine.spec.loader import parse_spec
from engine.validate.parity import run_parity
from engine.validate.sharding import verify_sharding
from engine.validate.tiny import SPECS_DIR

CPU = {"device": "cpu", "dtype": "float32", "chunked_prefill": False, "max_new_tokens": 4}
ARCH = {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """written(family) -> the source of `aphro new-model explicit_<family> --like <family>
    --explicit`, served for the family's own architecture (as a ported model would be)."""
    out = tmp_path_factory.mktemp("explicit")
    made = {}

    def get(family: str) -> str:
        if family not in made:
            res = CliRunner().invoke(cli, [
                "new-model", f"explicit_{family}", "--like", family, "--explicit",
                "--arch", ARCH[family], "--model-type", family, "--out-dir", str(out)])
            assert res.exit_code == 0, res.output
            made[family] = (out / f"explicit_{family}.py").read_text()
        return made[family]

    return get


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(family, source, *edits): the family's architecture is served by `source` (an
    explicit model file) with each (old, new) edit made, until the test ends."""
    monkeypatch.syspath_prepend(str(tmp_path))  # tensor-parallel workers inherit the path
    monkeypatch.setattr(registry, "_OUT_OF_TREE", {})

    def use(family: str, source: str, *edits: tuple[str, str]) -> None:
        for old, new in edits:
            assert source.count(old) == 1, old
            source = source.replace(old, new)
        module = f"served_{family}_{abs(hash(source)) % 10**8}"
        (tmp_path / f"{module}.py").write_text(source)
        registry.register_model(ARCH[family], f"{module}:{ARCH[family]}")

    return use


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_explicit_file_passes_parity(family, written, serve):
    serve(family, written(family))
    assert registry.load_class(registry.resolve(ARCH[family])).__module__.startswith("served_")
    check_family(SPECS_DIR / f"{family}.toml")


def test_explicit_phi3_takes_longrope_past_the_original_length(written, serve):
    """The explicit file's attention applies the rotary with attn_metadata.long_rope: a
    220-token prompt (the tiny original length is 128) and one that grows past 128 match HF,
    as the generated model's do (test_spec_mechanisms; the same no-cache HF greedy reference)."""
    from test_spec_mechanisms import test_longrope_prompts_past_the_original_length_match_hf

    serve("phi3", written("phi3"))
    test_longrope_prompts_past_the_original_length_match_hf()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_explicit_file_passes_the_sharding_check(family, written, serve, family_checkpoint):
    serve(family, written(family))
    report = verify_sharding(family_checkpoint(family), 2)
    assert report.ok, [(p.name, p.problem) for p in report.failures()]
    groups = {g.group for g in report.groups()}
    assert {"embedding", "qkv", "o_proj", "gate_up", "down", "norms", "lm_head"} <= groups
    assert report.greedy_match and report.logits_max_abs < 1e-4


# the same bug, planted in the spec (generated tier) and in the file (explicit tier)
PLANTS = {
    "gate and up swapped": (
        ('gate_up = ["gate_proj", "up_proj"]', 'gate_up = ["up_proj", "gate_proj"]'),
        [('"gate_proj": ("gate_up_proj", 0)', '"gate_proj": ("gate_up_proj", 1)'),
         ('"up_proj": ("gate_up_proj", 1)', '"up_proj": ("gate_up_proj", 0)')],
        "layer 0 mlp"),
    "rope style": (
        ('rope_style = "neox"', 'rope_style = "gptj"'),
        [("is_neox_style=True", "is_neox_style=False")],
        "layer 0 self_attn"),
}


@pytest.mark.parametrize("tier", ["generated", "explicit"])
@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_planted_bug_is_localized_alike_in_both_tiers(tier, plant, written, serve, monkeypatch,
                                                      tiny_llama_dir):
    in_spec, in_file, stage = PLANTS[plant]
    if tier == "generated":
        text = (SPECS_DIR / "llama.toml").read_text()
        assert text.count(in_spec[0]) == 1
        spec = parse_spec(text.replace(*in_spec), "planted/llama.toml")
        cls = type("LlamaForCausalLM", (DecoderOnlyForCausalLM,),
                   {"arch": spec.arch, "packed_modules": packed_modules_for(spec.arch)})
        monkeypatch.setattr(registry, "_OUT_OF_TREE", {"LlamaForCausalLM": cls})
    else:
        serve("llama", written("llama"), *in_file)
    r = run_parity(tiny_llama_dir, **CPU)
    assert not r.passed and r.load_ok and r.failure is None
    assert r.localization.first_divergence == stage, r.localization.verdict


def test_unloaded_tensor_is_named_alike_in_both_tiers(written, serve, tiny_llama_dir):
    serve("llama", written("llama"), ('skip=("rotary_emb.inv_freq",)',
                                      'skip=("rotary_emb.inv_freq", "layers.1.mlp.down_proj")'))
    r = run_parity(tiny_llama_dir, **CPU)
    assert r.load["missing"] == ["model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize("edit, stage", [
    # LongRoPE dropped: the rotary table without the tiny config's short factors
    (("rope = rope_params_from_config(config)", 'rope = {"rope_theta": 10000.0}'),
     "layer 0 self_attn"),
    # k and v read from each other's rows of the fused qkv_proj
    (("q, k, v = qkv.split(", "q, v, k = qkv.split("), "layer 0 self_attn"),
    # the MLP's input norm skipped
    (("hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
      "hidden_states = residual = hidden_states + residual"), "layer 0 mlp"),
], ids=["longrope-dropped", "k-v-swapped", "norm-skipped"])
def test_hand_edit_that_breaks_the_file_is_caught_and_localized(edit, stage, written, serve,
                                                                family_checkpoint):
    source = written("phi3")
    if "post_attention_layernorm" in edit[0]:  # still loads: the norm's weight goes unused
        source = source.replace('skip=("rotary_emb.inv_freq",)',
                                'skip=("rotary_emb.inv_freq", "post_attention_layernorm")')
    serve("phi3", source, edit)
    r = run_parity(family_checkpoint("phi3"), **CPU)
    assert not r.passed and r.failure is None
    assert r.localization.first_divergence == stage, r.localization.verdict


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_explicit_file_is_ruff_clean(written, tmp_path):
    path = tmp_path / "explicit_llama.py"
    path.write_text(written("llama"))
    for args in (["format", "--check"], ["check", "--select", "E,F,I,W"]):
        res = subprocess.run(["ruff", *args, "--line-length", "100", str(path)],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


# -- the contract ------------------------------------------------------------------------------
def _llama_class(**overrides) -> type:
    from engine.models.llama import LlamaForCausalLM

    return type("BrokenLlama", (LlamaForCausalLM,), overrides)


@pytest.mark.parametrize("overrides, named", [
    ({"compute_logits": None}, "has no compute_logits(hidden) method"),
    ({"forward": lambda self, input_ids, positions: None},
     ("forward(input_ids, positions) does not take the contract's forward(input_ids, positions, "
     "kv_caches, attn_metadata)")),
    ({"load_weights": lambda self: None}, ("load_weights() does not take the contract's "
                                          "load_weights(weights)")),
], ids=["no-compute-logits", "short-forward", "load-weights-without-weights"])
def test_a_class_missing_a_method_is_refused_when_registered(overrides, named, monkeypatch):
    monkeypatch.setattr(registry, "_OUT_OF_TREE", {})
    with pytest.raises(ModelContractError, match="BrokenLlama") as e:
        registry.register_model("BrokenForCausalLM", _llama_class(**overrides))
    assert named in str(e.value)
    with pytest.raises(ModelContractError, match="is not a torch.nn.Module"):
        check_model_class(type("NotAModule", (), {}))


def _broken_init(attr: str):
    from engine.models.llama import LlamaForCausalLM

    def init(self, config, linear_method=None):
        LlamaForCausalLM.__init__(self, config, linear_method)
        if attr == "num_kv_heads":
            del self.num_kv_heads
        elif attr == "norm":  # a plain torch layer: no sharding description
            self.model.norm = torch.nn.LayerNorm(config.hidden_size)
    return init


@pytest.mark.parametrize("cls_body, named", [
    ({"__init__": _broken_init("num_kv_heads")}, "BrokenLlama.num_kv_heads is None"),
    ({"__init__": _broken_init("norm")},
     ("model.norm (LayerNorm) holds parameters weight, bias but does not describe their "
     "sharding (tp_shard_spec)")),
    ({"load_weights": lambda self, weights: None}, ("BrokenLlama.load_weights returned "
                                                   "NoneType, not the LoadTracker")),
], ids=["no-kv-heads", "undescribed-sharding", "no-load-report"])
def test_a_model_breaking_the_contract_when_built_gets_the_named_error(
        cls_body, named, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr(registry, "_OUT_OF_TREE", {"LlamaForCausalLM": _llama_class(**cls_body)})
    with pytest.raises(ModelContractError) as e:
        LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=8)
    assert named in str(e.value)


def test_a_string_target_is_checked_when_loaded(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "half_done.py").write_text(
        "from torch import nn\n\n\nclass HalfDone(nn.Module):\n"
        "    def forward(self, input_ids, positions, kv_caches, attn_metadata):\n"
        "        return input_ids\n")
    monkeypatch.setattr(registry, "_OUT_OF_TREE", {})
    registry.register_model("HalfDoneForCausalLM", "half_done:HalfDone")  # not imported yet
    with pytest.raises(ModelContractError, match=r"half_done:HalfDone: HalfDone has no "
                                                 r"compute_logits\(hidden\) method"):
        registry.load_model_class(["HalfDoneForCausalLM"])
