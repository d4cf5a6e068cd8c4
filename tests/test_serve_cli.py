"""The commands: `aphro serve` with no MODEL (the built-in tiny model) as a process, stopped by
SIGTERM in the middle of 16 streams; `aphro bench serve` against a running server."""

from __future__ import annotations

import asyncio
import json
import os
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


def start_aphro_serve(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`aphro serve ARGS --port 0` as a process; (process, base URL, its output lines so far,
    growing as it prints)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "aphro_cli.main", "serve", *args,
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + WAIT_S * 2
    while time.monotonic() < deadline and proc.poll() is None:
        for line in lines:
            if m := re.search(r"serving .* on (http://\S+)", line):
                return proc, m.group(1), lines
        time.sleep(0.1)
    proc.kill()
    proc.wait(WAIT_S)
    raise AssertionError(f"aphro serve did not start: {''.join(lines)}")


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is pid (read from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def gone(pid: int) -> bool:
    """pid has ended (waited up to a few seconds, for the reaper)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


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
                                         "512", "--shutdown-timeout", "0")
    try:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT_S, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200, chat.text  # the built-in model has a chat template
        assert chat.json()["model"] == "tiny-llama"

        async def run():
            started, counter = asyncio.Event(), [0]
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                tasks = [asyncio.ensure_future(read_stream(client, n, started, counter))
                         for n in [480] * 16]
                await asyncio.wait_for(started.wait(), WAIT_S)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        core = children_of(proc.pid)
        assert core, "the engine core runs as a child process of the server"
        results = asyncio.run(run())
        assert proc.wait(WAIT_S) == 0
        assert all(gone(pid) for pid in core), "a child of the server outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    for events, finish in results:  # aborted at once (--shutdown-timeout 0), cleanly
        assert events[-1] == "data: [DONE]"
        assert all(e.startswith("data: {") for e in events[:-1])
        assert finish == "abort"
    output = "".join(lines)
    assert "stopped" in output and "Traceback" not in output


def test_aphro_serve_default_model_under_bench_serve_at_300_prompts_fails_none(tmp_path):
    # the newcomer's path: `aphro serve`, then `aphro bench serve` at it. 300 streams at once
    # make step messages that reach the server's non-blocking loop in pieces; the server once
    # took that for a dead engine and failed every request
    proc, url, lines = start_aphro_serve("--kv-cache-bytes", str(1 << 25), "--max-model-len",
                                         "256")
    try:
        out = tmp_path / "r.json"
        bench = subprocess.run(
            [sys.executable, "-m", "aphro_cli.main", "bench", "serve", "--base-url", url,
             "--num-prompts", "300", "--random-input-len", "16", "--random-output-len", "64",
             "--ignore-eos", "--save-result", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S * 4, check=False)
        assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
        report = json.loads(out.read_text())["results"]
        assert report["failed"] == 0 and report["completed"] == 300
        assert report["total_output_tokens"] == 300 * 64
        assert httpx.get(f"{url}/health", timeout=WAIT_S).status_code == 200
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    assert "Traceback" not in "".join(lines)


def test_a_graceful_stop_lets_requests_in_flight_finish(tiny_llama_dir):
    with running_server(tiny_llama_dir, shutdown_timeout=WAIT_S) as server:
        async def run():
            started, counter = asyncio.Event(), [0]
            async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT_S) as client:
                tasks = [asyncio.ensure_future(read_stream(client, 24, started, counter))
                         for _ in range(16)]
                await asyncio.wait_for(started.wait(), WAIT_S)
                server.server.shutdown_threadsafe()  # what SIGTERM does
                try:  # nothing new is taken any more: a 503, or no connection at all
                    late = await client.post("/v1/completions", json={"prompt": "hi"})
                    assert late.status_code == 503, late.text
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # refused, or closed unanswered (a race of the stop: CI saw ReadError)
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        results = asyncio.run(run())
    for events, finish in results:
        assert events[-1] == "data: [DONE]" and finish == "length"


def test_bench_serve_against_a_running_server(tiny_llama_dir, tmp_path):
    import jsonschema

    from aphro_cli.main import cli
    from engine.bench.results import RESULT_SCHEMA

    with running_server(tiny_llama_dir) as server:
        result_file = tmp_path / "result.json"
        common = ["bench", "serve", "--base-url", server.base_url, "--num-prompts", "6",
                  "--random-input-len", "8", "--random-output-len", "4", "--ignore-eos"]
        r = CliRunner().invoke(cli, [*common, "--save-result", str(result_file)])
        assert r.exit_code == 0, r.output
        assert "TTFT" in r.output and "bench serve: 6/6" in r.output
        record = json.loads(result_file.read_text())  # the bench result schema
        jsonschema.validate(record, RESULT_SCHEMA)
        assert record["kind"] == "serve"
        report = record["results"]
        assert report["failed"] == 0 and report["completed"] == 6
        assert report["total_input_tokens"] == 48 and report["total_output_tokens"] == 24
        assert record["workload"]["request_rate"] == "inf"
        table = subprocess.run([sys.executable, "scripts/perf_table.py", str(result_file)],
                               cwd=Path(__file__).resolve().parents[1], capture_output=True,
                               text=True, timeout=WAIT_S, check=False)
        name = record["model"]["name"]
        row = next(x for x in table.stdout.splitlines() if x.startswith(f"| {name} |"))
        assert "| 6 x 8 / 4 | inf |" in row and f"| {report['output_throughput']:,.1f} |" in row
        r = CliRunner().invoke(cli, [*common, "--request-rate", "20", "--max-concurrency", "2",
                                     "--endpoint", "/v1/chat/completions",
                                     "--save-result", str(result_file)])
        assert r.exit_code == 0, r.output
        record = json.loads(result_file.read_text())
        report = record["results"]
        assert report["failed"] == 0 and report["total_output_tokens"] == 24
        assert record["workload"]["request_rate"] == 20
        r = CliRunner().invoke(cli, ["bench", "serve", "--base-url", "http://127.0.0.1:9",
                                     "--num-prompts", "1"])
        assert r.exit_code == 2 and "is the server running" in r.output


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)


def test_the_chat_template_hint_works_as_printed(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("APHRO_API_KEY", "k1")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": "Bearer k1"}
    proc, url, lines = start_aphro_serve(str(tiny_llama_dir), "--kv-cache-bytes",
                                         str(1 << 24))
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=auth, timeout=WAIT_S)
        assert r.status_code == 400 and "--chat-template FILE" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models", timeout=WAIT_S).status_code == 401
    finally:
        assert stop(proc) == 0
    printed = "".join(lines)
    assert "(give --chat-template FILE)" in printed
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}assistant:")
    proc, url, _ = start_aphro_serve(str(tiny_llama_dir), "--kv-cache-bytes", str(1 << 24),
                                     "--chat-template", str(template))
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=auth, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    finally:
        assert stop(proc) == 0
