"""Running the server: uvicorn over the app, a socket bound before the engine is needed, and a
graceful stop.

Stopping (SIGTERM or SIGINT in the main thread, or `APIServer.shutdown()`): the listening socket
closes and new requests get 503; requests in flight may finish for `shutdown_timeout` seconds;
then the rest are aborted, so each stream still ends with its finish chunk and `[DONE]`; the
process then exits normally (status 0). A second signal aborts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.serve.api_server import build_app
from engine.serve.async_llm import AsyncLLM
from engine.serve.engine_core import frozen_heap
from engine.serve.serving import ServeOptions, Serving

_ABORT_GRACE_S = 10.0  # after the abort: time for handlers to write their last chunk


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (less work per streamed chunk), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; choose another "
                          "--port (0 picks a free one) or stop what holds it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class APIServer(uvicorn.Server):
    """uvicorn serving `build_app(Serving(llm, options))` on a bound socket."""

    def __init__(self, llm: AsyncLLM, options: ServeOptions, sock: socket.socket,
                 shutdown_timeout: float = 30.0, log_level: str = "warning") -> None:
        self.serving = Serving(llm, options)
        self.sock, self.shutdown_timeout = sock, shutdown_timeout
        config = uvicorn.Config(
            build_app(self.serving), http="h11", ws="none", lifespan="off",
            log_level=log_level, access_log=False, server_header=False,
            h11_max_incomplete_event_size=options.limits.max_header_bytes,
            timeout_graceful_shutdown=shutdown_timeout + _ABORT_GRACE_S)
        super().__init__(config)
        self._stopping: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_ready: Callable[[], None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=[self.sock])

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own handlers re-raise the signal once it has stopped (exit status -15);
        # these drain and let the process exit normally
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def begin_shutdown(self) -> None:
        """On the server's loop: start the graceful stop (a second call aborts at once)."""
        if self._stopping is None:
            self.serving.draining = True  # from now on new requests get 503
            self.should_exit = True  # uvicorn closes the listener and waits for connections
            self._stopping = asyncio.ensure_future(self._drain())
        else:
            self.serving.llm.abort_all()

    def shutdown_threadsafe(self) -> None:
        """From another thread: begin_shutdown on the server's loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    async def _drain(self) -> None:
        llm = self.serving.llm
        deadline = time.monotonic() + self.shutdown_timeout
        while llm.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if llm.num_streams:
            llm.abort_all()


def run_server(config: EngineConfig, options: ServeOptions, host: str = "127.0.0.1",
               port: int = 8000, shutdown_timeout: float = 30.0,
               say: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM / SIGINT; returns once drained and the engine core process has
    stopped."""
    sock = bind_socket(host, port)
    try:
        say(f"loading {config.model} ...")
        llm = AsyncLLM(config)
        try:
            server = APIServer(llm, options, sock, shutdown_timeout)
            server.on_ready = lambda: say(
                f"serving {options.served_model_names[0]!r} on {server.url} "
                "(OpenAI API under /v1; Ctrl-C stops)")
            loop = new_event_loop()
            with frozen_heap():  # imports, tokenizer, app: out of the collector's full passes
                try:
                    loop.run_until_complete(server.serve())
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()
            say("stopped")
        finally:
            llm.close()
    finally:
        sock.close()
