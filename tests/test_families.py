"""Every model family generated from model_specs/ against HF transformers (float32, CPU): a tiny
random checkpoint from the spec's [tiny] config, prompts of different lengths batched through
the paged engine (prefill, then greedy decode through the KV cache); the logits at every prefill
and decode position within 1e-4 of HF's, and the same greedy continuation. Plus the fused MoE
layer against a per-token reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layers.activation import get_gated_act
from engine.layers.moe import fused_experts, select_experts

SPECS_DIR = Path(__file__).resolve().parent.parent / "model_specs"
FAMILIES = sorted(p.stem for p in SPECS_DIR.glob("*.toml"))
PROMPTS = [
    "hello",
    "a",
    "the quick brown fox jumps over the lazy dog and then",  # > one 16-token block
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
]
NEW_TOKENS = 8
ATOL = 1e-4


def check_family(spec_path: Path) -> None:
    """Parity of one spec's generated model, asserting every position and the continuation."""
    from engine.validate.parity import run_parity

    report = run_parity(
        spec_path,
        dtype="float32",
        device="cpu",
        prompts=PROMPTS,
        max_new_tokens=NEW_TOKENS,
        chunked_prefill=False,
        tolerances={"atol": ATOL, "rtol": 0.0},
    )
    assert report.failure is None, f"the engine failed: {report.failure}"
    assert report.load_ok, f"checkpoint tensors missing/unused/misshaped: {report.load}"
    for run in report.runs:
        for p in run.prompts:
            where = f"{spec_path.stem} {run.name} prompt {p.index} ({p.num_prompt_tokens} tokens)"
            assert p.num_positions == p.num_prompt_tokens + NEW_TOKENS - 1, where
            assert p.max_abs <= ATOL, (
                f"{where}: max |logit - HF| = {p.max_abs:.2e} at position {p.worst_position}"
            )
            assert p.engine_tokens == p.hf_tokens, f"{where}: greedy differs: {p.greedy_note}"
    assert report.passed


def test_every_spec_has_a_generated_module():
    models = Path(__file__).resolve().parent.parent / "engine" / "models"
    assert FAMILIES, "no specs found"
    for name in FAMILIES:
        assert (models / f"{name}.py").is_file(), f"run `aphro new-model {name}`"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_hf(family):
    check_family(SPECS_DIR / f"{family}.toml")


def _moe_reference(x, w13, w2, weights, ids, act):
    """Token by token, expert by expert: the definition the fused layer must equal."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            out[t] += weights[t, j] * (act(x[t : t + 1] @ w13[e].t()) @ w2[e].t())[0]
    return out


@pytest.mark.parametrize("batched", [False, True])
def test_fused_moe_matches_per_token_reference(batched):
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 13, 16, 24, 5, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = select_experts(logits, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(tokens))
    act = get_gated_act("silu")
    got = fused_experts(x, w13, w2, weights, ids, act, batched=batched)
    want = _moe_reference(x, w13, w2, weights, ids, act)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_moe_expert_without_tokens():
    """An expert no token is routed to contributes nothing (and the padded path copes)."""
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    weights = torch.full((3, 2), 0.5)
    act = get_gated_act("silu")
    a = fused_experts(x, w13, w2, weights, ids, act, batched=True)
    b = fused_experts(x, w13, w2, weights, ids, act, batched=False)
    torch.testing.assert_close(a, b)
