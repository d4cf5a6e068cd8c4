"""Online serving benchmark: an async HTTP client against any OpenAI-compatible server.

Requests are shaped as `vllm bench serve` sends them (stream true with include_usage, greedy,
max_tokens = the output length, ignore_eos when asked) and arrive as a Poisson process at
`request_rate` per second (all at once when it is inf), at most `max_concurrency` in flight.
Prompts are random token ids of exactly `random_input_len` tokens, sent as token-id prompts
(the vocabulary comes from `tokenizer`, a local checkpoint folder, or the server's
/tokenizer_info). The report has vLLM's keys: throughput, TTFT, TPOT, ITL and end-to-end
latency (mean, median, p99, in ms) and the failures. Figures only: nothing here asserts one.
`serve_record` puts the report in the one result schema of the benchmarks (engine.bench.results):
the configuration under "workload", the figures under "results".
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.bench.results import make_record, summary_ms
from engine.errors import AphroError, ConfigError


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    model: str | None = None  # default: the server's first model (GET /v1/models)
    num_prompts: int = 100
    random_input_len: int = 128
    random_output_len: int = 128
    request_rate: float = math.inf  # requests per second, Poisson arrivals
    max_concurrency: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    api_key: str | None = None
    tokenizer: str | None = None  # a checkpoint folder; default: the server's /tokenizer_info
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ("/v1/completions", "/v1/chat/completions"):
            raise ConfigError(f"--endpoint {self.endpoint}: /v1/completions or "
                              "/v1/chat/completions")
        for name in ("num_prompts", "random_input_len", "random_output_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.request_rate > 0:
            raise ConfigError(f"request_rate={self.request_rate}: must be > 0 (inf: all at once)")


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


class ServeBench:
    def __init__(self, config: ServeBenchConfig) -> None:
        import httpx

        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(config.request_timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def _get_json(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            r = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise AphroError(f"{self.config.base_url}{path}: {type(e).__name__}: {e}; is the "
                             "server running (aphro serve)?") from None
        if r.status_code != 200:
            raise AphroError(f"{self.config.base_url}{path}: HTTP {r.status_code}: "
                             f"{r.text[:300]}")
        return r.json()

    async def prompts(self) -> tuple[list[list[int]], list[str] | None]:
        """Token-id prompts; and their text for the chat endpoint."""
        cfg = self.config
        if cfg.tokenizer is not None:
            from engine.checkpoint.files import load_tokenizer

            tok = load_tokenizer(cfg.tokenizer)
            if tok is None:
                raise ConfigError(f"--tokenizer {cfg.tokenizer}: the folder has no tokenizer")
            vocab, special = len(tok), set(tok.all_special_ids)
        else:
            info = await self._get_json("GET", "/tokenizer_info")
            if not isinstance(info.get("vocab_size"), int):
                raise ConfigError("the server's /tokenizer_info gives no vocab_size: pass "
                                  "--tokenizer with the model's checkpoint folder")
            vocab, special, tok = info["vocab_size"], set(), None
        rng = random.Random(cfg.seed)
        allowed = [t for t in range(vocab) if t not in special]
        ids = [[rng.choice(allowed) for _ in range(cfg.random_input_len)]
               for _ in range(cfg.num_prompts)]
        if cfg.endpoint != "/v1/chat/completions":
            return ids, None
        if tok is not None:
            return ids, [tok.decode(p) for p in ids]
        texts = [(await self._get_json("POST", "/detokenize", json={"tokens": p}))["prompt"]
                 for p in ids]
        return ids, texts

    def payload(self, model: str, ids: list[int], text: str | None) -> dict:
        cfg = self.config
        body = {"model": model, "temperature": 0.0, "repetition_penalty": 1.0,
                "max_tokens": cfg.random_output_len, "stream": True,
                "stream_options": {"include_usage": True}}
        if text is None:
            body["prompt"] = ids
        else:
            body["messages"] = [{"role": "user", "content": text}]
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def one(self, body: dict, prompt_len: int) -> RequestResult:
        import httpx

        res = RequestResult(prompt_len=prompt_len)
        chat = "messages" in body
        start = last = time.perf_counter()
        chunks = 0
        try:
            async with self.client.stream("POST", self.config.endpoint, json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    now = time.perf_counter()
                    if choices := chunk.get("choices"):
                        got = (choices[0].get("delta", {}).get("content") if chat
                               else choices[0].get("text"))
                        if chat and not got:
                            continue
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last, chunks = now, chunks + 1
                    elif usage := chunk.get("usage"):
                        res.output_tokens = usage.get("completion_tokens", 0)
                    elif "error" in chunk:
                        res.error = str(chunk["error"].get("message"))
                        return res
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            res.error = f"{type(e).__name__}: {e}"
            return res
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no chunk with text came back"
        return res

    async def run(self, progress: Callable[[int, int], None] | None = None) -> dict:
        cfg = self.config
        try:
            model = cfg.model or (await self._get_json("GET", "/v1/models"))["data"][0]["id"]
            ids, texts = await self.prompts()
            test = await self.one(self.payload(model, ids[0], texts[0] if texts else None),
                                  len(ids[0]))
            if not test.success:
                raise AphroError(f"the first test request failed: {test.error}")
            rng = random.Random(cfg.seed + 1)
            limit = asyncio.Semaphore(cfg.max_concurrency or cfg.num_prompts)
            done = 0

            async def limited(i: int) -> RequestResult:
                nonlocal done
                async with limit:
                    result = await self.one(self.payload(model, ids[i], texts[i] if texts
                                                         else None), len(ids[i]))
                done += 1
                if progress is not None:
                    progress(done, cfg.num_prompts)
                return result

            start = time.perf_counter()
            tasks = []
            for i in range(cfg.num_prompts):
                tasks.append(asyncio.ensure_future(limited(i)))
                if cfg.request_rate != math.inf and i + 1 < cfg.num_prompts:
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
        finally:
            await self.client.aclose()
        return summarize(cfg, model, results, duration)


def summarize(cfg: ServeBenchConfig, model: str, results: list[RequestResult],
              duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    report = {"base_url": cfg.base_url, "endpoint": cfg.endpoint, "model": model,
              "num_prompts": cfg.num_prompts, "random_input_len": cfg.random_input_len,
              "random_output_len": cfg.random_output_len,
              "request_rate": "inf" if cfg.request_rate == math.inf else cfg.request_rate,
              "max_concurrency": cfg.max_concurrency, "ignore_eos": cfg.ignore_eos,
              "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
              "errors": sorted({r.error for r in results if not r.success})[:5],
              "total_input_tokens": total_in, "total_output_tokens": total_out,
              "request_throughput": len(ok) / duration,
              "output_throughput": total_out / duration,
              "total_token_throughput": (total_in + total_out) / duration}
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in ok], "tpot": tpot,
              "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    for name, values in series.items():  # summary_ms's figures under vLLM's names
        s = summary_ms(values)
        report[f"mean_{name}_ms"] = s["mean_ms"]
        report[f"median_{name}_ms"] = s["p50_ms"]
        report[f"p99_{name}_ms"] = s["p99_ms"]
    return report


def run_serve_bench(config: ServeBenchConfig,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the benchmark to the end; the report (see summarize)."""
    return asyncio.run(ServeBench(config).run(progress))


_WORKLOAD_KEYS = ("base_url", "endpoint", "num_prompts", "random_input_len", "random_output_len",
                  "request_rate", "max_concurrency", "ignore_eos")


def serve_record(report: dict, *, command: str, seed: int = 0) -> dict:
    """The report as a result record (kind "serve"): the server's model, the configuration as
    the workload, every figure under results; the hardware is this host's (host_hardware).
    NaN figures become null (engine.bench.results.to_json / write_record)."""
    from engine.bench.hardware import host_hardware

    workload = {k: report[k] for k in _WORKLOAD_KEYS}
    workload["seed"] = seed
    results = {k: v for k, v in report.items() if k not in _WORKLOAD_KEYS and k != "model"}
    return make_record("serve", hardware=host_hardware(), model={"name": report["model"]},
                       workload=workload, results=results, roofline=None, command=command)
