"""What AsyncLLM hands to the event loop: EngineRequest in, RequestStream out.

A RequestStream lives on the event loop only. It keeps the newest output of each of its
requests (each output carries the text so far), so a consumer that falls behind skips the
intermediate ones; metrics see every output as it arrives.
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


class RequestStream:
    """The outputs of a group of engine requests (one HTTP request's prompts), newest only.

    `async for outputs in stream` yields lists of RequestOutputs, one per request that advanced
    since the last iteration, until every request has finished. `abort()` ends the unfinished
    ones; it is idempotent and safe after the end.
    """

    def __init__(self, requests: list[EngineRequest], arrival: float, metrics: ServingMetrics,
                 abort: Callable[[list[str]], None]) -> None:
        self._metrics, self._abort = metrics, abort  # abort(ids): forget them, stop the engine
        self.requests = {r.request_id: r for r in requests}
        self._tracks = {r.request_id: RequestTrack(arrival) for r in requests}
        self._latest: dict[str, RequestOutput] = {}
        self._changed: dict[str, None] = {}  # an ordered set
        self._unfinished = set(self.requests)
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._unfinished and not self._changed

    def __aiter__(self) -> AsyncIterator[list[RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[RequestOutput]]:
        while not self.finished or self._error is not None:  # next() raises the error
            yield await self.next()

    async def next(self) -> list[RequestOutput]:
        """The newest output of every request that advanced; waits for one."""
        while not self._changed and self._error is None:
            self._event.clear()
            await self._event.wait()
        if self._error is not None and not self._changed:
            raise self._error
        outs = [self._latest[rid] for rid in self._changed]
        self._changed.clear()
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
        rid = out.request_id
        if rid not in self._unfinished:
            return
        self._metrics.on_output(self._tracks[rid], out, now, step_start)
        self._latest[rid] = out
        self._changed[rid] = None
        if out.finished:
            self._unfinished.discard(rid)
        self._event.set()

    def end_aborted(self, rid: str) -> None:
        """The server aborted this request: end it with finish_reason "abort"."""
        req, last = self.requests[rid], self._latest.get(rid)
        outs = [CompletionOutput(c.index, c.text, c.token_ids, c.finish_reason or "abort",
                                 c.stop_reason, c.logprobs) for c in last.outputs] if last else \
            [CompletionOutput(i, "", [], "abort") for i in range(req.params.n)]
        self.put(RequestOutput(rid, req.prompt, req.prompt_token_ids, outs,
                                last.prompt_logprobs if last else None, True,
                                last.metrics if last else {}), time.monotonic(), 0.0)

    def fail(self, rid: str, error: BaseException) -> None:
        if rid in self._unfinished:
            self._unfinished.discard(rid)
            self._metrics.on_finished(self._tracks[rid], "abort", time.monotonic())
            self._error = error
            self._event.set()

    def refused(self) -> None:
        """The engine refused the group: nothing of it runs."""
        self._unfinished.clear()
