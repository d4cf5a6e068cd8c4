"""A real `aphro serve` server for tests: AsyncLLM + APIServer (uvicorn) on 127.0.0.1, on a free
port, in a thread of the test process with its own event loop; stopped (gracefully) at the end.
Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from engine.config import EngineConfig
from engine.serve.async_llm import AsyncLLM
from engine.serve.chat import SIMPLE_CHAT_TEMPLATE
from engine.serve.launch import APIServer, bind_socket, new_event_loop
from engine.serve.serving import ServeOptions, ServerLimits

WAIT_S = 60.0
ENGINE_DEFAULTS = {"kv_cache_bytes": 1 << 24, "max_model_len": 256, "max_num_seqs": 256}


@dataclass
class Running:
    base_url: str
    server: APIServer
    llm: AsyncLLM
    loop: asyncio.AbstractEventLoop

    def on_engine(self, fn):
        """fn(engine) in the engine process (between steps; fn: a module-level function)."""
        return asyncio.run_coroutine_threadsafe(self.llm.run_on_engine(fn), self.loop) \
            .result(WAIT_S)

    def check_engine(self):
        """The engine's block invariant checked; (its stats, whether anything is unfinished)."""
        return asyncio.run_coroutine_threadsafe(self.llm.check_engine(), self.loop) \
            .result(WAIT_S)

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels: value}, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {self.server.serving.options.api_key}"} \
            if self.server.serving.options.api_key else {}
        text = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=WAIT_S).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                  if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@contextlib.contextmanager
def running_server(model_dir, names=("tiny",), api_key: str | None = None,
                   chat_template: str | None = SIMPLE_CHAT_TEMPLATE,
                   limits: ServerLimits | None = None, shutdown_timeout: float = 5.0,
                   **engine) -> Iterator[Running]:
    config = EngineConfig.create(str(model_dir), **(ENGINE_DEFAULTS | engine))
    llm = AsyncLLM(config)
    sock = bind_socket("127.0.0.1", 0)
    server = APIServer(llm, ServeOptions(tuple(names), api_key, chat_template,
                                         limits or ServerLimits()), sock, shutdown_timeout)
    ready = threading.Event()
    server.on_ready = ready.set
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),),
                              name="test-server", daemon=True)
    thread.start()
    try:
        assert ready.wait(WAIT_S), "the server did not start"
        yield Running(server.url, server, llm, loop)
    finally:
        server.shutdown_threadsafe()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the server did not stop"
        loop.close()
        llm.close()
        sock.close()
