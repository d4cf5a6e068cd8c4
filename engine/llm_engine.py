"""LLMEngine: requests in, one scheduling + model step at a time, outputs out.

`step()` is the whole loop body; LLM (offline) and an async server both drive it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import CacheConfig, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text
from engine.errors import ConfigError, RequestError
from engine.executor import Executor
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import Sampler, SamplingMetadata
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.worker import WorkerConfig


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, worker_config: WorkerConfig, scheduler_config: SchedulerConfig,
                 cache_config: CacheConfig, stream_outputs: bool = True) -> None:
        # stream_outputs: step() reports every request that advanced, with its text so far;
        # otherwise only finished requests, and text is decoded once at the end (unless stop
        # strings need it as it grows)
        self.stream_outputs = stream_outputs
        self.executor = Executor(worker_config)  # the driver + one process per other TP rank
        self.worker = self.executor.driver  # rank 0's Worker
        self.hf_config, self.tokenizer = self.executor.hf_config, self.executor.tokenizer
        self.eos_token_ids = self.executor.eos_token_ids
        self.vocab_size = self.hf_config.vocab_size
        max_len = getattr(self.hf_config, "max_position_embeddings", None) or \
            self.executor.max_model_len
        if scheduler_config.max_model_len > max_len:
            self.executor.close()
            raise ConfigError(f"max_model_len={scheduler_config.max_model_len} is larger than "
                              f"the model's max_position_embeddings ({max_len})")
        self.scheduler_config, self.cache_config = scheduler_config, cache_config
        num_blocks = self.executor.init_kv_cache(cache_config)
        cache_config.num_blocks = num_blocks
        needed = -(-scheduler_config.max_model_len // cache_config.block_size)
        if num_blocks < needed:
            self.executor.close()
            raise ConfigError(f"the KV cache holds {num_blocks} blocks of "
                              f"{cache_config.block_size} tokens, fewer than one sequence of "
                              f"max_model_len={scheduler_config.max_model_len} needs ({needed}):"
                              " raise the KV budget or lower max_model_len")
        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

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
        detoks = [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                  if self.tokenizer is not None else None for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt, prompt_token_ids, seqs, detoks)
        for seq in seqs:
            self.scheduler.add_seq(seq)
        return request_id

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        max_len = self.scheduler_config.max_model_len
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

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        for seq in req.seqs:
            self.sampler.free(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop body ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        model_input = self.executor.prepare(sched.scheduled)
        logits, prompt_logits = self.executor.execute(model_input)
        for (seq, first_pos, _), pl in zip(model_input.prompt_logprob_rows, prompt_logits):
            self._record_prompt_logprobs(seq, first_pos, pl)
        done = self.scheduler.update_from_output(sched)
        assert [s.seq_id for s in done] == [s.seq_id for s in model_input.sample_seqs]
        touched: dict[str, _Request] = {}
        if done:
            meta = SamplingMetadata.build(done, logits.device, self.eos_token_ids)
            out = self.sampler(logits, meta)
            token_ids = out.token_ids.tolist() if torch.is_tensor(out.token_ids) \
                else list(out.token_ids)
            for i, (seq, token) in enumerate(zip(done, token_ids)):
                seq.append_token(token)
                if seq.sampling_params.logprobs is not None and out.logprobs is not None:
                    seq.output_logprobs.append(out.logprobs[i])
                req = self.requests[seq.request_id]
                self._check_stop(seq, req.detoks[seq.index])
                if self.stream_outputs or seq.is_finished:
                    touched[req.request_id] = req
        return [out for req in touched.values() if (out := self._output(req)) is not None]

    def _record_prompt_logprobs(self, seq: Sequence, first_pos: int, logits: torch.Tensor):
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first prompt token has no logprob
        if len(seq.prompt_logprobs) != first_pos:  # recomputed after preemption: already have it
            return
        k = seq.sampling_params.prompt_logprobs
        lp = torch.log_softmax(logits.float(), dim=-1)
        targets = seq.prompt_token_ids[first_pos:first_pos + lp.shape[0]]
        top = lp.topk(k, dim=-1) if k else None
        for row, tok in enumerate(targets):
            entry = {tok: lp[row, tok].item()}
            if top is not None:
                entry.update(zip(top.indices[row].tolist(), top.values[row].tolist()))
            seq.prompt_logprobs.append(entry)

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
        if status is None and (
                (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or len(seq) >= self.scheduler_config.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(seq, status)
            self.sampler.free(seq.seq_id)
            if detok is not None and not incremental:
                seq.output_text = self.tokenizer.decode(seq.output_token_ids,
                                                        skip_special_tokens=p.skip_special_tokens)

    def _output(self, req: _Request) -> RequestOutput | None:
        finished = all(s.is_finished for s in req.seqs)
        if not (finished or self.stream_outputs):
            return None
        outs = [CompletionOutput(
            index=s.index, text=visible_text(s), token_ids=list(s.output_token_ids),
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            logprobs=list(s.output_logprobs) if s.sampling_params.logprobs is not None else None)
            for s in req.seqs]
        params = req.seqs[0].sampling_params
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                            prompt_logprobs=(req.seqs[0].prompt_logprobs
                                             if params.prompt_logprobs is not None else None),
                            finished=finished,
                            metrics={"num_cached_tokens": max(s.num_cached_tokens
                                                              for s in req.seqs),
                                     "num_preemptions": sum(s.num_preemptions
                                                            for s in req.seqs)})
        if finished:
            del self.requests[req.request_id]
        return out

    def close(self) -> None:
        """Free the model and KV cache on every rank (also on garbage collection); see
        LLM.close."""
        self.executor.close()

    def check_invariants(self) -> None:
        """Every block free or owned, ref counts consistent (tests call this)."""
        live = [s for r in self.requests.values() for s in r.seqs if not s.is_finished]
        self.block_manager.check_invariants(live)
