"""Quantized models under tensor parallel (CPU, gloo, every rank a worker process): the
quantized weights and their scales, put back together from the ranks, equal TP=1's bit for bit
(row-parallel layers' ranks agree on each channel's scale; KV heads, with their scales,
replicated when fewer than ranks), and TP=2 gives the greedy tokens of TP=1 wherever the
activations are quantized alike at both sizes: weight-only int8, and FP8 with static activation
scales. With dynamic per-token FP8 activations a row-parallel layer's ranks each scale their
slice of a token (as vLLM does; one scale for the whole row would cost a collective per layer),
so TP=2 differs from TP=1 by FP8 rounding: it must agree within the FP8 tolerances."""

from __future__ import annotations

import pytest
from quant_checkpoints import calibrate, write_fp8_checkpoint

from engine import LLM, SamplingParams
from engine.validate.report import QUANTIZED_TOLERANCES
from engine.validate.sharding import verify_sharding
from engine.validate.tiny import tiny_llama_config

PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "a",
           "tensor parallel layers own their shard of every weight"]


@pytest.fixture(scope="module")
def mqa_dir(make_checkpoint):
    """One KV head: at TP=2 both ranks hold it (and its scales)."""
    return make_checkpoint(tiny_llama_config(num_key_value_heads=1), "tiny_llama_mqa")


@pytest.fixture(scope="module")
def fp8_static_dir(mqa_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fp8_static") / "ckpt"
    write_fp8_checkpoint(mqa_dir, ckpt, "fp8", input_amax=calibrate(mqa_dir, [[0, 5, 9, 300]]))
    return ckpt


def greedy_tokens(ckpt, tp: int, **options) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(str(ckpt), device="cpu", tensor_parallel_size=tp, num_kv_blocks=64,
             **options) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("case", ["int8", "fp8-checkpoint"])
def test_tp2_gives_the_tokens_of_tp1(case, mqa_dir, fp8_static_dir):
    ckpt, options = ((fp8_static_dir, {}) if case == "fp8-checkpoint"
                     else (mqa_dir, {"quantization": case}))
    assert greedy_tokens(ckpt, 2, **options) == greedy_tokens(ckpt, 1, **options)


@pytest.mark.parametrize("case", ["int8", "fp8-checkpoint", "fp8"])
def test_quantized_shards_reassemble_bit_for_bit(case, mqa_dir, fp8_static_dir):
    ckpt, quant = (fp8_static_dir, None) if case == "fp8-checkpoint" else (mqa_dir, case)
    report = verify_sharding(ckpt, 2, quantization=quant, decode_steps=8)
    assert report.ok, [(p.name, p.problem) for p in report.failures()]
    checks = {p.name: p for p in report.params}
    qkv_scale = checks["model.layers.0.self_attn.qkv_proj.weight_scale"]
    assert "replicated k x2" in qkv_scale.sharding  # the KV head's rows (and scales) on both
    assert checks["model.layers.0.mlp.down_proj.weight_scale"].sharding == "replicated"
    assert checks["model.layers.0.mlp.down_proj.weight"].sharding == "dim 1"
    if case == "fp8-checkpoint":
        assert checks["model.layers.0.self_attn.qkv_proj.input_scale"].sharding == "replicated"
    if case == "fp8":  # per-rank activation scales: within FP8's own tolerance of TP=1
        assert report.top1_agreement >= QUANTIZED_TOLERANCES["fp8"].min_top1
        assert report.logits_max_rel > 1e-3  # the slices' scales do differ
    else:
        assert report.greedy_match and report.top1_agreement == 1
        assert report.logits_max_rel < 1e-5
