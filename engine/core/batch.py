"""One step's work as flat host arrays (`StepBatch`), and what the model runner sends back
(`RunnerOutput`): the protocol between the engine core and the model runner of every rank.

The engine builds a StepBatch from the scheduler's output on the host; with tensor parallelism
the driver broadcasts it as is (numpy arrays, no Sequence objects) and every rank's runner moves
it to its device. Rank 0's runner samples and answers with a RunnerOutput.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.core.sequence import Sequence

_PAD = -1  # pad id of the penalty token tables (the sampler maps it past the vocabulary)
_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "top_k")


@dataclass
class SamplingInputs:
    """Sampling settings of the rows that sample a token this step, in row order."""

    seq_ids: np.ndarray  # [rows] int64 (the sampler keeps seeded rows' generators by seq id)
    settings: np.ndarray  # [7, rows] float64: temperature, top_p, min_p, repetition, presence,
    #                       frequency penalties, top_k
    seeds: list[tuple[int, int, int]]  # (row, seq_id, generator seed) of seeded random rows
    num_logprobs: list[int | None]  # per row: SamplingParams.logprobs
    prompt_tokens: np.ndarray  # [rows, longest prompt] int64, -1 padded; width 0 unless some
    #                            row has a repetition penalty
    output_tokens: np.ndarray  # [rows, longest output] int64, -1 padded; width 0 unless some
    #                            row has a penalty
    # [2, k] int64 (row, column): output_tokens entries of tokens still pending on the device
    # (asynchronous scheduling), which the runner fills in from this step's input ids
    pending_outputs: np.ndarray
    suppress: np.ndarray  # [2, pairs] int64: (row, token) pairs min_tokens sets to -inf
    all_greedy: bool
    do_penalties: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool

    @property
    def num_rows(self) -> int:
        return len(self.num_logprobs)

    @classmethod
    def build(cls, seqs: list[Sequence], eos_token_ids: list[int]) -> SamplingInputs:
        ps = [s.sampling_params for s in seqs]
        settings = np.array([[getattr(p, name) for p in ps] for name in _SETTINGS],
                            dtype=np.float64).reshape(len(_SETTINGS), len(ps))
        do_rep = any(p.repetition_penalty != 1.0 for p in ps)
        do_penalties = do_rep or any(p.presence_penalty or p.frequency_penalty for p in ps)
        rows: list[int] = []
        tokens: list[int] = []
        for row, s in enumerate(seqs):
            if s.num_output_tokens + s.num_pending < s.sampling_params.min_tokens:
                ids = list(eos_token_ids) + list(s.sampling_params.stop_token_ids or [])
                rows += [row] * len(ids)
                tokens += ids
        return cls(
            seq_ids=np.array([s.seq_id for s in seqs], dtype=np.int64),
            settings=settings,
            seeds=[(row, s.seq_id, (s.sampling_params.seed + s.index) % 2**64)
                   for row, s in enumerate(seqs)
                   if s.sampling_params.seed is not None and not s.sampling_params.greedy],
            num_logprobs=[p.logprobs for p in ps],
            prompt_tokens=_pad([s.prompt_token_ids for s in seqs] if do_rep else [], len(seqs)),
            output_tokens=_pad([s.output_token_ids + [_PAD] * s.num_pending for s in seqs]
                               if do_penalties else [], len(seqs)),
            pending_outputs=np.array(
                [(row, s.num_output_tokens) for row, s in enumerate(seqs) if s.num_pending]
                if do_penalties else [], dtype=np.int64).reshape(-1, 2).T.copy(),
            suppress=np.array([rows, tokens], dtype=np.int64).reshape(2, -1),
            all_greedy=all(p.greedy for p in ps), do_penalties=do_penalties,
            do_top_k=any(p.top_k > 0 for p in ps), do_top_p=any(p.top_p < 1.0 for p in ps),
            do_min_p=any(p.min_p > 0.0 for p in ps))


def _pad(lists: list[list[int]], num_rows: int) -> np.ndarray:
    """[num_rows, longest] int64, -1 padded; no lists: [num_rows, 0]."""
    if not lists:
        return np.empty((num_rows, 0), dtype=np.int64)
    width = max((len(x) for x in lists), default=0)
    out = np.full((len(lists), width), _PAD, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


@dataclass
class PromptLogprobRows:
    """Rows of the flat batch whose logits score prompt tokens of one sequence: row i predicts
    prompt token first_position + i."""

    seq_id: int
    first_position: int  # the first prompt position scored (>= 1)
    row_start: int
    target_ids: list[int]  # the prompt tokens those rows predict
    num_logprobs: int  # SamplingParams.prompt_logprobs (top-k besides the target)


@dataclass
class StepBatch:
    """The flattened tokens of one step: prefill chunks first, then decodes (one token each).

    Sequence i owns tokens query_start_loc[i]:query_start_loc[i+1]; they sit at positions
    context_lens[i] - query_len_i ... context_lens[i] - 1 of that sequence.
    """

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64, block * block_size + offset
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: np.ndarray  # [num_seqs] int32
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_start_loc: np.ndarray  # [num_seqs + 1] int32
    max_query_len: int
    max_context_len: int
    num_prefills: int
    num_prefill_tokens: int
    sample_rows: np.ndarray  # [num_sampled] int64: rows whose logits sample a token
    sampling: SamplingInputs
    # [2, k] int64: input_ids[row] = the token the previous step sampled at index j, for
    # sequences whose last token was still pending on the device (asynchronous scheduling)
    prev_tokens: np.ndarray = field(default_factory=lambda: np.empty((2, 0), dtype=np.int64))
    prompt_logprobs: list[PromptLogprobRows] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # the sampler forgets these first
    # [num_tokens] bool, or None: tokens of long_rope sequences below a LongRoPE model's
    # original length (AttentionMetadata.long_rope)
    long_rope: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_tokens - self.num_prefill_tokens


@dataclass
class RunnerOutput:
    """Rank 0's answer to a StepBatch."""

    token_ids: list[int]  # per sampled row
    logprobs: list[dict[int, float] | None] | None  # per sampled row; None when none asked
    prompt_logprobs: list[list[dict[int, float]]]  # per StepBatch.prompt_logprobs entry, per row


def build_batch(scheduled: list[tuple[Sequence, int]], block_size: int,
                eos_token_ids: list[int], finished_seq_ids: list[int] | None = None,
                prev_rows: dict[int, int] | None = None,
                long_rope_from: int | None = None) -> tuple[StepBatch, list[Sequence]]:
    """Flatten the scheduled (sequence, tokens this step) pairs, prefill chunks first. A
    sequence samples a token once all its known tokens are computed (the scheduler's
    update_from_output returns the same ones). A sequence with a pending token takes it from
    the previous step's sampled row prev_rows[seq_id] on the device. Also returns the sequences
    whose prompt logprobs the step scores, in StepBatch.prompt_logprobs order. long_rope_from:
    a LongRoPE model's original length (rotary.long_rope_from), for StepBatch.long_rope."""
    bs = block_size
    ids, pos, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
    sample_seqs, sample_rows, prompt_rows, prompt_seqs, prev = [], [], [], [], []
    long_spans = []  # (first row, rows) of long_rope sequences, below long_rope_from
    offset = 0
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        if seq.long_rope and start < long_rope_from:
            long_spans.append((offset, min(n, long_rope_from - start)))
        if n == 1:  # decode: scalar arithmetic, no per-sequence arrays
            if seq.num_pending:
                prev += [offset, prev_rows[seq.seq_id]]
                ids.append(0)  # the runner puts the pending token here
            else:
                ids.append(seq.last_token_id if start == len(seq) - 1 else seq.token_ids[start])
            pos.append(start)
            slots.append(seq.block_table[start // bs] * bs + start % bs)
        else:
            p = np.arange(start, start + n)
            ids.extend(seq.token_slice(start, start + n))
            pos.extend(range(start, start + n))
            table = np.asarray(seq.block_table, dtype=np.int64)
            slots.extend((table[p // bs] * bs + p % bs).tolist())
        q_lens.append(n)
        ctx_lens.append(start + n)
        tables.append(seq.block_table)
        if start + n == len(seq):
            sample_seqs.append(seq)
            sample_rows.append(offset + n - 1)
        k = seq.sampling_params.prompt_logprobs
        if k is not None and start < seq.num_prompt_tokens - 1:
            last = min(start + n, seq.num_prompt_tokens - 1)  # position predicting the next
            prompt_rows.append(PromptLogprobRows(
                seq.seq_id, start + 1, offset, seq.prompt_token_ids[start + 1:last + 1], k))
            prompt_seqs.append(seq)
        offset += n

    num_prefills = sum(1 for n in q_lens if n > 1)
    max_blocks = max(len(t) for t in tables)
    block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = t
    long_rope = None
    if long_spans:
        long_rope = np.zeros(offset, dtype=bool)
        for first, rows in long_spans:
            long_rope[first:first + rows] = True
    batch = StepBatch(
        input_ids=np.asarray(ids, dtype=np.int64), positions=np.asarray(pos, dtype=np.int64),
        slot_mapping=np.asarray(slots, dtype=np.int64), block_tables=block_tables,
        context_lens=np.asarray(ctx_lens, dtype=np.int32),
        query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
        seq_start_loc=np.concatenate([[0], np.cumsum(ctx_lens)]).astype(np.int32),
        max_query_len=max(q_lens), max_context_len=max(ctx_lens), num_prefills=num_prefills,
        num_prefill_tokens=sum(q_lens[:num_prefills]),
        sample_rows=np.asarray(sample_rows, dtype=np.int64),
        sampling=SamplingInputs.build(sample_seqs, eos_token_ids),
        prompt_logprobs=prompt_rows, finished_seq_ids=list(finished_seq_ids or []),
        prev_tokens=np.asarray(prev, dtype=np.int64).reshape(-1, 2).T.copy(),
        long_rope=long_rope)
    return batch, prompt_seqs
