"""The spec keys that reach multipliers, scales, soft caps, per-layer windows, norm placement,
qk-norm across heads, the output-head bias, an absolute rotary width and shared experts. Each
is used by a family in model_specs/ that passes parity with HF (tests/test_families.py); here
each key is set wrong in a copy of that family's spec, served for its architecture, and the
check must fail and say where: the stage that diverges, or the checkpoint tensors that no
longer fit. LongRoPE (read from the config's rope parameters, no key) is checked against HF's
own rope function."""

from __future__ import annotations

import math

import pytest
import torch

from engine.models import registry
from engine.models.blocks import DecoderOnlyForCausalLM, packed_modules_for
from engine.spec.loader import parse_spec
from engine.validate.parity import run_parity
from engine.validate.tiny import SPECS_DIR

CPU = {"device": "cpu", "dtype": "float32", "chunked_prefill": False, "max_new_tokens": 4}
LOGITS_STAGE = "the difference arises after the last one"


def planted(family: str, *edits: tuple[str, str]) -> type:
    """The model of a copy of model_specs/<family>.toml with each (old, new) edit made."""
    text = (SPECS_DIR / f"{family}.toml").read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    spec = parse_spec(text, f"planted/{family}.toml")
    return type(spec.model.architectures[0], (DecoderOnlyForCausalLM,),
                {"arch": spec.arch, "packed_modules": packed_modules_for(spec.arch)})


def check(monkeypatch, family_checkpoint, family: str, *edits: tuple[str, str]):
    cls = planted(family, *edits)
    monkeypatch.setattr(registry, "_OUT_OF_TREE", {cls.__name__: cls})
    report = run_parity(family_checkpoint(family), **CPU)
    assert not report.passed, f"{family}: {edits} passed the parity check"
    return report


# (family, what the spec says, the wrong value, the stage named first)
DIVERGES = {
    "embedding_multiplier": ("granite", 'embedding_multiplier = "embedding_multiplier"\n', "",
                             "embeddings (input of layer 0)"),
    "residual_multiplier": ("granite", 'residual_multiplier = "residual_multiplier"\n', "",
                            "layer 0 post_attention_layernorm"),
    "attention_multiplier": ("granite", 'attention_multiplier = "attention_multiplier"\n', "",
                             "layer 0 self_attn"),
    "query_pre_attn_scalar": ("gemma2", 'query_pre_attn_scalar = "query_pre_attn_scalar"\n', "",
                              "layer 0 self_attn"),
    "attn_logit_softcap": ("gemma2", 'attn_logit_softcap = "attn_logit_softcapping"\n', "",
                           "layer 0 self_attn"),
    # without layer_types every layer slides: layer 1, a global one, then differs
    "layer_types": ("gemma2", 'layer_types = "layer_types"\n', "", "layer 1 self_attn"),
    "rotary_dim": ("gptj", 'rotary_dim = "rotary_dim"\n', "", "layer 0 attn"),
}


@pytest.mark.parametrize("case", DIVERGES, ids=list(DIVERGES))
def test_wrong_key_diverges_where_it_acts(case, monkeypatch, family_checkpoint):
    family, old, new, stage = DIVERGES[case]
    r = check(monkeypatch, family_checkpoint, family, (old, new))
    assert r.load_ok and r.failure is None, (r.load, r.failure)
    assert r.localization.first_divergence == stage, r.localization.verdict


@pytest.mark.parametrize("family, old", [
    ("granite", 'logit_divisor = "logits_scaling"\n'),
    ("cohere", 'logit_scale = "logit_scale"\n'),
    ("gemma2", 'final_logit_softcap = "final_logit_softcapping"\n'),
], ids=["logit_divisor", "logit_scale", "final_logit_softcap"])
def test_wrong_logit_key_is_placed_after_the_layers(family, old, monkeypatch, family_checkpoint):
    r = check(monkeypatch, family_checkpoint, family, (old, ""))
    assert r.load_ok and r.failure is None
    assert any(p.max_abs > r.tolerances.atol for p in r.runs[0].prompts)
    loc = r.localization
    assert loc.first_divergence is None and LOGITS_STAGE in loc.verdict, loc.verdict
    assert "output head" in loc.verdict


# (family, [(what the spec says, the wrong value)], (missing, unused, misshaped) it must list)
LOAD = {
    "norm_position post": ("olmo2", [('norm_position = "post"', 'norm_position = "pre"')],
                           ({"model.layers.0.input_layernorm.weight"},
                            {"model.layers.0.post_feedforward_layernorm.weight"}, set())),
    "norm_position sandwich": ("gemma2", [('norm_position = "sandwich"',
                                           'norm_position = "post"')],
                               (set(), {"model.layers.0.input_layernorm.weight",
                                        "model.layers.0.pre_feedforward_layernorm.weight"},
                                set())),
    "qk_norm_scope": ("olmo2", [('qk_norm_scope = "all_heads"', 'qk_norm_scope = "per_head"')],
                      (set(), set(), {"model.layers.0.self_attn.q_norm.weight",
                                      "model.layers.0.self_attn.k_norm.weight"})),
    "lm_head_bias": ("gptj", [("lm_head_bias = { value = true }\n", "")],
                     (set(), {"lm_head.bias"}, set())),
    "shared_gate": ("qwen2_moe", [('shared_gate = "sigmoid"', 'shared_gate = "none"')],
                    (set(), {"model.layers.0.mlp.shared_expert_gate.weight"}, set())),
    "shared_expert_intermediate_size": (
        "qwen2_moe",
        [('shared_expert_intermediate_size = "shared_expert_intermediate_size"\n', ""),
         ('shared_gate = "sigmoid"', 'shared_gate = "none"')],  # a gate needs a shared expert
        (set(), {"model.layers.0.mlp.shared_expert.down_proj.weight",
                 "model.layers.0.mlp.shared_expert.gate_proj.weight",
                 "model.layers.0.mlp.shared_expert_gate.weight"}, set())),
}


@pytest.mark.parametrize("case", LOAD, ids=list(LOAD))
def test_wrong_key_names_the_tensors(case, monkeypatch, family_checkpoint):
    family, edits, (missing, unused, misshaped) = LOAD[case]
    r = check(monkeypatch, family_checkpoint, family, *edits)
    assert missing <= set(r.load["missing"]), r.load
    assert unused <= set(r.load["unexpected"]), r.load
    assert misshaped <= {m["name"] for m in r.load["misshaped"]}, r.load


def test_longrope_table_is_hfs_short_then_long_frequencies():
    """Phi-3's tiny config uses LongRoPE (model_specs/phi3.toml): below
    original_max_position_embeddings the rotary table is HF's short-factor one, from there on
    its long-factor one, both times HF's attention factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.layers.rotary import get_rope, rope_params_from_config
    from engine.validate.tiny import tiny_config_for

    cfg = tiny_config_for("phi3")
    head_dim, n = cfg.hidden_size // cfg.num_attention_heads, cfg.max_position_embeddings
    original = cfg.original_max_position_embeddings
    rope = get_rope(head_dim, head_dim, n, rope_params_from_config(cfg))
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
    long, long_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=original + 1)
    assert factor == long_factor and factor > 1 and not torch.allclose(short, long)
    assert math.isclose(factor, math.sqrt(1 + math.log(n / original) / math.log(original)))
    # angles in float64; both inv_freqs are float32, an ulp apart: ~5e-5 rad by position 500
    angles = torch.cat([torch.outer(torch.arange(original).double(), short.double()),
                        torch.outer(torch.arange(original, n).double(), long.double())])
    cos, sin = rope.cos_sin_cache[:n].double().chunk(2, dim=-1)
    torch.testing.assert_close(cos, angles.cos() * factor, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin, angles.sin() * factor, atol=1e-4, rtol=0)
    # the second half, for the tokens of a prompt longer than `original`: long at every position
    long_angles = torch.outer(torch.arange(n).double(), long.double())
    cos, sin = rope.cos_sin_cache[n:].double().chunk(2, dim=-1)
    torch.testing.assert_close(cos, long_angles.cos() * factor, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin, long_angles.sin() * factor, atol=1e-4, rtol=0)


@torch.no_grad()
def hf_greedy_recomputed(hf, ids: list[int], n: int) -> list[int]:
    """HF's greedy continuation with no cache: one forward over the whole sequence a token.
    That is HF generate's LongRoPE semantics (short factors while the sequence is within the
    original length, then everything recomputed long) without relying on its cache handling,
    which transformers releases before the fix of Phi-3's prepare_inputs_for_generation
    (5.17 among them) get wrong past the switch."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_longrope_prompts_past_the_original_length_match_hf():
    """HF's Phi-3 takes the long factors for a whole forward that reaches past
    original_max_position_embeddings (128 in the tiny config): a 220-token prompt uses them at
    every position, also when it is prefilled in chunks, and a prompt just under 128 switches
    as its generation crosses it; both prompts in one batch."""
    import shutil

    from engine.checkpoint.files import load_tokenizer
    from engine.validate.compare import load_hf
    from engine.validate.parity import run_parity

    long_prompt = " ".join(f"word{i % 50}" for i in range(60))  # ~220 tokens
    short_prompt = " ".join(f"word{i % 50}" for i in range(33))  # ~120 tokens
    report = run_parity("phi3", device="cpu", dtype="float32",
                        prompts=[long_prompt, short_prompt], max_new_tokens=12, keep=True)
    try:
        hf = load_hf(report.checkpoint, torch.device("cpu"))
        tok = load_tokenizer(report.checkpoint)
        refs = [hf_greedy_recomputed(hf, list(tok.encode(t)), 12)
                for t in (long_prompt, short_prompt)]
    finally:
        shutil.rmtree(report.checkpoint, ignore_errors=True)
    lens = [p.num_prompt_tokens for p in report.runs[0].prompts]
    assert lens[0] > 128 and 110 < lens[1] < 128 and lens[1] + 12 > 128, lens
    assert [r.name for r in report.runs] == ["batched", "chunked"]
    for run in report.runs:
        for p, ref in zip(run.prompts, refs):
            assert p.logits_ok, (run.name, p.index, p.max_abs)
            assert p.engine_tokens == ref, (run.name, p.index, p.greedy_note)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_longrope_switch_keeps_hf_tokens_through_the_prefix_cache(async_scheduling,
                                                                   family_checkpoint):
    """HF (hf_greedy_recomputed) switches a Phi-3 sequence to the long factors once it passes
    the original length (128), recomputing it; the engine does too, also with the token at the
    switch still on the device (async). The prefix cache keeps the two encodings apart: a long
    prompt's blocks never serve a shorter prompt with the same tokens, and a prompt served
    twice reuses its blocks."""
    from engine import LLM, SamplingParams
    from engine.validate.compare import load_hf

    ckpt, cpu = family_checkpoint("phi3"), torch.device("cpu")
    long = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    short = long[:122]  # its 12 new tokens cross 128
    hf = load_hf(ckpt, cpu)
    ref = {n: hf_greedy_recomputed(hf, ids, 12) for n, ids in (("long", long),
                                                                  ("short", short))}
    with LLM(str(ckpt), device="cpu", dtype="float32",
             async_scheduling=async_scheduling) as llm:
        def run(ids, n):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            out = llm.generate(prompt_token_ids=[ids], sampling_params=params)[0]
            return out.outputs[0].token_ids, out.metrics["num_cached_tokens"]

        assert run(long, 12)[0] == ref["long"]
        # 2 tokens stay below 128: short factors, so none of the long prompt's blocks serve
        assert run(short, 2) == (ref["short"][:2], 0)
        assert run(short, 12)[0] == ref["short"]  # past 128: recomputed long
        tokens, cached = run(long, 12)
        assert tokens == ref["long"] and cached > 0
        llm.engine.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_longrope_preempted_on_the_step_it_crosses_stays_hfs(async_scheduling,
                                                              family_checkpoint):
    """B (122 tokens) is preempted by the older A exactly when it reaches 129 tokens (10 KV
    blocks of 16): it is recomputed with the long factors, as HF generate recomputes it, not
    with the short ones it was computed with so far."""
    from test_async_scheduling import finished_outputs

    from engine import LLM, SamplingParams
    from engine.validate.compare import load_hf

    ckpt, cpu = family_checkpoint("phi3"), torch.device("cpu")
    gen = torch.Generator().manual_seed(3)
    b = torch.randint(0, 512, (150,), generator=gen).tolist()[:122]
    a = torch.randint(0, 512, (26,), generator=gen).tolist()
    ref = hf_greedy_recomputed(load_hf(ckpt, cpu), b, 12)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(ckpt), device="cpu", dtype="float32", num_kv_blocks=10, block_size=16,
             max_model_len=160, async_scheduling=async_scheduling) as llm:
        eng = llm.engine
        eng.add_request(None, params, prompt_token_ids=a, request_id="A")
        eng.add_request(None, params, prompt_token_ids=b, request_id="B")
        done = finished_outputs(eng)
        eng.check_invariants()
    assert done["B"].metrics["num_preemptions"] == 1  # the case under test happened
    assert done["B"].outputs[0].token_ids == ref


@pytest.mark.parametrize("family, tp, groups", [
    ("olmo2", 2, {"qkv", "gate_up", "down"}),
    ("olmo2", 4, {"qkv", "gate_up", "down"}),  # 2 KV heads on 4 ranks: k_norm replicated too
    ("qwen2_moe", 2, {"experts", "router"}),
    ("gemma2", 2, {"gate_up", "down"}),
], ids=["olmo2-tp2", "olmo2-tp4", "qwen2_moe-tp2", "gemma2-tp2"])
def test_new_mechanisms_shard(family, tp, groups, family_checkpoint):
    """qk-norm across heads (its weight cut like the heads, its mean square summed over the
    ranks), shared experts and per-layer windows, over tensor-parallel ranks."""
    from engine.validate.sharding import verify_sharding

    report = verify_sharding(family_checkpoint(family), tp)
    assert report.ok, [(p.name, p.problem) for p in report.failures()]
    assert groups <= {g.group for g in report.groups()}
    assert report.greedy_match and report.logits_max_abs < 1e-4
    if family == "olmo2":
        k_norm = next(p for p in report.params if p.name.endswith("0.self_attn.k_norm.weight"))
        assert ("replicated" in k_norm.sharding) == (tp == 4), k_norm.sharding
