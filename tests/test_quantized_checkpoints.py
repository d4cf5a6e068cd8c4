"""Checkpoints already quantized to FP8, in both layouts, written by the tests themselves
(tests/quant_checkpoints.py): `quant_method: "fp8"` (per-tensor weight scales, static or dynamic
activations, ignored_layers) and compressed-tensors float-quantized (channel or tensor weight
scales, dynamic per-token activations, ignore with patterns). Each loads cleanly, computes what HF
computes with the same quantization simulated, and matches the same model quantized at load time;
a scale that is missing or misshaped, or a quantized tensor where the model expects none, is an
error naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from quant_checkpoints import (
    agreement,
    calibrate,
    engine_logits,
    fake_quant_hf,
    hf_logits,
    write_fp8_checkpoint,
)
from safetensors.torch import load_file, save_file

from aphro_cli.main import cli
from engine import LLM
from engine.checkpoint.report import non_strict_loading
from engine.errors import CheckpointError
from engine.validate.report import QUANTIZED_TOLERANCES
from engine.validate.tiny import tiny_config_for

PROMPTS = [[0, 17, 93, 260, 301, 42, 7, 255, 128, 64, 5, 388, 211, 19, 77, 450, 3],
           [0, 5, 6, 7, 100, 200, 300, 400, 11, 12], [0, 499, 1, 2, 3, 310, 311, 312, 313]]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@pytest.fixture(scope="module")
def tiny_phi3_dir(make_checkpoint):
    return make_checkpoint(tiny_config_for("phi3"), "tiny_phi3")


@pytest.fixture(scope="module")
def full(tiny_llama_dir, tiny_phi3_dir):
    return {"llama": tiny_llama_dir, "phi3": tiny_phi3_dir}


def linear_params(ckpt, **options) -> dict[str, torch.Tensor]:
    with LLM(str(ckpt), device="cpu", num_kv_blocks=64, **options) as llm:
        return {n: p.detach().clone() for n, p in llm.engine.executor.model.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def static_amax(src, bump: str | None) -> dict[str, float]:
    """Calibrated input maxima; `bump` (a layer name piece) gets 1.25x, so a fused layer's
    parts differ and the largest must be taken."""
    amax = calibrate(src, PROMPTS)
    return {k: v * (1.25 if bump and k.endswith(bump) else 1.0) for k, v in amax.items()}


# -- compressed-tensors, channel: the same bytes as quantizing at load time -------------------------
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_compressed_tensors_channel_equals_load_time_fp8(family, full, tmp_path):
    src = full[family]
    ckpt = tmp_path / "ct"
    write_fp8_checkpoint(src, ckpt, "ct-channel")
    ours, ref = linear_params(ckpt), linear_params(src, quantization="fp8")
    assert ours.keys() == ref.keys()
    bad = [n for n in ours if not same_bits(ours[n], ref[n])]
    assert not bad, bad
    assert ours["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.float8_e4m3fn
    a = engine_logits(ckpt, PROMPTS[0])
    b = engine_logits(src, PROMPTS[0], quantization="fp8")
    assert torch.equal(a, b)


# -- quant_method fp8: per-tensor scales, static activations, ignored layers ----------------------
@pytest.mark.parametrize("family,bump", [("llama", "k_proj"), ("phi3", None)])
def test_fp8_per_tensor_static_checkpoint(family, bump, full, tmp_path):
    src = full[family]
    ckpt = tmp_path / "fp8"
    ignored = "model.layers.1.mlp.down_proj"
    made = write_fp8_checkpoint(src, ckpt, "fp8", ignore=(ignored,),
                                input_amax=static_amax(src, bump))
    with LLM(str(ckpt), device="cpu", num_kv_blocks=64) as llm:  # strict: loads cleanly
        model = llm.engine.executor.model
        assert llm.engine.config.quantization.name == "fp8"
        assert llm.engine.load_report == {"missing": [], "unexpected": [], "misshaped": []}
        assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.float8_e4m3fn
        # one scale per fused part, kept: q's rows carry q's scale, k's k's, v's v's
        scales = load_file(str(ckpt / "model.safetensors"))
        rows = qkv.output_partition_sizes
        for i, piece in enumerate(["q_proj", "k_proj", "v_proj"] if family == "llama"
                                  else ["qkv_proj"]):
            s = scales[f"model.layers.0.self_attn.{piece}.weight_scale"]
            part = qkv.weight_scale[sum(rows[:i]):sum(rows[:i + 1])] if family == "llama" \
                else qkv.weight_scale
            assert torch.equal(part, s.expand(part.shape))
    hf = fake_quant_hf(src, made["weights"], "static", made["input_scales"],
                       FUSED if family == "llama" else ())
    for ids in PROMPTS:
        ref = hf_logits(hf, ids)
        ours = engine_logits(ckpt, ids)[:, : ref.shape[1]]
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # and it matches the same model quantized at load time within the fp8 tolerances
    tol = QUANTIZED_TOLERANCES["fp8"]
    a = torch.cat([engine_logits(ckpt, ids) for ids in PROMPTS])
    b = torch.cat([engine_logits(src, ids, quantization="fp8") for ids in PROMPTS])
    top1, kl = agreement(b, a)
    assert top1 >= tol.min_top1 and kl <= tol.mean_kl


def test_fp8_dynamic_and_compressed_tensors_tensor_strategy_with_a_pattern(full, tmp_path):
    src = full["llama"]
    for layout, ignore in [("fp8", ()), ("ct-tensor", (r"re:.*layers\.0\.mlp\..*",))]:
        ckpt = tmp_path / layout
        made = write_fp8_checkpoint(src, ckpt, layout, ignore=ignore)
        hf = fake_quant_hf(src, made["weights"], "dynamic")
        ref = hf_logits(hf, PROMPTS[0])
        ours = engine_logits(ckpt, PROMPTS[0])[:, : ref.shape[1]]
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), layout
    params = linear_params(ckpt)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].dtype == torch.float32
    assert params["model.layers.1.mlp.gate_up_proj.weight"].dtype == torch.float8_e4m3fn


# -- errors that name the tensor --------------------------------------------------------------------
def edit_tensors(ckpt, change) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


def load_errors(ckpt) -> tuple[str, dict]:
    with pytest.raises(CheckpointError) as info:
        LLM(str(ckpt), device="cpu", num_kv_blocks=64)
    with non_strict_loading(), LLM(str(ckpt), device="cpu", num_kv_blocks=64) as llm:
        report = llm.engine.load_report
    return str(info.value), report


def test_missing_weight_scale_is_named(full, tmp_path):
    ckpt = tmp_path / "fp8"
    write_fp8_checkpoint(full["llama"], ckpt, "fp8")
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    edit_tensors(ckpt, lambda t: t.pop(name))
    message, report = load_errors(ckpt)
    assert name in message
    part = f"{name} (part 'k' of model.layers.0.self_attn.qkv_proj.weight_scale)"
    assert report["missing"] == [part]
    result = CliRunner().invoke(cli, ["generate", str(ckpt), "-p", "hi", "--device", "cpu"])
    assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output


def test_missing_input_scale_of_a_static_checkpoint_is_named(full, tmp_path):
    ckpt = tmp_path / "fp8"
    write_fp8_checkpoint(full["llama"], ckpt, "fp8", input_amax=calibrate(full["llama"],
                                                                          PROMPTS[:1]))
    name = "model.layers.1.mlp.down_proj.input_scale"
    edit_tensors(ckpt, lambda t: t.pop(name))
    message, report = load_errors(ckpt)
    assert report["missing"] == [name] and name in message


@pytest.mark.parametrize("layout,name,bad_shape,expected", [
    ("ct-channel", "model.layers.1.self_attn.v_proj.weight_scale", (16, 1), [32, 1]),
    ("ct-channel", "model.layers.0.mlp.down_proj.weight_scale", (64,), [64, 1]),
    ("fp8", "model.layers.0.mlp.gate_proj.weight_scale", (2,), [1]),
])
def test_misshaped_weight_scale_is_named(layout, name, bad_shape, expected, full, tmp_path):
    ckpt = tmp_path / layout
    write_fp8_checkpoint(full["llama"], ckpt, layout)
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.ones(bad_shape)))
    message, report = load_errors(ckpt)
    assert name in message
    assert report["misshaped"] == [{"name": name, "expected": expected, "got": list(bad_shape)}]


def test_quantized_tensor_where_the_model_expects_none_is_named(full, tmp_path):
    """ignored_layers that do not match the tensors: FP8 bytes are never converted silently."""
    ckpt = tmp_path / "fp8"
    write_fp8_checkpoint(full["llama"], ckpt, "fp8")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["ignored_layers"] = ["model.layers.0.self_attn.o_proj"]
    (ckpt / "config.json").write_text(json.dumps(config))
    message, report = load_errors(ckpt)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert any(u.startswith(f"{name} (float8_e4m3fn, but {name} is float32")
               for u in report["unexpected"])
    assert f"{name}.weight_scale" not in report["missing"]
    assert "model.layers.0.self_attn.o_proj.weight_scale" in report["unexpected"]
    assert name in report["missing"] and name in message


def test_parity_check_refuses_a_quantized_checkpoint(full, tmp_path):
    from engine.errors import AphroError
    from engine.validate.parity import run_parity

    ckpt = tmp_path / "ct"
    write_fp8_checkpoint(full["llama"], ckpt, "ct-channel")
    with pytest.raises(AphroError, match="already quantized .*with --quantization instead"):
        run_parity(ckpt, device="cpu")


def test_flag_must_agree_with_the_checkpoint_and_kv_cache_scales_are_not_read(full, tmp_path):
    from engine.errors import ConfigError

    ckpt = tmp_path / "ct"
    write_fp8_checkpoint(full["llama"], ckpt, "ct-channel")
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.tensor(0.1),
                                           "model.layers.0.self_attn.v_scale": torch.tensor(0.1)}))
    with LLM(str(ckpt), device="cpu", num_kv_blocks=64, quantization="compressed-tensors") as llm:
        assert llm.engine.load_report["unexpected"] == []  # the KV cache stays float32
        assert llm.engine.executor.kv_caches[0].dtype == torch.float32
    with pytest.raises(ConfigError, match="already quantized \\(compressed-tensors"):
        LLM(str(ckpt), device="cpu", quantization="fp8")
