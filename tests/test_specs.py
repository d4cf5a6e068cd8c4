"""Spec validation: every committed spec loads; each kind of mistake gives one line naming the
file, the key (as its dotted TOML path, table.key) and what was expected; the CLI prints it
without a traceback."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.errors import SpecError
from engine.spec import TABLE_CLASSES, ConfigField
from engine.spec.loader import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "model_specs").glob("*.toml"))
LLAMA = (ROOT / "model_specs" / "llama.toml").read_text()


def edited(old: str, new: str, text: str = LLAMA) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_committed_specs_load(path):
    spec = load_spec(path)
    assert spec.model.name == path.stem
    assert spec.tiny, "a spec needs a [tiny] config for its parity test"


BAD = {
    "missing key": (
        edited('[attention]\nkind = "gqa"\n', "[attention]\n"),
        "attention.kind: missing; expected one of mha, mqa, gqa",
    ),
    "missing config key": (
        edited('norm_eps = "rms_norm_eps"\n', ""),
        "config.norm_eps: missing; expected the HF config key it is read from",
    ),
    "unknown key": (
        edited("qk_norm = false", "qknorm = false"),
        "attention.qknorm: unknown key; did you mean 'qk_norm'?",
    ),
    "unknown table": (
        LLAMA + "\n[atention]\nkind = 'gqa'\n",
        "table atention: unknown table; did you mean 'attention'?",
    ),
    "missing table": (LLAMA.split("[tiny]")[0], "table tiny: missing table"),
    "wrong type (bool)": (
        edited("qk_norm = false", 'qk_norm = "no"'),
        "attention.qk_norm: expected a boolean (true/false), got a string ('no')",
    ),
    "wrong type (string)": (
        edited('hidden_size = "hidden_size"', "hidden_size = 64"),
        "config.hidden_size: expected an HF config key (a string)",
    ),
    "wrong type (array)": (
        edited('ignore = ["rotary_emb.inv_freq"]', 'ignore = "rotary_emb.inv_freq"'),
        "checkpoint.ignore: expected an array of strings, got a string",
    ),
    "wrong type (int)": (
        edited('rope_style = "neox"', 'rope_style = "neox"\noffset = "2"'),
        "position.offset: expected an integer, got a string ('2')",
    ),
    "unknown enum value": (
        edited('rope_style = "neox"', 'rope_style = "neo"'),
        "position.rope_style: 'neo' is not one of neox, gptj (did you mean 'neox'?)",
    ),
    "unknown enum value (kind)": (
        edited('kind = "gated"', 'kind = "swiglu"'),
        "mlp.kind: 'swiglu' is not one of gated, plain, moe",
    ),
    "config table with key and value": (
        edited(
            'mlp_bias = { key = "mlp_bias", default = false }',
            'mlp_bias = { key = "b", value = true }',
        ),
        "config.mlp_bias: expected exactly one of `key`",
    ),
    "config table unknown key": (
        edited('mlp_bias = { key = "mlp_bias", default = false }', 'mlp_bias = { name = "b" }'),
        "config.mlp_bias.name: unknown key",
    ),
    "gqa without kv heads": (
        edited('num_kv_heads = "num_key_value_heads"\n', ""),
        "config.num_kv_heads: missing; attention kind gqa reads it",
    ),
    "separate qkv with one name": (
        edited('qkv = ["q_proj", "k_proj", "v_proj"]', 'qkv = "qkv_proj"'),
        "checkpoint.qkv: qkv_layout separate needs three names",
    ),
    "interleaved qkv with gqa": (
        edited(
            'qkv = ["q_proj", "k_proj", "v_proj"]\nqkv_layout = "separate"',
            'qkv = "query_key_value"\nqkv_layout = "interleaved"',
        ),
        "checkpoint.qkv_layout: interleaved (q, k, v per head) needs attention kind mha",
    ),
    "shared norm with sequential residual": (
        edited('residual = "sequential"', 'residual = "sequential"\nshared_norm = true'),
        "layer.shared_norm: only residual = parallel can share a norm",
    ),
    "bad module name": (
        edited('name = "llama"', 'name = "my-model"'),
        "model.name: expected a Python module name",
    ),
    "empty architectures": (
        edited('architectures = ["LlamaForCausalLM"]', "architectures = []"),
        "model.architectures: expected at least one HF class name",
    ),
    "offset without learned positions": (
        edited('rope_style = "neox"', 'rope_style = "neox"\noffset = 2'),
        "position.offset: only position kind learned takes an offset",
    ),
    "unknown norm position": (
        edited('residual = "sequential"', 'norm_position = "between"'),
        "layer.norm_position: 'between' is not one of pre, post, sandwich",
    ),
    "post norm with parallel residual": (
        edited('residual = "sequential"', 'residual = "parallel"\nnorm_position = "post"'),
        "layer.norm_position: 'post' needs residual = sequential",
    ),
    "qk-norm scope without qk-norm": (
        edited("qk_norm = false", 'qk_norm = false\nqk_norm_scope = "all_heads"'),
        "attention.qk_norm_scope: only with qk_norm = true",
    ),
    "qk-norm scope of a layer norm": (
        edited("qk_norm = false", 'qk_norm = true\nqk_norm_scope = "all_heads"').replace(
            'kind = "rms"', 'kind = "layer"'
        ),
        "attention.qk_norm_scope: all_heads needs an RMS norm kind",
    ),
    "rotary_dim and partial factor": (
        edited('head_dim = "head_dim"', 'rotary_dim = "rotary_dim"\npartial_rotary_factor = "p"'),
        "config.rotary_dim: give rotary_dim (a number of dims) or partial_rotary_factor",
    ),
    "rotary_dim without rope": (
        edited('head_dim = "head_dim"', 'rotary_dim = "rotary_dim"').replace(
            'kind = "rope"', 'kind = "none"'
        ),
        "config.rotary_dim: only position kind rope rotates",
    ),
    "two attention scales": (
        edited('head_dim = "head_dim"', 'attention_multiplier = "a"\nquery_pre_attn_scalar = "q"'),
        "config.query_pre_attn_scalar: the attention scale is attention_multiplier or",
    ),
    "layer types without a window": (
        edited('head_dim = "head_dim"', 'layer_types = "layer_types"'),
        "config.layer_types: names the layers that use sliding_window: map that too",
    ),
    "shared expert without experts": (
        edited('head_dim = "head_dim"', 'shared_expert_intermediate_size = "s"'),
        "config.shared_expert_intermediate_size: a shared expert needs mlp kind moe",
    ),
    "shared gate without a shared expert": (
        edited('kind = "gated"', 'kind = "gated"\nshared_gate = "sigmoid"'),
        "mlp.shared_gate: gates a shared expert: map config.shared_expert_intermediate_size too",
    ),
    "unknown shared gate": (
        edited('kind = "gated"', 'kind = "gated"\nshared_gate = "tanh"'),
        "mlp.shared_gate: 'tanh' is not one of none, sigmoid",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_spec_names_file_and_key(case, tmp_path):
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(LLAMA.replace('kind = "gqa"', 'kind = "gqa'))
    with pytest.raises(SpecError, match=r"broken\.toml: not valid TOML: .*line \d+") as e:
        load_spec(path)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.toml: no such spec file"):
        load_spec(tmp_path / "nope.toml")


def test_config_sources_parse():
    spec = parse_spec(LLAMA, "llama.toml")
    assert spec.arch.config.hidden_size == "hidden_size"
    assert spec.arch.config.qkv_bias == ConfigField(key="attention_bias", default=False)
    assert spec.arch.checkpoint.qkv == ("q_proj", "k_proj", "v_proj")
    assert spec.tiny["rope_parameters"]["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "case", ["unknown enum value", "missing key", "wrong type (bool)", "unknown key"]
)
def test_cli_bad_spec_exits_nonzero_without_traceback(case, tmp_path):
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out_dir = tmp_path / "models"
    result = CliRunner().invoke(cli, ["new-model", str(path), "--out-dir", str(out_dir)])
    assert result.exit_code != 0
    output = result.output
    assert "Traceback" not in output
    assert not isinstance(result.exception, SpecError) or result.exit_code == 2
    text_line = " ".join(output.split())  # rich may wrap the line at the terminal width
    assert "bad.toml" in text_line and " ".join(expected.split()) in text_line, output
    assert not out_dir.exists(), "nothing is written for a bad spec"


def test_docs_describe_every_key():
    """docs/SPEC.md names every table and every key of the format."""
    doc = (ROOT / "docs" / "SPEC.md").read_text()
    for table, cls in TABLE_CLASSES.items():
        assert f"[{table}]" in doc, f"docs/SPEC.md lacks the [{table}] table"
        for f in dataclasses.fields(cls):
            assert re.search(rf"`{f.name}`", doc), f"docs/SPEC.md lacks [{table}] {f.name}"
    assert "[tiny]" in doc


def test_config_values_are_checked_when_the_model_is_built():
    """Keys that pass the spec but meet a config value that cannot work: a ConfigError naming
    the value (layer_types of the wrong length or kind, a soft cap that is not positive)."""
    from types import SimpleNamespace

    from transformers import Gemma2Config

    from engine.errors import ConfigError
    from engine.models.blocks import Dims

    arch = load_spec(ROOT / "model_specs" / "gemma2.toml").arch
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4}
    dims = Dims.from_hf(Gemma2Config(**base), arch)

    def raw(**fields):  # a config transformers would not let through its own checks
        return SimpleNamespace(**Gemma2Config(**base).to_dict() | fields)

    assert dims.sliding_windows == (4, None) and dims.attn_scale == 256**-0.5
    with pytest.raises(ConfigError, match="layer_types=.*expected 2 entries"):
        Dims.from_hf(raw(layer_types=["sliding_attention"] * 3), arch)
    with pytest.raises(ConfigError, match="layer_types=.*each one of sliding_attention"):
        Dims.from_hf(raw(layer_types=["local", "global"]), arch)
    with pytest.raises(ConfigError, match="attn_logit_softcap = -1.0: must be a positive"):
        Dims.from_hf(raw(attn_logit_softcapping=-1.0), arch)
