"""--kv-cache-dtype fp8: keys and values stored as float8 e4m3 (saturating at +-448, no scale).

The reference is HF transformers with its attention's keys and values rounded to e4m3 the same
way (clamp, round to nearest even): the engine with an FP8 cache must then agree with it as
closely as a float32 engine agrees with plain HF. Without the rounding, HF at full precision
and the parity check's FP8 tolerances; the KV budget holds twice the bf16 blocks (four times
the float32 ones); a GPU without FP8 conversions and an unknown dtype are clear errors."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import KV_CACHE_DTYPES, EngineConfig
from engine.errors import ConfigError
from engine.validate.parity import run_parity
from engine.validate.report import default_tolerances


def e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(t.dtype)


@pytest.fixture
def hf_with_e4m3_kv(monkeypatch):
    """HF Llama's eager attention, fed keys and values rounded to e4m3."""
    import transformers.models.llama.modeling_llama as llama

    original = llama.eager_attention_forward

    def rounded(module, query, key, value, *args, **kwargs):
        return original(module, query, e4m3(key), e4m3(value), *args, **kwargs)

    monkeypatch.setattr(llama, "eager_attention_forward", rounded)


def test_fp8_cache_equals_hf_with_e4m3_keys_and_values(hf_with_e4m3_kv):
    strict = default_tolerances(torch.float32, "cpu")
    report = run_parity("llama", device="cpu", dtype="float32", kv_cache_dtype="fp8",
                        tolerances=strict, max_new_tokens=8)
    assert report.kv_cache_dtype == "fp8"
    assert report.passed, [(r.name, p.max_abs, p.greedy_note) for r in report.runs
                           for p in r.prompts]


def test_fp8_cache_is_not_the_full_precision_one_and_passes_fp8_tolerances():
    full = run_parity("llama", device="cpu", dtype="float32", max_new_tokens=8)
    fp8 = run_parity("llama", device="cpu", dtype="float32", kv_cache_dtype="fp8",
                     max_new_tokens=8)
    worst = max(p.max_abs for r in fp8.runs for p in r.prompts)
    assert full.passed and max(p.max_abs for r in full.runs for p in r.prompts) < 1e-4
    assert fp8.passed and worst > 1e-3, worst  # rounded keys and values: visibly not exact
    assert fp8.tolerances == default_tolerances(torch.float32, "cpu", "fp8")


def test_fp8_cache_holds_more_blocks_and_generates(tiny_llama_dir):
    budget = 1 << 20
    blocks = {}
    for kv in ("auto", "fp8"):
        with LLM(str(tiny_llama_dir), device="cpu", dtype="float32", kv_cache_bytes=budget,
                 kv_cache_dtype=kv) as llm:
            blocks[kv] = llm.engine.num_kv_blocks
            out = llm.generate(["the quick brown fox"],
                               SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 6
            want = torch.float32 if kv == "auto" else torch.float8_e4m3fn
            # TP=1: the executor is the ModelRunner itself
            assert {c.dtype for c in llm.engine.executor.kv_caches} == {want}
    # float32 -> 1 byte per element: four times the blocks for the same bytes
    assert blocks["fp8"] == 4 * blocks["auto"], blocks


def test_kv_cache_dtype_errors(tiny_llama_dir, monkeypatch):
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4'"):
        EngineConfig.create(str(tiny_llama_dir), device="cpu", kv_cache_dtype="int4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr("engine.config.resolve_device", lambda d: torch.device("cuda"))
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        EngineConfig.create(str(tiny_llama_dir), device="cuda", kv_cache_dtype="fp8")


def test_cli_offers_the_engines_values_and_refuses_others():
    """--kv-cache-dtype lists engine.config.KV_CACHE_DTYPES (read from the engine, not
    spelled again) and a value outside them is a usage error naming the choices."""
    from click.testing import CliRunner

    from aphro_cli.main import cli

    res = CliRunner().invoke(cli, ["bench", "latency", "--kv-cache-dtype", "int4"])
    assert res.exit_code == 2
    assert all(v in res.output for v in KV_CACHE_DTYPES), res.output
