"""Paged KV-cache blocks: allocation, ref counts and prefix caching by chained block hashes.

The cache is `num_blocks` physical blocks of `block_size` token slots. A sequence's
`block_table[i]` holds its tokens i * block_size ... (i + 1) * block_size - 1.

API (all the scheduler needs):
    get_computed_prefix(seq) -> int          prompt tokens a new sequence would take from the cache
    allocate_slots(seq, num_new_tokens) -> bool
        cover seq.num_computed_tokens + num_new_tokens tokens with blocks; on the first call
        (empty block table) first share the prefix-cache hits and set seq.num_computed_tokens and
        seq.num_cached_tokens. False, and nothing changed, when free blocks run short.
    cache_full_blocks(seq, num_computed_tokens)  make full, computed blocks shareable
    free(seq)                                release the sequence's blocks (idempotent)
    num_free_blocks, usage, check_invariants(live_seqs)

Prefix caching: full block i of a sequence is keyed by
    hash_i = sha256(hash_{i-1} || tokens of block i as little-endian int64), hash_{-1} = b""
(LONG_ROPE_ROOT for a Sequence.long_rope sequence: other KV for the same tokens),
so equal content after a different prefix never matches. Only full blocks are hashed, so a
partly filled block is never shared and shared blocks are never written to. A freed block keeps
its hash (and stays findable) until it is reallocated for other content. Sequences that ask for
prompt logprobs never take hits (they need the logits of every prompt token) but do fill the cache.

Free list: least recently freed first. Freed cached blocks go to the back (evicted last), freed
uncached blocks to the front (reused first).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from engine.core.sequence import Sequence

# the chain's root for a LongRoPE sequence whose KV uses the long factors throughout: the same
# tokens encoded with the short ones are other content
LONG_ROPE_ROOT = b"long_rope"


def hash_block(prev_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained SHA-256 key of one full block."""
    return hashlib.sha256(prev_hash + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts: list[int] = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # a block has a hash iff hash_to_block maps that hash back to it
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # seq_id -> leading blocks of that sequence already registered in the prefix cache
        self._num_hashed: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Share of blocks held by live sequences (free cached blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def _cdiv(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Extend seq.block_hashes to its first `num_blocks` full blocks; returns those hashes."""
        bs = self.block_size
        if len(seq.block_hashes) < num_blocks:
            tokens = seq.token_ids
            for i in range(len(seq.block_hashes), num_blocks):
                prev = seq.block_hashes[i - 1] if i else LONG_ROPE_ROOT if seq.long_rope else b""
                seq.block_hashes.append(hash_block(prev, tokens[i * bs:(i + 1) * bs]))
        return seq.block_hashes[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks; at least one token is left over.
        Requests that want prompt logprobs must compute every prompt token, so they never hit."""
        assert not seq.num_pending, f"seq {seq.seq_id}: admitted with a pending token"
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        hits = []
        for h in self._hash_blocks(seq, (len(seq) - 1) // self.block_size):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def get_computed_prefix(self, seq: Sequence) -> int:
        return len(self._prefix_hits(seq)) * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        assert num_new_tokens > 0
        hits: list[int] = []
        num_computed = seq.num_computed_tokens
        first = not seq.block_table  # admission: take the prefix-cache hits first
        if first:
            assert num_computed == 0, f"seq {seq.seq_id}: computed tokens but no blocks"
            hits = self._prefix_hits(seq)
            num_computed = len(hits) * self.block_size
        num_needed = self._cdiv(num_computed + num_new_tokens) - len(seq.block_table) - len(hits)
        num_needed = max(num_needed, 0)
        num_revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits now on the free list
        if num_needed + num_revived > len(self.free_blocks):
            return False
        if first:
            for block in hits:
                if self.ref_counts[block] == 0:
                    del self.free_blocks[block]
                self.ref_counts[block] += 1
            seq.block_table.extend(hits)
            seq.num_computed_tokens = seq.num_cached_tokens = num_computed
            self._num_hashed[seq.seq_id] = len(hits)
        for _ in range(num_needed):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old_hash = self.block_hash[block]
        if old_hash is not None:  # evict: its content is about to be overwritten
            del self.hash_to_block[old_hash]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        assert num_full <= len(seq.block_table)
        start = self._num_hashed.get(seq.seq_id, 0)
        hashes = self._hash_blocks(seq, num_full)
        for i in range(start, num_full):
            block, h = seq.block_table[i], hashes[i]
            # a twin computed at the same time may hold this hash already: this block stays unkeyed
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        self._num_hashed[seq.seq_id] = max(start, num_full)

    def free(self, seq: Sequence) -> None:
        # last blocks first, so a sequence's prefix blocks are evicted after its tail blocks
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hash[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table.clear()
        self._num_hashed.pop(seq.seq_id, None)

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Raise AssertionError unless the block bookkeeping agrees with `live_seqs`."""
        owners = [0] * self.num_blocks
        for seq in live_seqs:
            table = seq.block_table
            assert len(set(table)) == len(table), f"seq {seq.seq_id}: block twice in {table}"
            assert self._cdiv(seq.num_computed_tokens) <= len(table), (
                f"seq {seq.seq_id}: {seq.num_computed_tokens} computed tokens, "
                f"{len(table)} blocks")
            for i, block in enumerate(table):
                owners[block] += 1
                h = self.block_hash[block]
                assert h is None or (i < len(seq.block_hashes) and seq.block_hashes[i] == h), (
                    f"seq {seq.seq_id}: block {block} at position {i} is cached for other content")
        for block, (refs, n) in enumerate(zip(self.ref_counts, owners)):
            assert refs == n, f"block {block}: ref count {refs}, held by {n} live sequences"
            assert (refs == 0) == (block in self.free_blocks), (
                f"block {block}: ref count {refs} but {'' if refs else 'not '}on the free list")
        assert len(self.free_blocks) == sum(1 for r in self.ref_counts if r == 0)
        for h, block in self.hash_to_block.items():
            assert self.block_hash[block] == h, f"hash map points to block {block}, keyed otherwise"
        num_keyed = sum(1 for h in self.block_hash if h is not None)
        assert num_keyed == len(self.hash_to_block), (
            f"{num_keyed} blocks keyed, {len(self.hash_to_block)} in the hash map")
