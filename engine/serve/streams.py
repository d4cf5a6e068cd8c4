"""What AsyncLLM hands to the event loop: EngineRequest in, RequestStream out.

A RequestStream lives on the event loop only. The engine core sends each request's outputs as
deltas (what is new since its last output); the stream merges the deltas a consumer has not
taken yet into one (vLLM's output coalescing), so a consumer that falls behind gets fewer,
larger pieces that still concatenate to the whole; metrics see every output as it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.core.outputs import CompletionOutput, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.serve.metrics import RequestTrack, ServingMetrics


class EngineLoopError(RuntimeError):
    """The engine failed while it ran a request (not the request's fault), or has stopped."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


def merged(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two successive delta outputs of one request as one: each sequence's text, tokens and
    logprobs concatenated, the later finish, the later metrics (they are running totals)."""
    outs = {c.index: c for c in a.outputs}
    for c in b.outputs:
        p = outs.get(c.index)
        if p is None:
            outs[c.index] = c
            continue
        logprobs = None if p.logprobs is None and c.logprobs is None else \
            (p.logprobs or []) + (c.logprobs or [])
        outs[c.index] = CompletionOutput(
            c.index, p.text + c.text, p.token_ids + c.token_ids,
            c.finish_reason or p.finish_reason,
            c.stop_reason if c.finish_reason else p.stop_reason, logprobs)
    return RequestOutput(b.request_id, b.prompt, b.prompt_token_ids, list(outs.values()),
                         a.prompt_logprobs if a.prompt_logprobs is not None
                         else b.prompt_logprobs, b.finished, b.metrics)


@dataclass(slots=True)
class _Sums:
    text: list[str]
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Collected:
    """A request's delta outputs added up as they come, for a response sent whole: what
    merging them pairwise (`merged`) gives, in time linear in the output's length (a merge
    copies the text and tokens so far, at every step)."""

    def __init__(self) -> None:
        self._last: RequestOutput | None = None
        self._prompt_logprobs = None
        self._seqs: dict[int, _Sums] = {}

    def add(self, out: RequestOutput) -> None:
        if self._prompt_logprobs is None:
            self._prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            seq = self._seqs.get(c.index)
            if seq is None:
                seq = self._seqs[c.index] = _Sums([], [])
            seq.text.append(c.text)
            seq.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if seq.logprobs is None:
                    seq.logprobs = []
                seq.logprobs.extend(c.logprobs)
            if c.finish_reason:
                seq.finish_reason, seq.stop_reason = c.finish_reason, c.stop_reason
        self._last = out

    def result(self) -> RequestOutput:
        last = self._last
        assert last is not None, "no output collected"
        outs = [CompletionOutput(i, "".join(s.text), s.token_ids, s.finish_reason,
                                 s.stop_reason, s.logprobs) for i, s in self._seqs.items()]
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, outs,
                             self._prompt_logprobs, last.finished, last.metrics)


class RequestStream:
    """The outputs of a group of engine requests (one HTTP request's prompts), as deltas.

    `async for outputs in stream` yields lists of RequestOutputs, one per request that advanced
    since the last iteration, until every request has finished. Each output holds only what is
    new since the last one yielded (text, token ids, logprobs; the prompt logprobs with the
    first), and only the sequences that moved: when the consumer falls behind, the outputs that
    arrived meanwhile are merged into one, so a busy server writes fewer, larger chunks.
    `abort()` ends the unfinished requests; it is idempotent and safe after the end.
    """

    def __init__(self, requests: list[EngineRequest], arrival: float, metrics: ServingMetrics,
                 abort: Callable[[list[str]], None]) -> None:
        self._metrics, self._abort = metrics, abort  # abort(ids): forget them, stop the engine
        self.requests = {r.request_id: r for r in requests}
        self._tracks = {r.request_id: RequestTrack(arrival) for r in requests}
        self._pending: dict[str, RequestOutput] = {}  # not yet taken by the consumer, in order
        self._unfinished = set(self.requests)
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._unfinished and not self._pending

    def __aiter__(self) -> AsyncIterator[list[RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[RequestOutput]]:
        while not self.finished or self._error is not None:  # next() raises the error
            yield await self.next()

    async def next(self) -> list[RequestOutput]:
        """What every request that advanced added since the last call; waits for one."""
        while not self._pending and self._error is None:
            self._event.clear()
            await self._event.wait()
        if self._error is not None and not self._pending:
            raise self._error
        outs = list(self._pending.values())
        self._pending.clear()
        return outs

    def abort(self) -> None:
        if self._unfinished:
            ids, self._unfinished = list(self._unfinished), set()
            self._abort(ids)
            now = time.monotonic()
            for rid in ids:
                self._metrics.on_finished(self._tracks[rid], "abort", now)

    # -- called on the loop by AsyncLLM --------------------------------------------------------
    def put(self, out: RequestOutput, now: float, step_start: float) -> None:
        """One delta output of a request (engine_core's wire output)."""
        rid = out.request_id
        if rid not in self._unfinished:
            return
        self._metrics.on_output(self._tracks[rid], out, now, step_start)
        pending = self._pending.get(rid)
        self._pending[rid] = out if pending is None else merged(pending, out)
        if out.finished:
            self._unfinished.discard(rid)
        self._event.set()

    def fail(self, rid: str, error: BaseException) -> None:
        if rid in self._unfinished:
            self._unfinished.discard(rid)
            self._metrics.on_finished(self._tracks[rid], "abort", time.monotonic())
            self._error = error
            self._event.set()

    def refused(self) -> None:
        """The engine refused the group: nothing of it runs."""
        self._unfinished.clear()
