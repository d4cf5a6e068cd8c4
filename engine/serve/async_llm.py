"""AsyncLLM: one LLMEngine driven by one thread, for an asyncio server.

The engine is not thread-safe, so a dedicated thread owns it. The event loop hands it commands
(add requests, abort, call a function) through a thread-safe queue; the thread applies them
between steps, runs `step()` while any request is unfinished and blocks on the queue when none
is. Each step's outputs go back to the loop in one `call_soon_threadsafe`, to the
RequestStream of each request (streams.py).

Leaving a stream unfinished (a consumer cancelled, a client gone) aborts its requests: the
thread frees their KV blocks before the next step. A step that raises fails every unfinished
request with an `EngineLoopError` naming the cause, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.config import EngineConfig
from engine.core.outputs import EngineStats, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.errors import RequestError
from engine.serve.metrics import ServingMetrics
from engine.serve.streams import EngineLoopError, EngineRequest, RequestStream

_STOP = object()


class AsyncLLM:
    """`AsyncLLM(config)` builds the engine on its own thread and returns once it is ready
    (raising what the engine raised if it could not start). Use it from one event loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = ServingMetrics(prefix_caching=config.cache.enable_prefix_caching)
        self.stats = EngineStats(0, 0, 0.0, 0)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # request id -> stream; the loop's only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self.error: BaseException | None = None  # why the engine thread stopped, if it did
        self._thread = threading.Thread(target=self._run, name="aphro-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            self._thread.join()
            raise self._init_error

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_streams(self) -> int:
        """HTTP requests the engine is serving now."""
        return len({id(s) for s in self._streams.values()})

    # -- the loop's side ---------------------------------------------------------------------
    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM is used from two event loops")
        if not self._thread.is_alive():
            raise EngineLoopError(f"the engine has stopped ({self.error or 'closed'})")
        return loop

    async def add_requests(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue requests on the engine; returns their stream once the engine accepted them
        all. A request the engine refuses (RequestError, ConfigError) raises here, and none of
        the group is kept."""
        loop = self._bind_loop()
        stream = RequestStream(requests, time.monotonic(), self.metrics,
                               lambda ids: self.forget(ids, abort=True))
        for rid in stream.requests:
            if rid in self._streams:
                raise RequestError(f"request id {rid!r} is already in use by a running request")
        for rid in stream.requests:
            self._streams[rid] = stream
        accepted = loop.create_future()
        self._commands.put(("add", requests, accepted))
        try:
            await accepted
        except BaseException:
            refused = accepted.done() and not accepted.cancelled() \
                and accepted.exception() is not None
            self.forget(list(stream.requests), abort=not refused)  # cancelled: maybe added
            stream.refused()
            raise
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """One request's outputs as it advances (text so far); aborts it if left early."""
        stream = await self.add_requests([EngineRequest(request_id, prompt_token_ids, params,
                                                        prompt)])
        try:
            async for outs in stream:
                for out in outs:
                    yield out
        finally:
            stream.abort()

    def forget(self, request_ids: list[str], abort: bool) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
        if abort:
            self._commands.put(("abort", request_ids))

    def abort_all(self) -> None:
        """End every request now (finish_reason "abort"); their streams end normally."""
        self._commands.put(("abort_all",))

    async def run_on_engine(self, fn: Callable[[Any], Any]) -> Any:
        """fn(engine) on the engine thread between steps; its result (or exception)."""
        done = self._bind_loop().create_future()
        self._commands.put(("call", fn, done))
        return await done

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the engine thread and close the engine (requests left are dropped)."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    def _deliver(self, events: list[tuple], stats: EngineStats, step_start: float) -> None:
        """On the loop: one step's outputs and command results."""
        self.stats = stats
        now = time.monotonic()
        for event in events:
            kind = event[0]
            if kind == "out":
                out = event[1]
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out, now, step_start)
                    if out.finished:
                        del self._streams[out.request_id]
            elif kind == "result":
                _, fut, value, error = event
                if not fut.done():
                    fut.set_exception(error) if error is not None else fut.set_result(value)
            else:  # "aborted" / "failed"
                stream = self._streams.pop(event[1], None)
                if stream is not None:
                    stream.end_aborted(event[1]) if kind == "aborted" else \
                        stream.fail(event[1], event[2])

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        from engine.core.llm_engine import LLMEngine

        try:
            engine = LLMEngine(self.config, stream_outputs=True)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
            self._init_error = e
            self._ready.set()
            return
        self.stats = engine.stats()
        self._ready.set()
        live: set[str] = set()
        try:
            while True:
                events: list[tuple] = []
                block = not engine.has_unfinished_requests()
                commands = [self._commands.get()] if block else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for cmd in commands:
                    if cmd is _STOP:
                        return
                    self._apply(engine, cmd, live, events)
                step_start = time.monotonic()
                if engine.has_unfinished_requests():
                    try:
                        outs = engine.step()
                    except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                        error = EngineLoopError(f"the engine step failed: {type(e).__name__}: "
                                                f"{e}")
                        for rid in list(live):
                            engine.abort_request(rid)
                            events.append(("failed", rid, error))
                        live.clear()
                        outs = []
                    for out in outs:
                        events.append(("out", out))
                        if out.finished:
                            live.discard(out.request_id)
                if (events or commands) and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, events, engine.stats(),
                                                    step_start)
        except BaseException as e:  # noqa: BLE001 - the loop itself broke: say why, end
            self.error = e
            error = EngineLoopError(f"the engine loop stopped: {type(e).__name__}: {e}")
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(
                    self._deliver, [("failed", rid, error) for rid in live], EngineStats(
                        0, 0, 0.0, self.stats.num_kv_blocks), 0.0)
        finally:
            engine.close()

    def _apply(self, engine, cmd: tuple, live: set[str], events: list[tuple]) -> None:
        kind = cmd[0]
        if kind == "add":
            _, requests, fut = cmd
            added: list[str] = []
            try:
                for r in requests:
                    engine.add_request(r.prompt, r.params, r.prompt_token_ids, r.request_id)
                    added.append(r.request_id)
            except Exception as e:  # noqa: BLE001 - the caller's error (RequestError mostly)
                for rid in added:
                    engine.abort_request(rid)
                events.append(("result", fut, None, e))
                return
            live.update(added)
            events.append(("result", fut, None, None))
        elif kind == "abort":
            for rid in cmd[1]:
                if rid in live:
                    engine.abort_request(rid)
                    live.discard(rid)
        elif kind == "abort_all":
            for rid in list(live):
                engine.abort_request(rid)
                events.append(("aborted", rid))
            live.clear()
        elif kind == "call":
            _, fn, fut = cmd
            try:
                events.append(("result", fut, fn(engine), None))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                events.append(("result", fut, None, e))
