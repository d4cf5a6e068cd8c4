"""Turn one step's logits into next tokens, for the whole batch in one pass of tensor math.

Order (vLLM's): repetition / frequency / presence penalties -> min_tokens mask -> greedy rows take
the argmax; the others: temperature -> top-k -> top-p -> min-p -> sample.

Sampling is the exponential race: argmax(probs / q) with q ~ Exp(1) per vocab entry draws a token
with probability exactly `probs`. A seeded row takes its q from a torch.Generator of its own,
seeded with `(seed + index) mod 2**64` (index = which of the request's n samples) and kept across
steps in the Sampler until `free(seq_id)`, so its tokens do not depend on what else is in the
batch. Unseeded rows draw from torch's global generator.

Logprobs are those of the raw model distribution: log_softmax of the logits as the model gave them,
before penalties, temperature and filtering (vLLM's default). They are computed here and nowhere
else, for sampled tokens and for prompt tokens alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.batch import PromptLogprobRows, SamplingInputs
from engine.core.sequence import Sequence


@dataclass
class SamplingMetadata:
    """Sampling inputs of one step on the logits' device, one row per sequence that samples a
    token this step (engine.core.batch.SamplingInputs moved to the device)."""

    temperatures: torch.Tensor  # [num_seqs] float32, 0 = greedy
    top_ps: torch.Tensor  # [num_seqs] float32, 1 = off
    top_ks: torch.Tensor  # [num_seqs] int64, <= 0 = off
    min_ps: torch.Tensor  # [num_seqs] float32, 0 = off
    repetition_penalties: torch.Tensor  # [num_seqs] float32, 1 = off
    presence_penalties: torch.Tensor  # [num_seqs] float32, 0 = off
    frequency_penalties: torch.Tensor  # [num_seqs] float32, 0 = off
    prompt_tokens: torch.Tensor  # [num_seqs, max_prompt_len] int64, -1 padded (width 0: unused)
    output_tokens: torch.Tensor  # [num_seqs, max_output_len] int64, -1 padded (width 0: unused)
    suppress_rows: torch.Tensor  # [num_pairs] int64: (row, token) pairs min_tokens sets to -inf
    suppress_tokens: torch.Tensor  # [num_pairs] int64
    suppress_in_vocab: bool  # every suppress token is < the vocabulary (checked on the host)
    host: SamplingInputs  # what stays on the host: seeds, logprob counts, which filters run

    # the host side's per-step facts, read where the sampler needs them
    seeds = property(lambda self: self.host.seeds)  # (row, seq_id, seed) of seeded random rows
    num_logprobs = property(lambda self: self.host.num_logprobs)  # per row: logprobs asked
    all_greedy = property(lambda self: self.host.all_greedy)
    do_penalties = property(lambda self: self.host.do_penalties)
    do_top_k = property(lambda self: self.host.do_top_k)
    do_top_p = property(lambda self: self.host.do_top_p)
    do_min_p = property(lambda self: self.host.do_min_p)

    @property
    def num_seqs(self) -> int:
        return len(self.num_logprobs)

    @property
    def max_logprobs(self) -> int:
        """The largest `logprobs` asked for in the batch; -1 when no row asked."""
        return max((k for k in self.num_logprobs if k is not None), default=-1)

    @classmethod
    def from_inputs(cls, inp: SamplingInputs, device: torch.device | str,
                    vocab_size: int | None = None) -> SamplingMetadata:
        """Copies without waiting for the device (non-blocking), so a step can be prepared
        while the previous one runs; min_tokens pairs past `vocab_size` are dropped here."""
        def move(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        # the per-row settings travel as one [7, rows] tensor (one host-to-device copy)
        settings = move(inp.settings)
        floats = settings[:6].to(torch.float32)
        pairs = inp.suppress
        if vocab_size is not None and pairs.shape[1]:
            pairs = np.ascontiguousarray(pairs[:, pairs[1] < vocab_size])
        suppress = move(pairs)

        def tokens(a: np.ndarray) -> torch.Tensor:
            if a.shape[1] == 0:
                return torch.empty(a.shape, dtype=torch.int64, device=device)
            return move(a)

        return cls(
            temperatures=floats[0], top_ps=floats[1], min_ps=floats[2],
            repetition_penalties=floats[3], presence_penalties=floats[4],
            frequency_penalties=floats[5], top_ks=settings[6].to(torch.int64),
            prompt_tokens=tokens(inp.prompt_tokens), output_tokens=tokens(inp.output_tokens),
            suppress_rows=suppress[0], suppress_tokens=suppress[1],
            suppress_in_vocab=vocab_size is not None, host=inp)

    @classmethod
    def build(cls, seqs: list[Sequence], device: torch.device | str,
              eos_token_ids: list[int]) -> SamplingMetadata:
        """Batch the sampling settings of `seqs` (in the row order of the logits)."""
        return cls.from_inputs(SamplingInputs.build(seqs, eos_token_ids), device)


def _spill(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Send pad and out-of-vocab ids to column `vocab`, which callers slice away."""
    return torch.where((tokens < 0) | (tokens >= vocab), vocab, tokens)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, float] | None] | None  # None when no row asked for logprobs


@dataclass
class DeviceSample:
    """A step's sampled tokens still on the device (nothing here waits for the GPU)."""

    token_ids: torch.Tensor  # [num_seqs] int64
    num_logprobs: list[int | None]
    chosen: torch.Tensor | None = None  # [num_seqs] logprob of the sampled token
    top_vals: torch.Tensor | None = None  # [num_seqs, k]
    top_ids: torch.Tensor | None = None  # [num_seqs, k]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.token_ids, self.chosen, self.top_vals, self.top_ids)
                if t is not None]

    def to_host(self, host: list[torch.Tensor] | None = None) -> SamplerOutput:
        """Lists and dicts; `host` are CPU copies of tensors() already made."""
        ids, *rest = [t.tolist() for t in (host or self.tensors())]
        if self.chosen is None:
            return SamplerOutput(ids, None)
        chosen, top_vals, top_ids = rest
        out: list[dict[int, float] | None] = []
        for row, n in enumerate(self.num_logprobs):
            if n is None:
                out.append(None)
                continue
            entry = {ids[row]: chosen[row]}
            entry.update(zip(top_ids[row][:n], top_vals[row][:n]))
            out.append(entry)
        return SamplerOutput(ids, out)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt and output tokens), then frequency and presence (output tokens)."""
    num_seqs, vocab = logits.shape
    out = _spill(meta.output_tokens, vocab)  # [num_seqs, max_output_len]
    counts = torch.zeros(num_seqs, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add_(1, out, torch.ones_like(out, dtype=logits.dtype))[:, :vocab]
    in_output = counts > 0  # [num_seqs, vocab]
    seen = in_output
    if meta.prompt_tokens.shape[1]:
        prompt = _spill(meta.prompt_tokens, vocab)
        in_prompt = torch.zeros(num_seqs, vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen | in_prompt.scatter_(1, prompt, True)[:, :vocab]
    rep = meta.repetition_penalties.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - meta.frequency_penalties.unsqueeze(1) * counts
    return logits - meta.presence_penalties.unsqueeze(1) * in_output.to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Return `logits` (already divided by temperature) with the tokens the filters drop at -inf.

    top-k keeps every token whose logit is >= the k-th largest (ties at the k-th are all kept);
    top-p keeps the smallest highest-first set whose mass reaches top_p (the top token always);
    min-p then drops tokens whose probability is below min_p times the largest one's.
    Rows whose filters are off come back unchanged.
    """
    vocab = logits.shape[1]
    neg_inf = float("-inf")
    if meta.do_top_k or meta.do_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_seqs, vocab]
        if meta.do_top_k:
            k = meta.top_ks
            k = torch.where((k <= 0) | (k > vocab), vocab, k)
            kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [num_seqs, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
        if meta.do_top_p:
            probs = sorted_logits.softmax(dim=-1)
            mass_above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
            top_p = meta.top_ps.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill((mass_above >= top_p) & (top_p < 1),
                                                      neg_inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if meta.do_min_p:
        probs = logits.softmax(dim=-1)
        floor = meta.min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, neg_inf)
    return logits


class Sampler(torch.nn.Module):
    """Samples one token per row; owns the generators of seeded sequences (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._generators: dict[int, torch.Generator] = {}

    def free(self, seq_id: int) -> None:
        """Forget a finished or aborted sequence's generator."""
        self._generators.pop(seq_id, None)

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [num_seqs, vocab], rows in the order `meta` was built from."""
        return self.sample(logits, meta).to_host()

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> DeviceSample:
        """The tokens (and logprobs) on the device, with no wait for the GPU."""
        if logits.shape[0] != meta.num_seqs:
            raise ValueError(f"logits has {logits.shape[0]} rows, metadata {meta.num_seqs}")
        out = DeviceSample(torch.empty(0), meta.num_logprobs)
        if meta.max_logprobs >= 0:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            k = min(meta.max_logprobs, logprobs.shape[1])
            out.top_vals, out.top_ids = logprobs.topk(k, dim=-1)  # [num_seqs, k]
        modify = meta.do_penalties or meta.suppress_rows.numel() or not meta.all_greedy
        if modify:  # (greedy alone takes the argmax of the logits as they are)
            logits = logits.to(torch.float32, copy=True)
        if meta.do_penalties:
            logits = apply_penalties(logits, meta)
        if meta.suppress_rows.numel():
            rows, tokens = meta.suppress_rows, meta.suppress_tokens
            if not meta.suppress_in_vocab:  # (a mask: waits for the device)
                ok = tokens < logits.shape[1]
                rows, tokens = rows[ok], tokens[ok]
            logits[rows, tokens] = float("-inf")
        token_ids = logits.argmax(dim=-1)  # [num_seqs]
        if not meta.all_greedy:
            greedy = meta.temperatures == 0
            temps = torch.where(greedy, 1.0, meta.temperatures).unsqueeze(1)
            probs = apply_top_k_top_p_min_p(logits / temps, meta).softmax(dim=-1)
            sampled = probs.div_(self._exponentials(probs, meta)).argmax(dim=-1)
            token_ids = torch.where(greedy, token_ids, sampled)
        out.token_ids = token_ids
        if meta.max_logprobs >= 0:
            out.chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return out

    def _exponentials(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        q = torch.empty_like(probs).exponential_()  # [num_seqs, vocab], global generator
        for row, seq_id, seed in meta.seeds:
            gen = self._generators.get(seq_id)
            if gen is None:
                gen = self._generators[seq_id] = torch.Generator(probs.device).manual_seed(seed)
            q[row].exponential_(generator=gen)
        return q.clamp_min_(torch.finfo(q.dtype).tiny)  # an exact 0 would make 0/0 = nan win


def prompt_logprob_tensors(logits: torch.Tensor, rows: PromptLogprobRows
                           ) -> list[torch.Tensor]:
    """On the device: [logprob of each row's prompt token, top-k values, top-k ids]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(rows.target_ids, device=lp.device).unsqueeze(1)
    k = min(rows.num_logprobs, lp.shape[1])
    return [lp.gather(1, targets).squeeze(1), *lp.topk(k, dim=-1)]


def prompt_logprob_dicts(rows: PromptLogprobRows, tensors: list[torch.Tensor]
                         ) -> list[dict[int, float]]:
    """Per row: {prompt token: logprob, then the top-k tokens: logprob}."""
    chosen, top_vals, top_ids = (t.tolist() for t in tensors)
    out = []
    for row, tok in enumerate(rows.target_ids):
        entry = {tok: chosen[row]}
        entry.update(zip(top_ids[row], top_vals[row]))
        out.append(entry)
    return out
