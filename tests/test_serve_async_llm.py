"""AsyncLLM on its own and under the server: outputs as the offline engine gives them, a consumer
that leaves aborts its request, refused requests leave nothing behind, and a failing step fails
the requests it ran (a clear error) while the loop goes on."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serve_server import ENGINE_DEFAULTS, WAIT_S, running_server

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.errors import RequestError
from engine.serve.async_llm import AsyncLLM
from engine.serve.streams import EngineRequest


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def plant_step_failure(engine) -> None:
    """The next step raises (once): as a failing model or a dead worker would."""
    real = engine.executor.launch  # the engine launches every step through it

    def boom(batch):
        engine.executor.launch = real
        raise RuntimeError("planted failure")

    engine.executor.launch = boom


def test_async_llm_streams_aborts_and_refuses(tiny_llama_dir):
    ids = [5, 9, 33, 71, 4]
    with LLM(str(tiny_llama_dir), **ENGINE_DEFAULTS) as llm:
        want = llm.generate(prompt_token_ids=[ids], sampling_params=greedy(6))[0].outputs[0]
    engine = AsyncLLM(EngineConfig.create(str(tiny_llama_dir), **ENGINE_DEFAULTS))

    async def main():
        texts = [out.outputs[0].text async for out in engine.generate(ids, greedy(6), "a")]
        assert texts[-1] == want.text and all(want.text.startswith(t) for t in texts)
        async for _ in engine.generate(ids, greedy(200), "b"):
            break  # the consumer leaves: the request is aborted
        with pytest.raises(RequestError, match="max_model_len"):
            await engine.add_requests([EngineRequest("c", ids, greedy(2)),
                                       EngineRequest("d", [5] * 300, greedy(2))])
        return await engine.check_engine()

    try:
        stats, busy = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        engine.close()
    assert not busy and stats.kv_cache_usage == 0 and stats.num_requests_running == 0
    assert not engine.is_running  # closed


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(tiny_llama_dir):
    with running_server(tiny_llama_dir) as server:
        body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}

        async def run():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT_S) as client, \
                    client.stream("POST", "/v1/completions", json=body) as r:
                lines = []
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    lines.append(line)
                    if len(lines) == 1:
                        await asyncio.get_running_loop().run_in_executor(
                            None, server.on_engine, plant_step_failure)
                return lines

        lines = asyncio.run(run())
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert "planted failure" in error["message"] and error["type"] == "server_error"
        server.on_engine(plant_step_failure)
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=WAIT_S,
                       json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 500 and "planted failure" in r.json()["error"]["message"]
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=WAIT_S,
                       json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        stats, _ = server.check_engine()
        assert stats.kv_cache_usage == 0 and stats.num_requests_running == 0
