"""Scheduler: continuous batching, chunked prefill, preemption, abort, FCFS, driven by a fake
engine that also keeps a fake KV cache (token ids in slots) to prove no sequence ever reads
another's KV or a slot that was overwritten."""

from __future__ import annotations

import random

import pytest

from engine.config import SchedulerConfig
from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.errors import ConfigError

BS = 4
WAITING, RUNNING = SequenceStatus.WAITING, SequenceStatus.RUNNING


class FakeEngine:
    """schedule -> 'model' writes token ids as KV -> update -> sample -> stop after max_tokens."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False, **config) -> None:
        self.config = SchedulerConfig(**{"max_model_len": 64, **config})
        self.bm = BlockManager(num_blocks, BS, prefix_caching)
        self.sched = Scheduler(self.config, self.bm)
        self.kv: dict[int, list[int | None]] = {b: [None] * BS for b in range(num_blocks)}
        self.finished: list[Sequence] = []

    def add(self, rid: str, prompt: list[int] | int, max_tokens: int = 4) -> Sequence:
        prompt = list(range(prompt)) if isinstance(prompt, int) else prompt
        seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens))
        self.sched.add_seq(seq)
        return seq

    def run_model(self, out: SchedulerOutput) -> None:
        for seq, n in out.scheduled:
            start, tokens = seq.num_computed_tokens, seq.token_ids
            for pos in range(start):  # the context this step attends to is intact
                slot = self.kv[seq.block_table[pos // BS]][pos % BS]
                assert slot == tokens[pos], f"{seq.request_id}: KV at {pos} is {slot}"
            for pos in range(start, start + n):
                block = seq.block_table[pos // BS]
                assert self.bm.ref_counts[block] == 1, f"write into shared block {block}"
                self.kv[block][pos % BS] = tokens[pos]

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.check_output(out)
        self.run_model(out)
        for seq in self.sched.update_from_output(out):
            seq.append_token(1000 + len(seq))
            if seq.num_output_tokens == seq.sampling_params.max_tokens:
                self.sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
                self.finished.append(seq)
        self.bm.check_invariants(self.sched.running + self.sched.waiting)
        return out

    def check_output(self, out: SchedulerOutput) -> None:
        sizes = [n for _, n in out.scheduled]
        assert sizes == sorted(sizes, key=lambda n: n == 1), f"decodes before prefills: {sizes}"
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(out.scheduled) <= self.config.max_num_seqs
        assert len({s.seq_id for s, _ in out.scheduled}) == len(out.scheduled)
        for seq, n in out.scheduled:
            assert seq.status is RUNNING and 0 < n <= seq.num_uncomputed_tokens
            assert len(seq.block_table) * BS >= seq.num_computed_tokens + n

    def run(self, max_steps: int = 1000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"
        assert self.bm.num_free_blocks == self.bm.num_blocks
        return steps


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in out.scheduled]


def test_chunked_prefill_splits_long_prompt():
    eng = FakeEngine(64, max_num_batched_tokens=8)
    a = eng.add("a", 20, max_tokens=3)
    assert plan(eng.step()) == [("a", 8)]
    assert a.num_computed_tokens == 8 and a.num_output_tokens == 0
    assert plan(eng.step()) == [("a", 8)]
    assert plan(eng.step()) == [("a", 4)]
    assert a.num_computed_tokens == 20 and a.num_output_tokens == 1
    assert plan(eng.step()) == [("a", 1)]
    assert plan(eng.step()) == [("a", 1)]
    assert a.status is SequenceStatus.FINISHED_LENGTH and a.num_output_tokens == 3
    assert not eng.sched.has_unfinished()


def test_update_returns_only_sequences_at_their_end():
    eng = FakeEngine(64, max_num_batched_tokens=10)
    a, b = eng.add("a", 6), eng.add("b", 9)
    out = eng.sched.schedule()
    assert plan(out) == [("a", 6), ("b", 4)]
    assert eng.sched.update_from_output(out) == [a]
    assert b.num_computed_tokens == 4


def test_continuous_batching_new_request_joins_between_decodes():
    eng = FakeEngine(64)
    eng.add("a", 4, max_tokens=5)
    assert plan(eng.step()) == [("a", 4)]
    assert plan(eng.step()) == [("a", 1)]
    b = eng.add("b", 6, max_tokens=2)
    # b's prefill is listed first although a runs first
    assert plan(eng.step()) == [("b", 6), ("a", 1)]
    assert plan(eng.step()) == [("a", 1), ("b", 1)]
    assert b.is_finished
    assert plan(eng.step()) == [("a", 1)]
    assert eng.run() == 0 and [s.request_id for s in eng.finished] == ["b", "a"]


def test_without_chunking_a_prompt_fits_whole_or_waits():
    eng = FakeEngine(64, max_num_batched_tokens=16, max_model_len=16,
                     enable_chunked_prefill=False)
    eng.add("a", 10)
    eng.add("b", 10)
    assert plan(eng.step()) == [("a", 10)]  # b (10) does not fit in the 6 left
    assert plan(eng.step()) == [("b", 10), ("a", 1)]
    eng.run()


def test_max_num_seqs():
    eng = FakeEngine(64, max_num_seqs=2)
    for rid in "abc":
        eng.add(rid, 3, max_tokens=2)
    assert plan(eng.step()) == [("a", 3), ("b", 3)]
    assert plan(eng.step()) == [("a", 1), ("b", 1)]  # both finish
    assert plan(eng.step()) == [("c", 3)]
    eng.run()


def test_fcfs_waiting_head_blocks_admission():
    # 6 blocks; a grows to 4, b needs 4 and waits; c would fit in the 2 free but must not skip b
    eng = FakeEngine(6, max_num_batched_tokens=64)
    a = eng.add("a", 12, max_tokens=2)
    assert plan(eng.step()) == [("a", 12)]
    b = eng.add("b", 16, max_tokens=1)
    c = eng.add("c", 4, max_tokens=1)
    assert plan(eng.step()) == [("a", 1)]  # a needs a 4th block: 2 free, b needs 4
    assert a.is_finished and b.status is WAITING and c.status is WAITING
    assert plan(eng.step()) == [("b", 16), ("c", 4)]  # a's blocks are back: both fit now
    eng.run()
    assert [s.request_id for s in eng.finished] == ["a", "b", "c"]


def test_fcfs_token_budget_goes_to_earliest():
    eng = FakeEngine(64, max_num_batched_tokens=8)
    eng.add("a", 6)
    eng.add("b", 6)
    eng.add("c", 6)
    assert plan(eng.step()) == [("a", 6), ("b", 2)]
    assert plan(eng.step()) == [("b", 4), ("c", 3), ("a", 1)]
    eng.run()


def test_preemption_of_latest_then_recompute():
    eng = FakeEngine(4)  # 16 slots
    a = eng.add("a", 7, max_tokens=6)
    b = eng.add("b", 7, max_tokens=6)
    assert plan(eng.step()) == [("a", 7), ("b", 7)]  # 2 + 2 blocks, none free
    assert plan(eng.step()) == [("a", 1), ("b", 1)]  # tokens 8: still 2 blocks each
    out = eng.step()  # a's 9th token needs a 3rd block: b (latest) is preempted
    assert plan(out) == [("a", 1)] and out.preempted == [b]
    assert b.status is WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.block_table == [] and eng.sched.waiting == [b] and b.num_output_tokens == 2
    for _ in range(3):  # a: outputs 4, 5, 6; b (9 tokens = 3 blocks) waits for blocks
        assert plan(eng.step()) == [("a", 1)]
    assert a.is_finished and a.num_output_tokens == 6
    assert plan(eng.step()) == [("b", 9)]  # prompt + 2 outputs recomputed
    assert b.num_output_tokens == 3 and a.num_preemptions == 0
    eng.run()
    assert b.num_output_tokens == 6 and [s.request_id for s in eng.finished] == ["a", "b"]


def test_preemption_of_itself_when_latest():
    eng = FakeEngine(4)
    eng.add("a", 7, max_tokens=6)
    b = eng.add("b", 8, max_tokens=6)
    assert plan(eng.step()) == [("a", 7), ("b", 8)]
    out = eng.step()  # a: 8 tokens fit; b: 9 tokens need a 3rd block and b is the latest
    assert plan(out) == [("a", 1)] and out.preempted == [b] and b.status is WAITING
    eng.run()
    assert all(s.num_output_tokens == 6 for s in eng.finished) and len(eng.finished) == 2


def test_preempted_request_goes_before_later_arrivals():
    eng = FakeEngine(4)
    eng.add("a", 7, max_tokens=6)
    b = eng.add("b", 7, max_tokens=6)
    eng.step()
    eng.step()
    c = eng.add("c", 2, max_tokens=1)
    out = eng.step()
    assert out.preempted == [b] and eng.sched.waiting == [b, c]
    for _ in range(3):  # c (1 block) would fit beside a, but b (3 blocks) is first in line
        assert plan(eng.step()) == [("a", 1)] and c.status is WAITING
    assert plan(eng.step()) == [("b", 9), ("c", 2)]
    eng.run()
    assert len(eng.finished) == 3


def test_prefix_cache_hit_through_scheduler():
    eng = FakeEngine(16, prefix_caching=True)
    a = eng.add("a", list(range(10)), max_tokens=3)
    eng.step()
    b = eng.add("b", list(range(8)) + [50, 51, 52], max_tokens=2)
    assert plan(eng.step()) == [("b", 3), ("a", 1)]
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0
    assert b.block_table[:2] == a.block_table[:2]
    eng.run()


def test_abort_waiting_midprefill_running():
    eng = FakeEngine(64, max_num_batched_tokens=8, max_num_seqs=2)
    a = eng.add("a", 20, max_tokens=3)
    b = eng.add("b", 3, max_tokens=3)
    c = eng.add("c", 3, max_tokens=3)
    assert plan(eng.step()) == [("a", 8)]
    assert eng.sched.abort("c") == [c]  # waiting
    assert c.status is SequenceStatus.FINISHED_ABORTED and c not in eng.sched.waiting
    assert eng.sched.abort("a") == [a]  # mid-prefill: its blocks come back
    assert a.block_table == [] and eng.bm.num_free_blocks == 64 and eng.sched.num_unfinished == 1
    assert plan(eng.step()) == [("b", 3)]
    assert eng.sched.abort("b") == [b]  # running, decoding
    assert eng.sched.abort("b") == [] and eng.sched.abort("nope") == []
    assert not eng.sched.has_unfinished() and eng.bm.num_free_blocks == 64


def test_abort_between_schedule_and_update():
    eng = FakeEngine(64)
    a = eng.add("a", 5)
    out = eng.sched.schedule()
    eng.sched.abort("a")
    assert eng.sched.update_from_output(out) == []
    assert a.num_computed_tokens == 0  # not advanced
    eng.bm.check_invariants([])


def test_finish_frees_blocks():
    eng = FakeEngine(8)
    a = eng.add("a", 5)
    eng.step()
    eng.sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    assert a.status is SequenceStatus.FINISHED_STOPPED and a.block_table == []
    assert eng.bm.num_free_blocks == 8 and not eng.sched.has_unfinished()


def test_request_that_can_never_fit_is_refused():
    eng = FakeEngine(2)  # 8 slots
    with pytest.raises(ConfigError, match="KV cache is too small"):
        eng.add("a", 10)
    with pytest.raises(ConfigError, match="KV cache is too small"):
        eng.add("b", 6, max_tokens=4)  # 9 tokens of KV at most
    eng.add("c", 6, max_tokens=3)  # 8 tokens of KV at most: fits exactly
    eng.run()


def test_prompt_longer_than_max_model_len_is_asserted():
    eng = FakeEngine(64, max_model_len=16)
    with pytest.raises(AssertionError, match="max_model_len"):
        eng.add("a", 17)


@pytest.mark.parametrize("seed", range(6))
def test_randomized_stress(seed: int):
    rng = random.Random(seed)
    chunked = seed % 2 == 0
    budget = rng.choice([8, 12, 32]) if chunked else 32
    eng = FakeEngine(rng.randint(8, 14), prefix_caching=seed % 3 != 0, max_model_len=32,
                     max_num_batched_tokens=budget, max_num_seqs=rng.choice([2, 4, 8]),
                     enable_chunked_prefill=chunked)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    seqs: list[Sequence] = []
    aborted: set[str] = set()
    for step in range(300):
        if rng.random() < 0.3:
            base = rng.choice(prefixes)[:rng.randint(0, 12)]
            prompt = base + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
            seqs.append(eng.add(f"r{len(seqs)}", prompt, max_tokens=rng.randint(1, 8)))
        live = eng.sched.running + eng.sched.waiting
        if live and rng.random() < 0.05:
            rid = rng.choice(live).request_id
            assert eng.sched.abort(rid)
            aborted.add(rid)
        eng.step()
    eng.run()
    assert len(seqs) > 50 and aborted
    assert any(s.num_preemptions for s in seqs)
    for seq in seqs:
        if seq.request_id in aborted:
            assert seq.status is SequenceStatus.FINISHED_ABORTED
        else:
            assert seq.status is SequenceStatus.FINISHED_LENGTH
            assert seq.num_output_tokens == seq.sampling_params.max_tokens


def test_longrope_crossing_recomputes_in_the_same_step_without_a_pending_token():
    """LongRoPE with an original length of 8: a 6-token prompt is computed short; the step
    that would compute position 8 instead recomputes all 9 tokens as long, admitted in that
    same schedule (no token is pending in synchronous stepping), its prefix-cache keys salted
    apart from the short ones; a 10-token prompt is long from the start. Nothing is
    preempted and no KV is read wrong (FakeEngine's checks)."""
    from engine.core.block_manager import LONG_ROPE_ROOT, hash_block

    eng = FakeEngine(16, prefix_caching=True)
    eng.sched = Scheduler(eng.config, eng.bm, long_rope_from=8)
    seq = eng.add("a", 6, max_tokens=6)
    long = eng.add("b", list(range(100, 110)), max_tokens=1)  # no block shared with "a"
    assert (seq.long_rope, long.long_rope) == (False, True)
    steps = []
    for _ in range(20):  # bounded
        if not eng.sched.has_unfinished():
            break
        out = eng.step()
        steps.append({s.request_id: n for s, n in out.scheduled if s is seq})
        assert not out.preempted
    # prefill 6, decodes at positions 6 and 7, then all 9 tokens again (positions 0..8)
    assert [s["a"] for s in steps if "a" in s][:4] == [6, 1, 1, 9]
    assert seq.long_rope and seq.num_preemptions == 0 and seq.num_output_tokens == 6
    assert seq.block_hashes[0] == hash_block(LONG_ROPE_ROOT, seq.token_ids[:BS])
