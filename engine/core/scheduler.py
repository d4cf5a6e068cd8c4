"""Continuous batching with chunked prefill and preemption by recompute (vLLM V1 style).

There is no prefill or decode phase: every sequence has `num_computed_tokens` and a target
`len(seq)` (prompt + output so far), and each step gives it some of the difference.

One engine step:
    out = scheduler.schedule()              which sequences run, and how many tokens each
    ... model runs out.scheduled ...        prefill chunks (num_new_tokens > 1) first, then decodes
    done = scheduler.update_from_output(out)   sequences whose known tokens are all computed
    ... engine appends a sampled token to each of `done`, calls finish() on stopped ones ...

With asynchronous scheduling the engine calls update_from_output as soon as the step is
launched and marks each of `done` as having a pending token; schedule() then gives them their
next decode step before the token is known (and skips one whose pending token is its last).

Policy: running sequences first, in arrival order; a sequence that cannot get blocks preempts
the latest-arrived running sequence (possibly itself): its blocks are freed, it goes back to the
front of the waiting queue and later recomputes prompt + output. Then waiting sequences are
admitted in arrival order while the token budget, max_num_seqs and free blocks allow; the first
one that does not fit stops admission (no skipping ahead). A step that preempted admits nobody.

LongRoPE (`long_rope_from`, the model's original length): a sequence longer than it computes
its KV with the long factors at every position (Sequence.long_rope). One that grows past it
from a shorter prompt recomputes prompt + output once, as HF's Phi-3 generate does (it drops
its cache there): it goes back to waiting like a preempted sequence, without counting as one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus
from engine.errors import ConfigError


def _arrival(seq: Sequence) -> tuple[float, int]:
    return seq.arrival_time, seq.seq_id


@dataclass
class SchedulerOutput:
    # (sequence, tokens to compute this step): prefill chunks (> 1 token) first, then decodes
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_manager: BlockManager,
                 long_rope_from: int | None = None) -> None:
        self.config = scheduler_config
        self.block_manager = block_manager
        self.long_rope_from = long_rope_from
        self.waiting: list[Sequence] = []  # arrival order
        self.running: list[Sequence] = []  # arrival order

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_seq(self, seq: Sequence) -> None:
        assert seq.num_prompt_tokens <= self.config.max_model_len, (
            f"prompt of {seq.num_prompt_tokens} tokens > max_model_len: the engine must reject it")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        # the last sampled token is never computed, so the KV holds at most max_len - 1 tokens
        self._check_fits(seq, max(self._max_len(seq) - 1, len(seq)))
        seq.long_rope = self.long_rope_from is not None and len(seq) > self.long_rope_from
        bisect.insort(self.waiting, seq, key=_arrival)

    def _max_len(self, seq: Sequence) -> int:
        """The length at which the sequence ends at the latest (max_tokens, max_model_len)."""
        max_tokens = seq.sampling_params.max_tokens
        max_len = self.config.max_model_len
        if max_tokens is not None:
            max_len = min(max_len, seq.num_prompt_tokens + max_tokens)
        return max_len

    def _check_fits(self, seq: Sequence, num_tokens: int) -> None:
        """Refuse a sequence that would wait forever: it can never get the blocks or budget."""
        bm = self.block_manager
        num_blocks = -(-num_tokens // bm.block_size)
        if num_blocks > bm.num_blocks:
            raise ConfigError(
                f"request {seq.request_id}: the KV cache is too small for this request "
                f"({num_tokens} tokens need {num_blocks} blocks of {bm.block_size}, the cache has "
                f"{bm.num_blocks}): give the KV cache more memory or lower max_tokens")
        if not self.config.enable_chunked_prefill and len(seq) > self.config.max_num_batched_tokens:
            raise ConfigError(
                f"request {seq.request_id}: {len(seq)} tokens exceed max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}: enable chunked prefill or raise it")

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and len(seq) >= self._max_len(seq):
                i += 1  # its last token is on the way: nothing left to compute
                continue
            assert seq.num_uncomputed_tokens > 0, f"seq {seq.seq_id}: running with nothing to do"
            if (self.long_rope_from is not None and not seq.long_rope
                    and len(seq) > self.long_rope_from):  # crosses it: recompute all as long
                self.running.pop(i)
                self._recompute(seq)
                if seq.num_pending:  # its pending token comes before it is admitted
                    out.preempted.append(seq)
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new < seq.num_uncomputed_tokens and not chunked:
                i += 1
                continue
            self._check_fits(seq, len(seq))
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()  # latest arrival; never one scheduled already
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.scheduled.append((seq, num_new))
                budget -= num_new
                i += 1

        while (not out.preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            self._check_fits(seq, len(seq))
            num_new = len(seq) - self.block_manager.get_computed_prefix(seq)
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            if not self.block_manager.allocate_slots(seq, num_new):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            out.scheduled.append((seq, num_new))
            budget -= num_new

        out.scheduled.sort(key=lambda item: item[1] == 1)  # stable: prefill chunks first
        return out

    def _preempt(self, seq: Sequence) -> None:
        self._recompute(seq)
        seq.num_preemptions += 1

    def _recompute(self, seq: Sequence) -> None:
        """Recompute later: drop the KV, keep the tokens (output included). A LongRoPE
        sequence longer than the original length is recomputed long, however it got here
        (preempted on the step it crosses, too)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        if (self.long_rope_from is not None and not seq.long_rope
                and len(seq) > self.long_rope_from):
            seq.long_rope, seq.block_hashes = True, []  # other KV: other prefix-cache keys
        bisect.insort(self.waiting, seq, key=_arrival)  # the front, unless older ones wait

    def update_from_output(self, output: SchedulerOutput) -> list[Sequence]:
        """Advance the scheduled sequences; return those with all their tokens computed, which
        get a sampled token next. Sequences finished or aborted since schedule() are skipped."""
        done = []
        for seq, num_new in output.scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += num_new
            assert seq.num_computed_tokens <= len(seq)
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
            if seq.num_computed_tokens == len(seq):
                done.append(seq)
        return done

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        assert status.finished, f"{status} is not a finished status"
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = status

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort every sequence of a request, waiting or running; returns them."""
        seqs = [s for s in self.running + self.waiting if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seqs
