"""The engine core: the process that owns the LLMEngine for the server (vLLM's EngineCore).

`run_engine_core` is the target of a spawned child process. It builds the engine (and through
it, with tensor parallelism, the worker processes), reports ("ready", stats) or
("init_error", exception), then loops: apply every command waiting on its pipe, run one
`step()` while any request is unfinished, block on the pipe when none is. The server's event
loop lives in another process, so the two never share a GIL.

Each loop turn sends at most one message, carrying all of that step's outputs as the engine's
deltas (LLMEngine(deltas=True): the tokens, text and logprobs added since the request's last
output; cumulative outputs would cost O(length) per token to build and send):

    ("step", step_start, stats, outputs, replies, ended)
    outputs  [(request_id, finished, seqs, prompt_logprobs | None (first output only),
               num_cached_tokens, num_preemptions)]
    seqs     [(index, new_text, new_token_ids, finish_reason, stop_reason,
               new_logprobs | None)]   -- CompletionOutput's field order; only those that moved
    replies  [(call_id, value, error | None)]  -- answers to "add" and "call"
    ended    [(request_id, error message)]  -- requests a failing step ended

Messages both ways are framed by MessageWriter and MessageReader (an 8-byte length, then the
pickle), not by Connection.send / recv: the server's event loop may put its end of a pipe in
non-blocking mode (uvloop's add_reader does), where Connection.recv fails on a message that is
still being written. The reader takes what the pipe holds and keeps partial messages for later.
The server writes its commands without blocking (the core reads them only between steps: a
blocking write into a full pipe stalled the whole event loop for the length of a prefill step)
and writes the rest when the pipe is writable again.

Commands (tuples) from the server: ("add", call_id, [EngineRequest]), ("abort", [ids]),
("abort_all",), ("call", call_id, pickled (name, args)), ("stop",). The core ends when the server's end
of the pipe closes (the server process died), so it never outlives it; SIGINT is left to the
server, which decides when the core stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pickle
import select
import signal
import struct
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from engine.config import EngineConfig
from engine.core.outputs import CompletionOutput, RequestOutput

PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size: room for many steps while the server reads


def widen_pipe(conn: Connection) -> None:
    """Give a pipe PIPE_BYTES of buffer where the OS allows it (Linux), so the core rarely waits
    for the server to read."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


_LENGTH = struct.Struct("<Q")
_READ_BYTES = 1 << 20


class MessageWriter:
    """One end's writer of framed pickles. Blocking (the core's output pipe): send() returns
    once the message is in the pipe. Non-blocking (the server's command pipe, written from its
    event loop): send() queues the message and writes what the pipe takes; `pending` says
    bytes are left, flush() writes more when the pipe is writable, and flush(timeout) waits."""

    def __init__(self, conn: Connection, blocking: bool = True) -> None:
        self.conn, self.fd, self.blocking = conn, conn.fileno(), blocking
        os.set_blocking(self.fd, blocking)
        self._out = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._out)

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self._out += _LENGTH.pack(len(data))
        self._out += data
        self.flush(None if self.blocking else 0.0)

    def flush(self, timeout: float | None = 0.0) -> None:
        """Write queued bytes: all of them (timeout None), or what fits within timeout seconds.
        Raises OSError (BrokenPipeError) when the reader is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._out:
            try:
                with memoryview(self._out) as view:
                    n = os.write(self.fd, view)
                del self._out[:n]
                continue
            except BlockingIOError:
                pass
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            select.select([], [self.fd], [], left)

    def close(self) -> None:
        self.conn.close()


class MessageReader:
    """The server's end of the output pipe. read() never blocks: it takes what the pipe holds
    and returns the whole messages received so far (a partial one waits for its rest);
    `eof` turns true once the writer is gone and everything before it was read."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.fd = conn, conn.fileno()
        os.set_blocking(self.fd, False)
        self._buf = bytearray()
        self._closed = False  # the writer closed its end
        self.backlog: list[Any] = []  # messages read but not yet handed out

    @property
    def eof(self) -> bool:
        return self._closed and not self.backlog  # what is left in _buf is a partial message

    def wait(self, timeout: float | None) -> bool:
        """Wait up to timeout seconds (None: until there is) for something to read; True if
        there is."""
        if self.backlog or self._closed:
            return True
        return bool(select.select([self.fd], [], [], timeout)[0])

    def read(self) -> list[Any]:
        for _ in range(4):  # a few pipefuls at most, so one wake cannot starve the loop
            if self._closed:
                break
            try:
                chunk = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError:  # closed under us: as an end of the stream
                chunk = b""
            if not chunk:
                self._closed = True
                break
            self._buf += chunk
            if len(chunk) < _READ_BYTES:
                break  # drained; what comes next wakes the loop again
        out, self.backlog = self.backlog, []
        buf, pos = self._buf, 0
        while len(buf) - pos >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(buf, pos)
            end = pos + _LENGTH.size + n
            if len(buf) < end:
                break
            out.append(pickle.loads(bytes(buf[pos + _LENGTH.size:end])))
            pos = end
        del buf[:pos]
        return out

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def frozen_heap():
    """Everything alive now (imports, the engine or the app) moved out of the garbage
    collector's full collections while the block runs, so they do not walk it step after step
    (vLLM does the same); unfrozen after: frozen objects are never freed at exit, and native
    ones would say "leaked"."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def sendable(error: BaseException) -> BaseException:
    """The exception if it survives pickling, else the nearest base class of it that does
    (with the same message), so the server raises the same kind of error."""
    for cls in type(error).__mro__:
        if issubclass(cls, BaseException) and (candidate := _rebuilt(error, cls)) is not None:
            return candidate
    return RuntimeError(f"{type(error).__name__}: {error}")


def _rebuilt(error: BaseException, cls: type) -> BaseException | None:
    """error as a cls (itself when cls is its class) if that survives pickling, else None."""
    try:
        candidate = error if cls is type(error) else cls(str(error))
        pickle.loads(pickle.dumps(candidate))
    except Exception:  # noqa: BLE001 - any failure to rebuild or pickle
        return None
    return candidate


def run_engine_core(config: EngineConfig, command_pipe: Connection,
                    output_pipe: Connection) -> None:
    """The child process's body (see the module docstring)."""
    outputs, commands = MessageWriter(output_pipe), MessageReader(command_pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the server drains
    if config.device.type == "cpu":  # leave a core to the server process
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    from engine.core.llm_engine import LLMEngine

    engine = None
    try:
        engine = LLMEngine(config, stream_outputs=True, deltas=True)
        if config.device.type == "cuda":  # Triton compiles before the first request, not in it
            engine.warm_up()
    except BaseException as e:  # noqa: BLE001 - handed to the server, which raises it
        if not isinstance(e, Exception):
            traceback.print_exc()
        if engine is not None:
            engine.close()
        outputs.send(("init_error", sendable(e)))
        return
    with frozen_heap():  # the engine's objects out of the collector's passes: steps stay even
        try:
            outputs.send(("ready", engine.stats()))
            EngineCore(engine).run(commands, outputs)
        except (EOFError, BrokenPipeError):
            pass  # the server is gone: nobody to answer
        except Exception as e:  # noqa: BLE001 - the loop itself broke: say why, then end
            traceback.print_exc()
            with contextlib.suppress(OSError):
                outputs.send(("died", f"{type(e).__name__}: {e}"))
        finally:
            engine.close()


class EngineCore:
    """The busy loop over one LLMEngine; its commands and its delta outputs."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.live: set[str] = set()  # the requests the server still waits on

    def run(self, commands: MessageReader, outputs: MessageWriter) -> None:
        engine = self.engine
        while True:
            replies: list[tuple] = []
            deltas: list[tuple] = []
            ended: list[tuple] = []
            if not engine.has_unfinished_requests():
                commands.wait(None)  # idle: block until a command (or EOF: the server died)
            received = commands.read()
            if commands.eof:
                raise EOFError("the server closed the command pipe")
            got = bool(received)
            for cmd in received:
                if not self.apply(cmd, replies, deltas):
                    return
            step_start = time.monotonic()
            if engine.has_unfinished_requests():
                try:
                    outs = engine.step()
                except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                    message = f"the engine step failed: {type(e).__name__}: {e}"
                    for rid in self.live:
                        engine.abort_request(rid)
                        ended.append((rid, message))
                    self.live.clear()
                    outs = []
                for out in outs:
                    self.delta(out, deltas)
            if deltas or replies or ended or got:
                outputs.send(("step", step_start, engine.stats(), deltas, replies, ended))

    def delta(self, out: RequestOutput, deltas: list[tuple]) -> None:
        """The engine's delta output on the wire (the module docstring's tuple)."""
        if out.request_id not in self.live:  # aborted meanwhile
            return
        if out.finished:
            self.live.discard(out.request_id)
        m = out.metrics
        deltas.append((out.request_id, out.finished,
                       [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                         c.logprobs) for c in out.outputs],
                       out.prompt_logprobs, m.get("num_cached_tokens", 0),
                       m.get("num_preemptions", 0)))

    def apply(self, cmd: tuple, replies: list[tuple], deltas: list[tuple]) -> bool:
        """One command; False for "stop"."""
        kind, engine = cmd[0], self.engine
        if kind == "add":
            _, call_id, requests = cmd
            added: list[str] = []
            try:
                for r in requests:
                    engine.add_request(r.prompt, r.params, r.prompt_token_ids, r.request_id)
                    added.append(r.request_id)
            except Exception as e:  # noqa: BLE001 - the caller's error (RequestError mostly)
                for rid in added:
                    engine.abort_request(rid)
                replies.append((call_id, None, sendable(e)))
                return True
            self.live.update(r.request_id for r in requests)
            replies.append((call_id, None, None))
        elif kind == "abort":
            for rid in cmd[1]:
                if rid in self.live:
                    self.live.discard(rid)
                    engine.abort_request(rid)
        elif kind == "abort_all":  # each request ends with finish_reason "abort"
            for rid in self.live:
                req = engine.requests.get(rid)
                seqs = [(s.index, "", [], "abort", None, None)
                        for s in (req.seqs if req is not None else []) if not s.is_finished]
                engine.abort_request(rid)
                deltas.append((rid, True, seqs, None, 0, 0))
            self.live.clear()
        elif kind == "call":
            _, call_id, payload = cmd
            try:  # unpickled here: a function whose module the core cannot import is an error
                name, args = pickle.loads(payload)
                replies.append((call_id, self.call(name, *args), None))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                replies.append((call_id, None, sendable(e)))
        elif kind == "stop":
            return False
        return True

    def call(self, name: Any, *args) -> Any:
        """The named RPCs; a callable (a module-level function, sent by reference) runs as
        fn(engine, *args)."""
        engine = self.engine
        if callable(name):
            return name(engine, *args)
        if name == "check":  # the block bookkeeping whole; load; anything unfinished
            engine.check_invariants()
            return engine.stats(), engine.has_unfinished_requests()
        raise ValueError(f"no engine RPC named {name!r}")


def describe_exit(code: int | None) -> str:
    """A dead process's exit code in words."""
    if code is None:
        return "is not running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def delta_output(request, wire: tuple) -> RequestOutput:
    """One wire output (see the module docstring) as a RequestOutput of deltas."""
    rid, finished, seqs, plp, cached, preemptions = wire
    return RequestOutput(rid, request.prompt, request.prompt_token_ids,
                         [CompletionOutput(*s) for s in seqs], plp, finished,
                         {"num_cached_tokens": cached, "num_preemptions": preemptions})
