"""AsyncLLM: the server's handle on an engine core in its own process, for an asyncio server.

The engine runs in a child process (engine_core.py), so the event loop that serves HTTP never
shares a GIL with it: the engine steps at its own pace while the loop writes the streams. The
loop sends commands (add requests, abort, RPCs) down one pipe; the core sends one message per
step up another, which the loop reads when the pipe is readable (no thread) and hands to the
RequestStream of each request (streams.py) as deltas.

Leaving a stream unfinished (a consumer cancelled, a client gone) aborts its requests: the core
frees their KV blocks before its next step. A step that raises fails every unfinished request
with an `EngineLoopError` naming the cause, and the core goes on. If the core process dies, every
request in flight fails with an `EngineLoopError` naming how it ended, `is_running` turns false
(the server's /health answers 503) and the server itself keeps answering.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import multiprocessing
import pickle
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.config import EngineConfig
from engine.core.outputs import EngineStats, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.errors import ConfigError, RequestError
from engine.serve.engine_core import (
    MessageReader,
    MessageWriter,
    delta_output,
    describe_exit,
    run_engine_core,
    widen_pipe,
)
from engine.serve.metrics import ServingMetrics
from engine.serve.streams import EngineLoopError, EngineRequest, RequestStream, merged


class AsyncLLM:
    """`AsyncLLM(config)` starts the engine core process and returns once the engine is ready
    (raising what the engine raised if it could not start). Use it from one event loop; call
    `close()` to stop the core (it is also stopped when the interpreter exits)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = ServingMetrics(prefix_caching=config.cache.enable_prefix_caching)
        self.stats = EngineStats(0, 0, 0.0, 0)
        self._streams: dict[str, RequestStream] = {}  # request id -> stream; the loop's only
        self._calls: dict[int, asyncio.Future] = {}  # call id -> the caller's future
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._closed = False
        ctx = multiprocessing.get_context("spawn")
        core_commands, commands = ctx.Pipe(duplex=False)
        outputs, core_outputs = ctx.Pipe(duplex=False)
        widen_pipe(core_outputs)
        widen_pipe(commands)
        self._outputs = MessageReader(outputs)
        self._commands = MessageWriter(commands, blocking=False)  # see _send
        self._writing = False  # a writer callback is registered for the command pipe
        # not a daemon: the core may start processes of its own (tensor-parallel workers,
        # compile pools); it ends itself when this process's end of the pipe closes
        self._proc = ctx.Process(target=run_engine_core, name="aphro-engine-core",
                                 args=(config, core_commands, core_outputs), daemon=False)
        try:
            self._proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            self._commands.close()
            self._outputs.close()
            raise ConfigError(f"the engine config cannot be sent to the engine process ({e}): "
                              "register the model class as 'package.module:Class' from an "
                              "importable module") from e
        finally:
            core_commands.close()
            core_outputs.close()
        self._at_exit = functools.partial(_stop_core, self._proc, self._commands, self._outputs)
        atexit.register(self._at_exit)  # runs before multiprocessing joins its children
        ready = self._wait_ready()
        if ready[0] != "ready":
            self.close()
            if ready[0] == "init_error":
                raise ready[1]
            raise EngineLoopError(f"the engine process {describe_exit(self._proc.exitcode)} "
                                  "while starting (see its output above)")
        self.stats = ready[1]

    def _wait_ready(self) -> tuple:
        reader = self._outputs
        while not reader.eof:
            if reader.wait(0.2):
                if msgs := reader.read():
                    reader.backlog = msgs[1:]  # (none: the core waits for commands first)
                    return msgs[0]
            elif not self._proc.is_alive():
                break
        self._proc.join(10)
        return ("exited",)

    @property
    def is_running(self) -> bool:
        return not self._closed and self._error is None and self._proc.is_alive()

    @property
    def error(self) -> BaseException | None:
        """Why the engine stopped, if it stopped other than by close()."""
        if self._error is None and not self._closed and not self._proc.is_alive():
            return EngineLoopError(f"the engine process {describe_exit(self._proc.exitcode)}")
        return self._error

    @property
    def num_streams(self) -> int:
        """HTTP requests the engine is serving now."""
        return len({id(s) for s in self._streams.values()})

    # -- the loop's side ---------------------------------------------------------------------
    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._outputs.fd, self._on_readable)
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM is used from two event loops")
        if not self.is_running:
            raise EngineLoopError(f"the engine has stopped ({self.error or 'closed'})")
        return loop

    def _send(self, cmd: tuple) -> None:
        """Queue a command for the core without blocking the loop: what the pipe does not take
        now is written when it is writable again (the core reads commands between steps).
        Off the loop (before its first request) the write waits, up to a few seconds."""
        try:
            self._commands.send(cmd)
            if self._commands.pending:
                if self._loop is None:
                    self._commands.flush(5.0)
                elif not self._writing:
                    self._loop.add_writer(self._commands.fd, self._on_writable)
                    self._writing = True
        except (OSError, ValueError) as e:  # the core is gone (or closed)
            if self._loop is not None and not self._closed:
                self._core_died(f"cannot reach the engine process ({e})")
            raise EngineLoopError(f"the engine has stopped ({self.error or 'closed'})") from None

    def _on_writable(self) -> None:
        try:
            self._commands.flush()
        except (OSError, ValueError) as e:
            self._stop_writing()
            self._core_died(f"cannot reach the engine process ({e})")
            return
        if not self._commands.pending:
            self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._commands.fd)
            self._writing = False

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
        call_id = next(self._call_ids)
        accepted = self._calls[call_id] = loop.create_future()
        try:
            self._send(("add", call_id, requests))
            await accepted
        except BaseException:
            self._calls.pop(call_id, None)
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
        total: RequestOutput | None = None
        try:
            async for outs in stream:
                for out in outs:
                    total = out if total is None else merged(total, out)
                    yield total
        finally:
            stream.abort()

    def forget(self, request_ids: list[str], abort: bool) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
        if abort and self.is_running:
            with contextlib.suppress(EngineLoopError):
                self._send(("abort", request_ids))

    def abort_all(self) -> None:
        """End every request now (finish_reason "abort"); their streams end normally."""
        if self.is_running:
            with contextlib.suppress(EngineLoopError):
                self._send(("abort_all",))

    async def call(self, name: str | Callable, *args) -> Any:
        """An RPC on the engine core between steps: "check" (the block manager's invariants
        hold; returns (EngineStats, whether any request is unfinished)), or a
        module-level function fn, run as fn(engine, *args) (it is pickled by reference, so the
        core imports its module). Returns its result or raises its exception."""
        try:
            payload = pickle.dumps((name, args))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"{name!r} cannot be sent to the engine process ({e}): pass a "
                            "module-level function") from None
        call_id = next(self._call_ids)
        done = self._calls[call_id] = self._bind_loop().create_future()
        try:
            self._send(("call", call_id, payload))
            return await done
        finally:
            self._calls.pop(call_id, None)

    async def check_engine(self) -> tuple[EngineStats, bool]:
        """Check the engine's block bookkeeping (raises if broken); its stats, and whether any
        request is unfinished."""
        return await self.call("check")

    async def run_on_engine(self, fn: Callable, *args) -> Any:
        """fn(engine, *args) in the engine process between steps (fn: a module-level
        function); its result (or exception)."""
        return await self.call(fn, *args)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the engine core and wait for it (requests left are dropped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._stop_writing()  # _stop_core writes what is still queued
        _stop_core(self._proc, self._commands, self._outputs, timeout)

    # -- core messages, on the loop ----------------------------------------------------------
    def _on_readable(self) -> None:
        reader = self._outputs
        for msg in reader.read():
            if msg[0] == "step":
                self._deliver(*msg[1:])
            elif msg[0] == "died":
                self._core_died(f"the engine loop stopped: {msg[1]}")
                return
        if reader.eof:
            self._proc.join(5)
            self._core_died(f"the engine process {describe_exit(self._proc.exitcode)}")

    def _deliver(self, step_start: float, stats: EngineStats, outputs: list[tuple],
                 replies: list[tuple], ended: list[tuple]) -> None:
        """One step of the core (engine_core's wire format)."""
        self.stats = stats
        now = time.monotonic()
        for call_id, value, error in replies:
            fut = self._calls.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(value)
        streams = self._streams
        for wire in outputs:
            rid = wire[0]
            stream = streams.get(rid)
            if stream is not None:
                stream.put(delta_output(stream.requests[rid], wire), now, step_start)
                if wire[1]:  # finished
                    del streams[rid]
        for rid, message in ended:
            stream = streams.pop(rid, None)
            if stream is not None:
                stream.fail(rid, EngineLoopError(message))

    def _core_died(self, reason: str) -> None:
        """The core is gone: fail everything in flight; the server goes on (unhealthy)."""
        if self._error is None:
            self._error = EngineLoopError(reason)
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._outputs.fd)
        self._stop_writing()
        error = EngineLoopError(reason)
        for rid, stream in list(self._streams.items()):
            stream.fail(rid, error)
        self._streams.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        self._calls.clear()
        self.stats = EngineStats(0, 0, 0.0, self.stats.num_kv_blocks)


def _stop_core(proc, commands, outputs, timeout: float | None = 60.0) -> None:
    """Ask the core to stop, read (and drop) what it still sends so it never blocks on a full
    pipe, wait for it; terminate it if it does not end in time."""
    if proc.is_alive():
        stopping = True
        with contextlib.suppress(OSError, ValueError):
            commands.send(("stop",))
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while proc.is_alive() and time.monotonic() < deadline:
            if stopping and commands.pending:  # behind what the loop had queued
                try:
                    commands.flush(0.0)
                except (OSError, ValueError):
                    stopping = False
            if outputs.wait(0.05):
                outputs.read()
            if outputs.eof:
                proc.join(max(0.0, deadline - time.monotonic()))
                break
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
    proc.join(5)
    commands.close()
    outputs.close()
