"""LLMEngine: requests in, one scheduling + model step at a time, outputs out.

`step()` is the whole loop body; LLM (offline) and the async engine of the server both drive it:

    scheduler.schedule()        which sequences run, and how many tokens each
    build_batch(...)            the step as flat host arrays (engine.core.batch)
    executor.launch(batch)      every rank runs the model; rank 0 samples: tokens (+ logprobs)
    scheduler.update_from_output / apply the tokens, stop checks, outputs
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from engine.checkpoint.files import eos_token_ids, load_tokenizer
from engine.config import EngineConfig
from engine.core.batch import RunnerOutput, StepBatch, build_batch
from engine.core.block_manager import BlockManager
from engine.core.detokenizer import (
    IncrementalDetokenizer,
    decoder_of,
    find_stop_string,
    visible_text,
)
from engine.core.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.errors import ConfigError, RequestError
from engine.layers.rotary import long_rope_from


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None] = field(default_factory=list)
    # delta outputs: per sequence (tokens, characters, finished) already reported
    reported: list[tuple[int, int, bool]] = field(default_factory=list)


@dataclass
class _Step:
    """A launched step whose tokens are not applied yet."""

    handle: Any  # .result() -> RunnerOutput
    batch: StepBatch
    done: list[Sequence]  # the sequences that sample a token in it
    prompt_seqs: list[Sequence]
    rows: dict[int, int]  # seq_id -> its row in the sampled output


class LLMEngine:
    def __init__(self, config: EngineConfig, stream_outputs: bool = True,
                 deltas: bool = False) -> None:
        # stream_outputs: step() reports every request that advanced, with its text so far;
        # otherwise only finished requests, and text is decoded once at the end (unless stop
        # strings need it as it grows). deltas (with stream_outputs): each output holds only what
        # is new since the request's last one (token ids, text, logprobs; the prompt logprobs
        # with the first) and only the sequences that moved, so a step costs O(new tokens)
        from engine.distributed import create_executor

        self.config, self.stream_outputs = config, stream_outputs
        self.deltas = deltas and stream_outputs
        self.tokenizer = load_tokenizer(config.model)
        self._decode = decoder_of(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = eos_token_ids(config.model)
        self._long_rope_from = long_rope_from(config.hf_config)
        self.vocab_size = config.vocab_size
        self.executor = create_executor(config)  # the runner (TP=1) or the worker processes
        try:
            self.num_kv_blocks = self.executor.determine_num_blocks()
            block = config.cache.block_size
            needed = -(-config.max_model_len // block)
            if self.num_kv_blocks < needed:
                raise ConfigError(f"the KV cache holds {self.num_kv_blocks} blocks of {block} "
                                  f"tokens, fewer than one sequence of max_model_len="
                                  f"{config.max_model_len} needs ({needed}): raise the KV budget "
                                  "or lower max_model_len")
            self.executor.init_kv_cache(self.num_kv_blocks)
        except BaseException:
            self.executor.close()
            raise
        self.block_manager = BlockManager(self.num_kv_blocks, block,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self._long_rope_from)
        self.requests: dict[str, _Request] = {}
        self._finished_seq_ids: list[int] = []  # the sampler forgets them at the next step
        self._inflight: _Step | None = None  # launched, tokens not applied (async scheduling)
        self._drained: list[RequestOutput] = []  # outputs drain() applied, for the next step
        self._ids = itertools.count()

    @property
    def load_report(self) -> dict | None:
        """Rank 0's report of the checkpoint tensors (missing, unexpected, misshaped)."""
        return self.executor.load_report

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None,
                    request_id: str | None = None) -> str:
        params = sampling_params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("give a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self._validate_prompt(prompt_token_ids, params)
        seqs = [Sequence(request_id, prompt_token_ids, params, index=i) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self._decode, params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt, prompt_token_ids, seqs, detoks)
        for seq in seqs:
            self.scheduler.add_seq(seq)
        return request_id

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        max_len, cap = self.config.max_model_len, self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > cap:
                raise RequestError(f"{name}={k} is more than this engine's max_logprobs={cap}: "
                                   "ask for fewer, or start the engine with a larger "
                                   "max_logprobs")
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len={max_len} "
                               "leaves no room to generate: shorten the prompt or raise "
                               "max_model_len")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {self.vocab_size})")

    def warm_up(self, max_steps: int = 400) -> None:
        """Run dummy requests through each kind of step real traffic makes, so that Triton
        compiles their kernels now instead of under the first users' requests (a cold compile
        made the first prefill steps of a served 8B model take 0.3-2.3 s instead of 0.2):
        a prefill of many prompts at once, a step that mixes decodes with a new prefill,
        sampling with top-k/top-p, a repetition penalty and logprobs, prompt logprobs, and a
        prompt longer than the step's token budget (chunked) where max_model_len allows.
        Leaves no request behind; at most max_steps steps (then the rest are aborted)."""
        cfg, rng = self.config, random.Random(0)
        budget, room = cfg.scheduler.max_num_batched_tokens, cfg.max_model_len - 8
        if room < 1:
            return
        n = max(1, min(16, cfg.scheduler.max_num_seqs))

        def prompt(length: int) -> list[int]:
            return [rng.randrange(self.vocab_size) for _ in range(max(1, min(room, length)))]

        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        ids = [self.add_request(None, greedy, prompt(budget // (2 * n)), f"warm-up-{i}")
               for i in range(n)]
        self.step()  # the many-prompt prefill, launched
        mixed = [SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=0, max_tokens=3,
                                ignore_eos=True, logprobs=2),
                 SamplingParams(temperature=0.7, repetition_penalty=1.1, max_tokens=3,
                                ignore_eos=True),
                 SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                prompt_logprobs=1)]
        for i, params in enumerate(mixed):  # joins the decodes of the prompts above
            ids.append(self.add_request(None, params, prompt(37 + 2 * i), f"warm-up-m{i}"))
        if room > budget:
            ids.append(self.add_request(None, greedy, prompt(budget + 17), "warm-up-long"))
        for _ in range(max_steps):
            if not self.has_unfinished_requests():
                break
            self.step()
        for rid in ids:
            self.abort_request(rid)  # (none left unless max_steps ran out)
        self.drain()
        self._drained = []

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        self._finished_seq_ids.extend(seq.seq_id for seq in req.seqs)

    def has_unfinished_requests(self) -> bool:
        # (an unfinished sequence of the step in flight is still the scheduler's)
        return self.scheduler.has_unfinished() or bool(self._drained)

    # -- the loop body ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step; apply the tokens of the step before it.

        With async_scheduling the step launched here runs on the device while this returns the
        outputs of the previous one, so the host's work (scheduling, batch building, applying
        tokens, stop checks) overlaps the device's; stop conditions stay exact (a sequence that
        stopped is dropped from the step launched meanwhile; penalties count a token still on
        the device, which the runner takes from the step's inputs).
        """
        outputs, self._drained = self._drained, []
        launched = self._launch()
        previous, self._inflight = self._inflight, None
        if previous is not None:
            try:
                outputs += self._apply(previous)
            except BaseException:
                self._inflight = launched  # still to be applied (or failed with the executor)
                raise
        if launched is not None and not self.config.async_scheduling:
            outputs += self._apply(launched)
        else:
            self._inflight = launched
        return outputs

    def drain(self) -> None:
        """Apply the step in flight now (its outputs come with the next step()); the executor
        then has nothing outstanding."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._drained += self._apply(step)

    def observe(self, spec) -> None:
        """The runner's observer hook (engine.runner.observer.ObserveSpec; None stops it)."""
        self.drain()
        self.executor.observe(spec)

    def take_observations(self):
        self.drain()
        return self.executor.take_observations()

    def collective_rpc(self, fn, *args) -> list:
        """fn(runner, *args) on every rank (see the executor's collective_rpc)."""
        self.drain()
        return self.executor.collective_rpc(fn, *args)

    def _launch(self) -> _Step | None:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return None
        prev = self._inflight.rows if self._inflight is not None else {}
        batch, prompt_seqs = build_batch(
            sched.scheduled, self.config.cache.block_size, self.eos_token_ids,
            self._finished_seq_ids, prev, self._long_rope_from)
        self._finished_seq_ids = []
        handle = self.executor.launch(batch)
        done = self.scheduler.update_from_output(sched)  # they sample a token this step
        for seq in done:
            seq.num_pending += 1
        rows = {seq_id: i for i, seq_id in enumerate(batch.sampling.seq_ids.tolist())}
        return _Step(handle, batch, done, prompt_seqs, rows)

    def _apply(self, step: _Step) -> list[RequestOutput]:
        try:
            out: RunnerOutput = step.handle.result()
        finally:
            for seq in step.done:
                seq.num_pending -= 1
        for seq, rows, entries in zip(step.prompt_seqs, step.batch.prompt_logprobs,
                                      out.prompt_logprobs):
            self._record_prompt_logprobs(seq, rows.first_position, entries)
        touched: dict[str, _Request] = {}
        for seq in step.done:
            if seq.is_finished:  # stopped or aborted while this step ran
                continue
            row = step.rows[seq.seq_id]
            seq.append_token(out.token_ids[row])
            if seq.sampling_params.logprobs is not None and out.logprobs is not None:
                seq.output_logprobs.append(out.logprobs[row])
            # (one preempted meanwhile keeps its token, and it may be the last: checked too)
            req = self.requests[seq.request_id]
            self._check_stop(seq, req.detoks[seq.index])
            if self.stream_outputs or seq.is_finished:
                touched[req.request_id] = req
        return [o for req in touched.values() if (o := self._output(req)) is not None]

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, first_pos: int,
                                entries: list[dict[int, float]]) -> None:
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first prompt token has no logprob
        if len(seq.prompt_logprobs) == first_pos:  # else recomputed after preemption: have it
            seq.prompt_logprobs.extend(entries)

    def _check_stop(self, seq: Sequence, detok: IncrementalDetokenizer | None) -> None:
        p = seq.sampling_params
        token = seq.output_token_ids[-1]
        incremental = detok is not None and (self.stream_outputs or p.stop_strs)
        new_text = detok.step(seq.output_token_ids) if incremental else ""
        seq.output_text += new_text
        status = None
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif token in p.stop_token_ids:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
            elif new_text and (stop := find_stop_string(seq, len(new_text))) is not None:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        # the tokens known so far: len(seq) would also count one still on the device
        known = seq.num_prompt_tokens + seq.num_output_tokens
        if status is None and (
                (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or known >= self.config.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(seq, status)
            self._finished_seq_ids.append(seq.seq_id)
            if incremental and not isinstance(seq.stop_reason, str):  # no stop string cut it
                seq.output_text += detok.flush(seq.output_token_ids)
            if detok is not None and not incremental:
                seq.output_text = self._decode(seq.output_token_ids, p.skip_special_tokens)

    def _output(self, req: _Request) -> RequestOutput | None:
        seqs = req.seqs
        one = seqs[0] if len(seqs) == 1 else None  # the common case, without the loops
        finished = one.is_finished if one is not None else all(s.is_finished for s in seqs)
        if not (finished or self.stream_outputs):
            return None
        first = not req.reported
        outs = self._deltas(req) if self.deltas else [CompletionOutput(
            index=s.index, text=visible_text(s), token_ids=list(s.output_token_ids),
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            logprobs=list(s.output_logprobs) if s.sampling_params.logprobs is not None else None)
            for s in seqs]
        params = seqs[0].sampling_params
        metrics = ({"num_cached_tokens": one.num_cached_tokens,
                    "num_preemptions": one.num_preemptions} if one is not None else
                   {"num_cached_tokens": max(s.num_cached_tokens for s in seqs),
                    "num_preemptions": sum(s.num_preemptions for s in seqs)})
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                            (seqs[0].prompt_logprobs if params.prompt_logprobs is not None
                             and (first or not self.deltas) else None),
                            finished, metrics)
        if finished:
            del self.requests[req.request_id]
        return out

    @staticmethod
    def _deltas(req: _Request) -> list[CompletionOutput]:
        """What each sequence added since the request's last output (those that moved)."""
        reported = req.reported
        if not reported:
            reported = req.reported = [(0, 0, False)] * len(req.seqs)
        outs = []
        for s in req.seqs:
            tokens, chars, done = reported[s.index]
            ids, finished = s.output_token_ids, s.is_finished
            # visible_text grows only: held-back text is released or cut at a stop
            text = visible_text(s) if s.sampling_params.stop_strs else s.output_text
            if len(ids) == tokens and len(text) == chars and (done or not finished):
                continue
            logprobs = s.output_logprobs[tokens:] \
                if s.sampling_params.logprobs is not None else None
            outs.append(CompletionOutput(s.index, text[chars:], ids[tokens:],
                                         s.finish_reason if finished else None,
                                         s.stop_reason, logprobs))
            reported[s.index] = (len(ids), len(text), finished)
        return outs

    def stats(self) -> EngineStats:
        """Read-only load figures for monitoring (running and waiting requests, KV usage)."""
        running = {s.request_id for s in self.scheduler.running}
        waiting = {s.request_id for s in self.scheduler.waiting} - running
        return EngineStats(len(running), len(waiting), self.block_manager.usage,
                           self.num_kv_blocks)

    def close(self) -> None:
        """Free the model and KV cache; with tensor parallelism stop and join the workers.
        Idempotent; the engine is unusable afterwards."""
        self.executor.close()

    def check_invariants(self) -> None:
        """Every block free or owned, ref counts consistent (tests call this)."""
        live = [s for r in self.requests.values() for s in r.seqs if not s.is_finished]
        self.block_manager.check_invariants(live)
