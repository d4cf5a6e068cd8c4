"""Planted porting bugs: each is a copy of the correct Llama spec with one key wrong (or one
module changed), served for LlamaForCausalLM in this test only. The checker must fail every
one, and say where: a checker that passes a planted bug is a defect."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.layers.attention import PagedAttention
from engine.models import registry
from engine.models.blocks import DecoderOnlyForCausalLM, packed_modules_for
from engine.spec.loader import parse_spec
from engine.validate.parity import run_parity
from engine.validate.tiny import SPECS_DIR

CPU = {"device": "cpu", "dtype": "float32", "chunked_prefill": False, "max_new_tokens": 4}
LLAMA_SPEC = (SPECS_DIR / "llama.toml").read_text()


def planted(old: str, new: str) -> type:
    """The Llama model of a copy of model_specs/llama.toml with `old` replaced by `new`."""
    assert LLAMA_SPEC.count(old) == 1, old
    spec = parse_spec(LLAMA_SPEC.replace(old, new), "planted/llama.toml")
    return type("PlantedLlama", (DecoderOnlyForCausalLM,),
                {"arch": spec.arch, "packed_modules": packed_modules_for(spec.arch)})


@pytest.fixture
def serve(monkeypatch):
    """serve(cls): LlamaForCausalLM checkpoints load into `cls` until the test ends."""
    def use(cls: type) -> None:
        monkeypatch.setattr(registry, "_OUT_OF_TREE", {"LlamaForCausalLM": cls})
    return use


def check_fails(ckpt) -> dict:
    report = run_parity(ckpt, **CPU)
    assert not report.passed, "a planted bug passed the parity check"
    return report


def test_the_unplanted_copy_passes(serve, tiny_llama_dir):
    """The copy mechanism itself is sound: an unchanged copy passes."""
    serve(planted('rope_style = "neox"', 'rope_style = "neox"'))
    assert run_parity(tiny_llama_dir, **CPU).passed


def test_wrong_rope_style_fails_in_layer_0_attention(serve, tiny_llama_dir):
    serve(planted('rope_style = "neox"', 'rope_style = "gptj"'))
    r = check_fails(tiny_llama_dir)
    assert r.load_ok and r.failure is None
    assert r.localization.first_divergence == "layer 0 self_attn"
    assert r.localization.first_module == "model.layers.0.self_attn"


def test_swapped_gate_and_up_fail_in_layer_0_mlp(serve, tiny_llama_dir):
    serve(planted('gate_up = ["gate_proj", "up_proj"]', 'gate_up = ["up_proj", "gate_proj"]'))
    r = check_fails(tiny_llama_dir)
    assert r.load_ok  # every tensor loaded, just into the wrong half
    assert r.localization.first_divergence == "layer 0 mlp"


def test_wrong_norm_epsilon_key_fails_at_the_first_norm(serve, tiny_llama_dir):
    # reads a key Llama configs lack, so its default (1e-6) replaces rms_norm_eps (1e-5)
    serve(planted('norm_eps = "rms_norm_eps"',
                  'norm_eps = { key = "layer_norm_eps", default = 1e-6 }'))
    r = check_fails(tiny_llama_dir)
    assert r.load_ok
    assert r.localization.first_divergence == "layer 0 input_layernorm"
    assert max(p.max_abs for p in r.runs[0].prompts) > r.tolerances.atol


def test_checkpoint_tensor_left_unloaded_is_named(serve, tiny_llama_dir):
    serve(planted('ignore = ["rotary_emb.inv_freq"]',
                  'ignore = ["rotary_emb.inv_freq", "layers.1.post_attention_layernorm"]'))
    r = check_fails(tiny_llama_dir)
    assert r.load["missing"] == ["model.layers.1.post_attention_layernorm.weight"]
    assert any("load_weights" in h for h in r.load_hints)
    d = r.to_dict()
    assert d["load_ok"] is False and d["load"]["missing"]


def test_wrong_kv_head_count_is_a_clear_error(serve, tiny_llama_dir):
    serve(planted('kind = "gqa"', 'kind = "mha"'))  # 4 KV heads for a 2-KV-head checkpoint
    r = check_fails(tiny_llama_dir)
    names = {m["name"] for m in r.load["misshaped"]}
    assert "model.layers.0.self_attn.k_proj.weight" in names
    assert "model.layers.0.self_attn.v_proj.weight" in names
    assert all(m["expected"][0] == 2 * m["got"][0] for m in r.load["misshaped"])
    assert any("number of KV heads" in h for h in r.load_hints)


def test_kv_heads_wrong_only_in_attention_names_the_module(serve, tiny_llama_dir):
    """Weights load, but the attention layer is told another KV-head count: the forward raises,
    and the report names the module instead of a traceback."""
    correct = planted('kind = "gqa"', 'kind = "gqa"')

    class WrongKVAttention(correct):
        def __init__(self, config, linear_method=None):
            super().__init__(config, linear_method)
            for m in self.modules():
                if isinstance(m, PagedAttention):
                    m.num_kv_heads = m.num_heads

    serve(WrongKVAttention)
    r = check_fails(tiny_llama_dir)
    assert r.failure is not None and r.failure.stage == "engine (batched run)"
    assert r.failure.module == "model.layers.0.self_attn.attn"
    assert r.failure.error.startswith("RuntimeError")


def test_cli_fails_with_exit_1_and_names_the_sub_layer(serve, tiny_llama_dir):
    serve(planted('gate_up = ["gate_proj", "up_proj"]', 'gate_up = ["up_proj", "gate_proj"]'))
    res = CliRunner().invoke(cli, ["parity-check", str(tiny_llama_dir), "--device", "cpu",
                                   "--no-chunked", "--max-new-tokens", "2"])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.stdout
    assert "first divergence: layer 0 mlp" in " ".join(res.stdout.split())
