"""The engine core process under the server: an engine that cannot start raises its own error,
a consumer that falls behind gets its outputs merged (the same text, tokens and logprobs as the
offline engine), and a core that dies mid-stream ends every stream cleanly, turns /health
unhealthy and leaves the server answering."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal

import httpx
import pytest
from serve_server import ENGINE_DEFAULTS, WAIT_S, running_server

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.errors import CheckpointError
from engine.serve.async_llm import AsyncLLM
from engine.serve.streams import EngineRequest


def test_the_output_pipe_gives_whole_messages_to_a_non_blocking_reader():
    # uvloop's add_reader makes the server's end non-blocking; a step message bigger than a
    # pipe write then arrives in pieces (Connection.recv raised on it and the server took the
    # core for dead). The reader must hand out each message whole, in order, and end cleanly
    # when the writer goes away in the middle of one.
    import struct
    import threading
    import time

    from engine.serve.engine_core import MessageReader, MessageWriter

    read_end, write_end = multiprocessing.Pipe(duplex=False)
    reader, writer = MessageReader(read_end), MessageWriter(write_end)
    assert os.get_blocking(reader.fd) is False
    sent = [("step", i, os.urandom(size)) for i, size in
            enumerate([10, 70_000, 3 << 20, 5, 200_000])]

    def write():
        for msg in sent:
            writer.send(msg)
            time.sleep(0.01)

    thread = threading.Thread(target=write)
    thread.start()
    got = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < len(sent) and time.monotonic() < deadline:
        if reader.wait(0.05):
            got += reader.read()
    thread.join(WAIT_S)
    assert got == sent
    assert reader.read() == [] and not reader.eof
    os.write(write_end.fileno(), struct.pack("<Q", 1000) + b"partial")  # then the writer dies
    write_end.close()
    for _ in range(100):
        if reader.wait(0.05) and (reader.read() or reader.eof):
            break
    assert reader.eof
    reader.close()


def test_the_command_writer_never_blocks_and_delivers_everything_later():
    # the server's commands: the core reads them only between steps, so a burst fills the
    # pipe; the event loop must not block on it (it once stalled for a whole prefill step)
    import time

    from engine.serve.engine_core import MessageReader, MessageWriter

    read_end, write_end = multiprocessing.Pipe(duplex=False)
    writer, reader = MessageWriter(write_end, blocking=False), MessageReader(read_end)
    sent = [("add", i, os.urandom(200_000)) for i in range(10)]  # 2 MB: past any pipe
    start = time.monotonic()
    for msg in sent:
        writer.send(msg)  # nobody reads yet
    assert time.monotonic() - start < WAIT_S and writer.pending
    got = []
    for _ in range(2000):  # bounded: each turn moves at least one pipeful when it can
        writer.flush(0.0)
        if reader.wait(0.01):
            got += reader.read()
        if len(got) == len(sent) and not writer.pending:
            break
    assert got == sent
    reader.close()
    with pytest.raises(OSError):  # the reader gone: an error to say so, not a hang
        writer.send(("stop",))
        writer.flush(1.0)
    writer.close()


def new_children(before: set) -> list:
    return [p for p in multiprocessing.active_children() if p.pid not in before]


def test_an_engine_that_cannot_start_raises_its_error_and_leaves_no_process(tiny_llama_dir,
                                                                             tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(tiny_llama_dir, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj"):
        AsyncLLM(EngineConfig.create(str(bad), **ENGINE_DEFAULTS))
    assert new_children(before) == []


def test_a_consumer_that_falls_behind_gets_one_merged_output(tiny_llama_dir):
    ids, n_tokens = [5, 9, 33, 71, 4], 24
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, logprobs=2)
    with LLM(str(tiny_llama_dir), **ENGINE_DEFAULTS) as llm:
        want = llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].outputs[0]
    engine = AsyncLLM(EngineConfig.create(str(tiny_llama_dir), **ENGINE_DEFAULTS))

    async def main():
        stream = await engine.add_requests([EngineRequest("slow", ids, params)])
        for _ in range(int(WAIT_S / 0.01)):  # not consumed until the engine has finished it
            if engine.num_streams == 0:
                break
            await asyncio.sleep(0.01)
        outs = await stream.next()
        assert stream.finished
        return outs

    try:
        outs = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        engine.close()
    assert len(outs) == 1 and len(outs[0].outputs) == 1
    got = outs[0].outputs[0]  # every step's delta merged into one
    assert got.token_ids == want.token_ids and len(got.token_ids) == n_tokens
    assert got.text == want.text and got.finish_reason == "length"
    assert len(got.logprobs) == n_tokens
    for mine, ref in zip(got.logprobs, want.logprobs):
        assert mine.keys() == ref.keys()
        assert all(abs(mine[t] - ref[t]) < 1e-5 for t in ref)


def test_deltas_collected_equal_the_whole_output(tiny_llama_dir):
    """A response sent whole adds up the engine's per-step deltas (streams.Collected): the
    same texts, tokens, logprobs, prompt logprobs and finish / stop reasons as the engine
    reporting whole outputs, for n = 2 samples and a stop string."""
    from engine.core.llm_engine import LLMEngine
    from engine.serve.streams import Collected

    ids = [5, 9, 33, 71, 4]
    with LLM(str(tiny_llama_dir), **ENGINE_DEFAULTS) as llm:
        text = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    cases = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1),
             SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=9, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            stop=[text[len(text) // 2:len(text) // 2 + 2]])]
    results = {}
    for deltas in (False, True):
        engine = LLMEngine(EngineConfig.create(str(tiny_llama_dir), **ENGINE_DEFAULTS),
                           stream_outputs=True, deltas=deltas)
        for i, params in enumerate(cases):
            engine.add_request(None, params, ids, request_id=str(i))
        got = {}
        for _ in range(200):  # bounded
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if deltas:
                    got.setdefault(out.request_id, Collected()).add(out)
                elif out.finished:
                    got[out.request_id] = out
        results[deltas] = {rid: (c.result() if deltas else c) for rid, c in got.items()}
    reasons = set()
    for rid, whole in results[False].items():
        collected = results[True][rid]
        assert collected.finished and collected.prompt_logprobs == whole.prompt_logprobs
        assert [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
                for c in collected.outputs] == [
            (c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
            for c in whole.outputs]
        reasons |= {c.finish_reason for c in whole.outputs}
    assert reasons == {"length", "stop"} and len(results[False]["1"].outputs) == 2


def test_the_core_dying_mid_stream_ends_every_stream_and_the_server_goes_on(tiny_llama_dir):
    before = {p.pid for p in multiprocessing.active_children()}
    with running_server(tiny_llama_dir) as server:
        (core,) = [p for p in new_children(before) if p.name == "aphro-engine-core"]
        body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}

        async def one(client, started: asyncio.Event, counter: list[int]) -> list[str]:
            lines = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    lines.append(line)
                    if len(lines) == 1:
                        counter[0] += 1
                        if counter[0] == 4:
                            started.set()
            return lines

        async def run():
            started, counter = asyncio.Event(), [0]
            async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT_S) as client:
                tasks = [asyncio.ensure_future(one(client, started, counter)) for _ in range(4)]
                await asyncio.wait_for(started.wait(), WAIT_S)
                os.kill(core.pid, signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        for lines in asyncio.run(run()):
            assert lines[-1] == "data: [DONE]"
            assert all(line.startswith("data: {") for line in lines[:-1])
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert "SIGKILL" in error["message"] and error["type"] == "server_error"
        health = httpx.get(f"{server.base_url}/health", timeout=WAIT_S)
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        models = httpx.get(f"{server.base_url}/v1/models", timeout=WAIT_S)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=WAIT_S,
                       json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 503 and "engine has stopped" in r.json()["error"]["message"]
    assert new_children(before) == []
