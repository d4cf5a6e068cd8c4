"""BlockManager: ref counts, prefix-cache hits by chained hash, eviction, invariants."""

from __future__ import annotations

import hashlib
import struct

import pytest

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8))


def compute(bm: BlockManager, seq: Sequence, num_new: int) -> None:
    """What one scheduled step does to a sequence: slots, then the KV is computed and cached."""
    assert bm.allocate_slots(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq, seq.num_computed_tokens)


def test_allocate_and_free_ref_counts():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    seq = make_seq(range(10))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)
    assert bm.usage == pytest.approx(3 / 8)
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 2)  # 12 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 3)  # 13 tokens need a 4th
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    bm.check_invariants([seq])
    table = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    assert all(bm.ref_counts[b] == 0 for b in table)
    bm.free(seq)  # idempotent
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_allocate_failure_changes_nothing():
    bm = BlockManager(2, BS, enable_prefix_caching=True)
    seq = make_seq(range(10))  # needs 3 blocks
    assert not bm.allocate_slots(seq, 10)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 2
    bm.check_invariants([seq])


def test_prefix_hit_shares_blocks():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq(range(10), "a")
    compute(bm, a, 10)  # blocks 0, 1 full and cached; block 2 holds 2 tokens
    b = make_seq(list(range(8)) + [100, 101, 102], "b")
    assert bm.get_computed_prefix(b) == 8
    assert bm.allocate_slots(b, 3)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    bm.check_invariants([a, b])
    # the same 10 tokens again: the partial third block is never shared
    c = make_seq(range(10), "c")
    assert bm.get_computed_prefix(c) == 8
    assert bm.allocate_slots(c, 2)
    assert c.block_table[:2] == a.block_table[:2] and c.block_table[2] != a.block_table[2]
    bm.check_invariants([a, b, c])
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [2, 2]
    bm.check_invariants([b, c])


def test_whole_prompt_cached_leaves_one_block_to_compute():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    compute(bm, make_seq(range(8), "a"), 8)
    # an identical 8-token prompt: at least one token must be computed, so only block 0 hits
    b = make_seq(range(8), "b")
    assert bm.get_computed_prefix(b) == 4
    # 9 tokens: both full blocks hit, the 9th token is computed
    assert bm.get_computed_prefix(make_seq(range(9))) == 8


def test_hash_chain_needs_same_prefix():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    compute(bm, make_seq(range(12), "a"), 12)
    # block 1 content (4, 5, 6, 7) after a different block 0: no hit at all
    other = make_seq([50, 51, 52, 53, 4, 5, 6, 7, 8], "b")
    assert bm.get_computed_prefix(other) == 0
    # first block differs in one token: nothing after it hits either
    assert bm.get_computed_prefix(make_seq([0, 1, 2, 99] + list(range(4, 13)))) == 0


def test_block_hash_is_chained_sha256():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.get_computed_prefix(seq)
    h0 = hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert seq.block_hashes == [h0, h1]


def test_generated_tokens_are_cached_too():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq(range(6), "a")
    compute(bm, a, 6)  # only block 0 is full
    assert len(bm.hash_to_block) == 1
    a.append_token(60)
    compute(bm, a, 1)
    a.append_token(70)
    compute(bm, a, 1)  # 8 computed: block 1 (4, 5, 60, 70) is full now
    assert len(bm.hash_to_block) == 2
    b = make_seq([0, 1, 2, 3, 4, 5, 60, 70, 9], "b")
    assert bm.get_computed_prefix(b) == 8


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq(range(9), "a")
    compute(bm, a, 9)  # blocks: 2 cached full + 1 partial
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.hash_to_block) == 2
    # a freed cached block is still found, and taking it removes it from the free list
    b = make_seq(range(9), "b")
    assert bm.allocate_slots(b, 1)
    assert b.block_table[:2] == cached and b.num_computed_tokens == 8
    assert bm.num_free_blocks == 1
    bm.free(b)
    bm.check_invariants([])
    # 3 blocks of new content: the 2 uncached free blocks go first, then the least recently
    # freed cached block, which is the tail block (1) since a sequence frees back to front
    c = make_seq(range(100, 112), "c")
    assert bm.allocate_slots(c, 12)
    assert cached[1] in c.block_table and cached[0] not in c.block_table
    assert len(bm.hash_to_block) == 1
    assert bm.get_computed_prefix(make_seq(range(9))) == 4
    bm.check_invariants([c])
    # one more block evicts the last cached one
    d = make_seq(range(200, 203), "d")
    assert bm.allocate_slots(d, 3)
    assert bm.hash_to_block == {} and bm.num_free_blocks == 0
    assert bm.get_computed_prefix(make_seq(range(9))) == 0
    bm.check_invariants([c, d])


def test_hit_on_free_block_counts_against_free_blocks():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = make_seq(range(5), "a")
    compute(bm, a, 5)
    bm.free(a)  # 3 free blocks, one of them cached (a's block 0)
    other = make_seq(range(100, 104), "x")
    assert bm.allocate_slots(other, 4)  # takes an uncached block
    assert bm.num_free_blocks == 2
    # b needs the cached block (free) plus 2 new ones: 3 > 2 free -> refused, nothing changed
    b = make_seq(list(range(4)) + [7] * 7, "b")
    assert bm.get_computed_prefix(b) == 4
    assert not bm.allocate_slots(b, 7)
    assert b.block_table == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 2
    assert bm.allocate_slots(b, 4)  # cached block + 1 new
    assert b.num_computed_tokens == 4 and bm.num_free_blocks == 0
    bm.check_invariants([other, b])


def test_twin_blocks_computed_together_keep_the_map_consistent():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = make_seq(range(8), "a"), make_seq(range(8), "b")
    assert bm.allocate_slots(a, 8) and bm.allocate_slots(b, 8)  # neither is cached yet
    for s in (a, b):
        s.num_computed_tokens = 8
        bm.cache_full_blocks(s, 8)
    assert set(bm.hash_to_block.values()) == set(a.block_table)  # b's copies stay unkeyed
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.get_computed_prefix(make_seq(range(9))) == 8
    bm.check_invariants([])


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    compute(bm, make_seq(range(9), "a"), 9)
    b = make_seq(range(9), "b")
    assert bm.get_computed_prefix(b) == 0
    assert bm.allocate_slots(b, 9) and b.num_computed_tokens == 0
    assert bm.hash_to_block == {}


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq(range(6))
    compute(bm, a, 6)
    bm.check_invariants([a])
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_invariants([])  # a's blocks are not accounted for
    bm.ref_counts[a.block_table[0]] += 1
    with pytest.raises(AssertionError, match="ref count 2, held by 1"):
        bm.check_invariants([a])
    bm.ref_counts[a.block_table[0]] -= 1
    a.block_table.append(a.block_table[0])
    with pytest.raises(AssertionError, match="twice"):
        bm.check_invariants([a])
    a.block_table.pop()
    bm.hash_to_block[b"x"] = 3
    with pytest.raises(AssertionError, match="hash map"):
        bm.check_invariants([a])


def test_freed_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a, x = make_seq(range(4), "a"), make_seq([90, 91], "x")
    compute(bm, a, 4)  # a's block is full and cached
    compute(bm, x, 2)  # x's block is partial: never cached
    bm.free(a)
    bm.free(x)  # freed last, but worthless: it goes to the front
    y = make_seq(range(100, 108), "y")
    assert bm.allocate_slots(y, 8)
    assert a.block_table == [] and bm.get_computed_prefix(make_seq(range(5))) == 4
    bm.check_invariants([y])


def test_prompt_logprobs_requests_compute_every_token_but_fill_the_cache():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = Sequence("a", list(range(9)), SamplingParams(prompt_logprobs=1))
    compute(bm, make_seq(range(9), "x"), 9)
    assert bm.get_computed_prefix(a) == 0
    assert bm.allocate_slots(a, 9) and a.num_computed_tokens == 0
    bm.free(a)
    bm2 = BlockManager(8, BS, enable_prefix_caching=True)
    compute(bm2, Sequence("a", list(range(9)), SamplingParams(prompt_logprobs=1)), 9)
    assert bm2.get_computed_prefix(make_seq(range(9))) == 8
