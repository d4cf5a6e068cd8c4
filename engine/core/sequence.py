"""One sequence being generated: its tokens, its place in the KV cache, its state."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from engine.core.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:  # two identity tests: Sequence.is_finished is on the hot path
        return self is not SequenceStatus.RUNNING and self is not SequenceStatus.WAITING


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Prompt + output token ids and the bookkeeping the scheduler and block manager share.

    Invariant: the KV of token_ids[:num_computed_tokens] is in the blocks of `block_table`.

    With asynchronous scheduling a sampled token can be pending: the GPU has it, the host does
    not yet (`num_pending`: 0 or 1, and 2 for the moment between launching a step and
    applying the one before it). It counts in len(seq), so the scheduler gives the
    sequence its next decode step while the previous one runs; it is not in token_ids.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    index: int = 0  # which of the request's n samples
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at last admission
    num_preemptions: int = 0
    num_pending: int = 0  # sampled on the device, not yet appended (asynchronous scheduling)
    arrival_time: float = field(default_factory=time.monotonic)
    # filled by the engine as it goes
    output_text: str = ""
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    stop_reason: int | str | None = None
    # hashes of this sequence's full blocks, in order (block manager's prefix cache keys)
    block_hashes: list[bytes] = field(default_factory=list)
    # LongRoPE: its KV uses the long factors at every position (the scheduler sets it for a
    # prompt, or prompt + output, longer than the original length; see engine.layers.rotary)
    long_rope: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
