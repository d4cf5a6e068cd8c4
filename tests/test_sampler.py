"""Sampler against plain-Python references computed here, row by row."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence
from engine.runner.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p_min_p,
)

VOCAB = 32


def make_seq(prompt=(1, 2, 3), output=(), index: int = 0, **params) -> Sequence:
    seq = Sequence("req", list(prompt), SamplingParams(**params), index=index)
    seq.output_token_ids = list(output)
    return seq


def build(seqs: list[Sequence], eos: tuple[int, ...] = ()) -> SamplingMetadata:
    return SamplingMetadata.build(seqs, "cpu", list(eos))


def randn(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def ref_argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda i: (row[i], -i))


def ref_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_allowed(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens top-k, then top-p, then min-p keep (row already divided by temperature)."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    allowed = set(order)
    if top_k > 0:
        kth = row[order[min(top_k, len(row)) - 1]]
        allowed = {i for i in order if row[i] >= kth}
    if top_p < 1:
        probs = ref_softmax([row[i] if i in allowed else -math.inf for i in range(len(row))])
        kept, mass = set(), 0.0
        for i in order:
            if i in allowed and mass < top_p:
                kept.add(i)
            mass += probs[i]
        allowed = kept
    if min_p > 0:
        probs = ref_softmax([row[i] if i in allowed else -math.inf for i in range(len(row))])
        allowed = {i for i in allowed if probs[i] >= min_p * max(probs)}
    return allowed


def ref_penalize(row: list[float], prompt: list[int], output: list[int], rep: float,
                 presence: float, frequency: float) -> list[float]:
    row = list(row)
    for t in set(prompt) | set(output):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    for t in set(output):
        row[t] -= frequency * output.count(t) + presence
    return row


def chi_square(counts: torch.Tensor, probs: list[float]) -> float:
    total = counts.sum().item()
    return sum((counts[i].item() - total * p) ** 2 / (total * p) for i, p in enumerate(probs)
               if p > 0)


# -- greedy ---------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = randn(6, VOCAB)
    seqs = [make_seq(temperature=0.0) for _ in range(6)]
    meta = build(seqs)
    assert meta.all_greedy and not meta.do_penalties and meta.output_tokens.shape[1] == 0
    out = Sampler()(logits, meta)
    assert out.token_ids == [ref_argmax(r) for r in logits.tolist()]
    assert out.logprobs is None


def test_greedy_takes_model_dtype_logits_as_they_are():
    """All-greedy rows take bf16 logits as they are (LogitsProcessor no longer casts them):
    the tokens are the argmax of the logits' float32 values."""
    logits = randn(4, VOCAB, seed=2).to(torch.bfloat16)
    out = Sampler()(logits, build([make_seq(temperature=0.0) for _ in range(4)]))
    assert out.token_ids == [ref_argmax(r) for r in logits.float().tolist()]


def test_top_k_1_at_temperature_1_is_greedy():
    logits = randn(8, VOCAB, seed=1)
    out = Sampler()(logits, build([make_seq(temperature=1.0, top_k=1) for _ in range(8)]))
    assert out.token_ids == [ref_argmax(r) for r in logits.tolist()]


def test_mixed_greedy_and_random_rows():
    logits = randn(4, VOCAB, seed=2)
    seqs = [make_seq(temperature=0.0), make_seq(), make_seq(temperature=0.0), make_seq(seed=3)]
    out = Sampler()(logits, build(seqs))
    rows = logits.tolist()
    assert out.token_ids[0] == ref_argmax(rows[0]) and out.token_ids[2] == ref_argmax(rows[2])


# -- top-k / top-p / min-p ------------------------------------------------------------------------

FILTERS = [  # (top_k, top_p, min_p)
    (-1, 1.0, 0.0), (5, 1.0, 0.0), (1, 1.0, 0.0), (0, 0.5, 0.0), (-1, 0.9, 0.0), (8, 0.7, 0.0),
    (-1, 1.0, 0.1), (-1, 1.0, 0.5), (10, 0.8, 0.05), (VOCAB + 5, 0.3, 0.2), (3, 0.05, 0.0),
]


def filter_seqs(temperature: float = 1.0) -> list[Sequence]:
    return [make_seq(temperature=temperature, top_k=k, top_p=p, min_p=m) for k, p, m in FILTERS]


def test_filter_masks_match_reference():
    logits = randn(len(FILTERS), VOCAB, seed=4)
    masked = apply_top_k_top_p_min_p(logits.clone(), build(filter_seqs()))
    for row, (k, p, m), got in zip(logits.tolist(), FILTERS, masked.tolist()):
        allowed = ref_allowed(row, k, p, m)
        assert {i for i, x in enumerate(got) if x != -math.inf} == allowed, (k, p, m)
        assert all(got[i] == row[i] for i in allowed)  # survivors keep their logits
    disabled = masked[0]
    assert torch.equal(disabled, logits[0])


def test_filter_masks_keep_ties_at_kth_logit():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    masked = apply_top_k_top_p_min_p(logits.clone(), build([make_seq(top_k=2)]))
    assert masked.isfinite().tolist() == [[False, True, True, True, False]]


def test_filter_boundaries_are_inclusive():
    logits = torch.zeros(2, 4)  # four tokens of probability exactly 0.25
    masked = apply_top_k_top_p_min_p(logits, build([make_seq(top_p=0.5), make_seq(min_p=1.0)]))
    assert masked.isfinite().sum(dim=1).tolist() == [2, 4]  # 0.25 + 0.25 reaches top_p=0.5


def test_samples_only_come_from_allowed_tokens():
    temperature = 0.7
    logits = randn(len(FILTERS), VOCAB, seed=5)
    meta = build(filter_seqs(temperature) * 200)
    seen = [set() for _ in FILTERS]
    sampler = Sampler()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(5):
            ids = sampler(logits.repeat(200, 1), meta).token_ids
            for i, tok in enumerate(ids):
                seen[i % len(FILTERS)].add(tok)
    for row, (k, p, m), got in zip((logits / temperature).tolist(), FILTERS, seen):
        allowed = ref_allowed(row, k, p, m)
        assert got <= allowed, (k, p, m)
    assert len(seen[0]) > 5  # the unfiltered row does spread out


# -- penalties ------------------------------------------------------------------------------------

def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]] * 3)
    seqs = [make_seq(prompt=[0, 4], output=[3, 3, 2], repetition_penalty=2.0,
                     frequency_penalty=0.5, presence_penalty=0.25),
            make_seq(prompt=[0, 4], output=[3, 3, 2]),
            make_seq(prompt=[0, 4], output=[3, 3, 2], presence_penalty=-1.0)]
    meta = build(seqs)
    assert meta.do_penalties
    got = apply_penalties(logits, meta)
    # repetition on {0, 2, 3, 4}: 2/2, 0.5/2, 3/2, -2*2; then token 3: -0.5*2 - 0.25,
    # token 2: -0.5*1 - 0.25
    assert got[0].tolist() == [1.0, -1.0, -0.5, 0.25, -4.0, 1.0]
    assert got[1].tolist() == logits[1].tolist()
    assert got[2].tolist() == [2.0, -1.0, 1.5, 4.0, -2.0, 1.0]


def test_penalties_match_reference():
    logits = randn(4, VOCAB, seed=6)
    specs = [(1.3, 0.4, 0.7), (0.8, -0.5, 0.2), (1.0, 0.0, 0.0), (1.0, 1.0, -1.5)]
    seqs = [make_seq(prompt=[(3 * r + j) % VOCAB for j in range(2 + 3 * r)],
                     output=[(5 * r + j * j) % VOCAB for j in range(7 - r)],
                     repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
            for r, (rep, pres, freq) in enumerate(specs)]
    got = apply_penalties(logits.clone(), build(seqs))
    for row, seq, (rep, pres, freq), out in zip(logits.tolist(), seqs, specs, got.tolist()):
        ref = ref_penalize(row, seq.prompt_token_ids, seq.output_token_ids, rep, pres, freq)
        assert out == pytest.approx(ref, abs=1e-5)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    seq = make_seq(prompt=[0], temperature=0.0, repetition_penalty=1.5)
    assert Sampler()(logits, build([seq])).token_ids == [1]  # 3 / 1.5 = 2 < 2.5


# -- min_tokens -----------------------------------------------------------------------------------

def test_min_tokens_suppresses_eos_and_stop_ids():
    eos = (0,)
    logits = torch.zeros(3, VOCAB)
    logits[:, 0], logits[:, 7], logits[:, 9], logits[:, 4] = 10.0, 9.0, 8.0, 5.0
    seqs = [make_seq(temperature=0.0, min_tokens=2, stop_token_ids=[7]),
            make_seq(temperature=0.0, min_tokens=3, stop_token_ids=[7, 9], output=[4]),
            make_seq(temperature=0.0, min_tokens=1, output=[4])]  # reached: nothing suppressed
    assert Sampler()(logits, build(seqs, eos)).token_ids == [9, 4, 0]
    seqs[0].output_token_ids = [4, 4]
    assert Sampler()(logits[:1], build(seqs[:1], eos)).token_ids == [0]


def test_min_tokens_suppresses_when_sampling():
    logits = torch.zeros(400, VOCAB)
    logits[:, 0] = logits[:, 5] = 4.0
    seqs = [make_seq(min_tokens=1, stop_token_ids=[5, VOCAB + 3]) for _ in range(400)]
    ids = Sampler()(logits, build(seqs, eos=(0,))).token_ids
    assert 0 not in ids and 5 not in ids


# -- seeds ----------------------------------------------------------------------------------------

def step_logits(key: int, step: int) -> torch.Tensor:
    return randn(VOCAB, seed=1000 * key + step, scale=1.0)


def run_steps(batches: list[list[tuple[int, Sequence]]], sampler: Sampler) -> None:
    """Each step: sample for the (key, seq) rows listed, append the tokens to the seqs."""
    for step, rows in enumerate(batches):
        logits = torch.stack([step_logits(key, step) for key, _ in rows])
        out = sampler(logits, build([s for _, s in rows], eos=(1,)))
        for (_, seq), tok in zip(rows, out.token_ids):
            seq.append_token(tok)


def test_seeded_request_same_alone_and_in_any_batch():
    steps = 8
    target = {"seed": 1234, "temperature": 0.9, "top_p": 0.95, "min_tokens": 3}
    alone = make_seq(**target)
    run_steps([[(0, alone)]] * steps, Sampler())

    mixed = make_seq(**target)
    others = [(1, make_seq()), (2, make_seq(seed=99)), (3, make_seq(temperature=0.0, seed=5)),
              (4, make_seq(seed=1234, index=1, repetition_penalty=1.3, top_k=4)),
              (5, make_seq(frequency_penalty=1.0, min_p=0.2))]
    batches = []
    for step in range(steps):  # the batch and the target's row change every step
        rows = others[: 1 + step % len(others)]
        rows = rows[step % 2:] + [(0, mixed)] + rows[: step % 2]
        batches.append(rows[::-1] if step % 3 == 0 else rows)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        run_steps(batches, Sampler())
    assert mixed.output_token_ids == alone.output_token_ids


def test_seeded_samples_of_one_request_differ_and_free_restarts():
    sampler = Sampler()
    a, b = make_seq(seed=3, index=0), make_seq(seed=3, index=1)
    flat = torch.zeros(2, 1000)
    first = sampler(flat, build([a, b])).token_ids
    assert first[0] != first[1]
    again = Sampler()(flat[:1], build([make_seq(seed=3)])).token_ids
    assert again == first[:1]
    assert sampler(flat[:1], build([a])).token_ids != first[:1]  # generator moved on
    sampler.free(a.seq_id)
    assert sampler(flat[:1], build([a])).token_ids == first[:1]  # fresh generator, same seed


def test_any_int_seed_is_usable():
    seqs = [make_seq(seed=-5), make_seq(seed=2**64 - 1, index=1), make_seq(seed=-(2**70))]
    assert len(Sampler()(torch.zeros(3, VOCAB), build(seqs)).token_ids) == 3


# -- distribution ---------------------------------------------------------------------------------

CHI2_DF5_P001 = 20.52  # 99.9th percentile of chi-square with 5 degrees of freedom


def test_unseeded_samples_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3, -1.0]])
    meta = build([make_seq() for _ in range(20000)])
    counts = torch.zeros(6)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(5):
            ids = Sampler()(logits.expand(20000, -1), meta).token_ids
            counts += torch.bincount(torch.tensor(ids), minlength=6)
    assert chi_square(counts, ref_softmax(logits[0].tolist())) < CHI2_DF5_P001


def test_seeded_filtered_samples_follow_renormalized_softmax():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3, -1.0, -4.0, -4.5]])
    temperature, top_k = 0.8, 6
    seqs = [make_seq(seed=s, temperature=temperature, top_k=top_k) for s in range(20000)]
    ids = Sampler()(logits.expand(20000, -1), build(seqs)).token_ids
    counts = torch.bincount(torch.tensor(ids), minlength=8)
    row = (logits[0] / temperature).tolist()
    allowed = ref_allowed(row, top_k, 1.0, 0.0)
    probs = ref_softmax([x if i in allowed else -math.inf for i, x in enumerate(row)])
    assert counts[6].item() == counts[7].item() == 0
    assert chi_square(counts, probs) < CHI2_DF5_P001


# -- logprobs -------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_top_k():
    logits = randn(5, VOCAB, seed=8)
    seqs = [make_seq(logprobs=3), make_seq(), make_seq(logprobs=0, temperature=0.0),
            make_seq(logprobs=5, temperature=0.5, repetition_penalty=2.0, top_k=2, output=[7]),
            make_seq(logprobs=VOCAB + 10)]
    out = Sampler()(logits, build(seqs))
    assert out.logprobs[1] is None
    for row, seq, tok, got in zip(logits.tolist(), seqs, out.token_ids, out.logprobs):
        k = seq.sampling_params.logprobs
        if k is None:
            continue
        top = max(row)
        lse = top + math.log(sum(math.exp(x - top) for x in row))
        ref = [x - lse for x in row]
        assert next(iter(got)) == tok  # the sampled token first
        top_ids = sorted(range(VOCAB), key=lambda i: -ref[i])[:k]
        assert set(got) == set(top_ids) | {tok}
        for i, lp in got.items():
            assert lp == pytest.approx(ref[i], abs=1e-5)


def test_rows_must_match_metadata():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(3, VOCAB), build([make_seq()]))


def test_empty_batch():
    out = Sampler()(torch.zeros(0, VOCAB), build([]))
    assert out.token_ids == [] and out.logprobs is None
