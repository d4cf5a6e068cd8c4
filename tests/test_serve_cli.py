"""The commands: `aphro serve` with no MODEL (the built-in tiny model) as a process, stopped by
SIGTERM in the middle of 16 streams; `aphro bench serve` against a running server."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from click.testing import CliRunner

from serve_server import WAIT_S, running_server

ROOT = Path(__file__).resolve().parents[1]


def start_aphro_serve(*args: str) -> tuple[subprocess.Popen, str, queue.Queue]:
    """`aphro serve ARGS --port 0` as a process; (process, base URL, its output lines)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "aphro_cli.main", "serve", *args,
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True) \
        .start()
    deadline = time.monotonic() + WAIT_S * 2
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if m := re.search(r"serving .* on (http://\S+)", line):
            return proc, m.group(1), lines
    proc.kill()
    proc.wait(WAIT_S)
    raise AssertionError(f"aphro serve did not start: {''.join(seen)}")


async def read_stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event,
                      counter: list[int]) -> tuple[list[str], str | None]:
    body = {"prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    events, finish = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            if line != "data: [DONE]":
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                finish = choice["finish_reason"] or finish
            if len(events) == 1:
                counter[0] += 1
                if counter[0] == 16:
                    started.set()
    return events, finish


def test_aphro_serve_default_model_drains_16_streams_on_sigterm_and_exits_0():
    proc, url, lines = start_aphro_serve("--kv-cache-bytes", str(1 << 24), "--max-model-len",
                                         "512", "--shutdown-timeout", "0.2")
    try:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT_S, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200, chat.text  # the built-in model has a chat template
        assert chat.json()["model"] == "tiny-llama"

        async def run():
            started, counter = asyncio.Event(), [0]
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                tasks = [asyncio.ensure_future(read_stream(client, n, started, counter))
                         for n in [4, 480] * 8]
                await asyncio.wait_for(started.wait(), WAIT_S)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        results = asyncio.run(run())
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    for n, (events, finish) in zip([4, 480] * 8, results):
        assert events[-1] == "data: [DONE]"  # a clean end, aborted or not
        assert all(e.startswith("data: {") for e in events[:-1])
        # 4 tokens finish within --shutdown-timeout; 480 cannot, and are aborted
        assert finish == ("length" if n == 4 else "abort")
    output = "".join(lines.get() for _ in range(lines.qsize()))
    assert "stopped" in output and "Traceback" not in output


def test_bench_serve_against_a_running_server(tiny_llama_dir, tmp_path):
    from aphro_cli.main import cli

    with running_server(tiny_llama_dir) as server:
        result_file = tmp_path / "result.json"
        common = ["bench", "serve", "--base-url", server.base_url, "--num-prompts", "6",
                  "--random-input-len", "8", "--random-output-len", "4", "--ignore-eos"]
        r = CliRunner().invoke(cli, [*common, "--save-result", str(result_file)])
        assert r.exit_code == 0, r.output
        assert "TTFT" in r.output and "bench serve: 6/6" in r.output
        report = json.loads(result_file.read_text())
        assert report["failed"] == 0 and report["completed"] == 6
        assert report["total_input_tokens"] == 48 and report["total_output_tokens"] == 24
        assert report["request_rate"] == "inf"
        r = CliRunner().invoke(cli, [*common, "--request-rate", "20", "--max-concurrency", "2",
                                     "--endpoint", "/v1/chat/completions",
                                     "--save-result", str(result_file)])
        assert r.exit_code == 0, r.output
        report = json.loads(result_file.read_text())
        assert report["failed"] == 0 and report["total_output_tokens"] == 24
        assert report["request_rate"] == 20
        r = CliRunner().invoke(cli, ["bench", "serve", "--base-url", "http://127.0.0.1:9",
                                     "--num-prompts", "1"])
        assert r.exit_code == 2 and "is the server running" in r.output
