"""Decode latency as a user sees it (`bench latency`): `batch_size` requests of `input_len`
random prompt tokens, greedy, EOS ignored, timed by wall clock around adding them and stepping
the engine to the end.

Per timed iteration: TTFT is the wall time of a run of 1 token a request; TPOT is
(T(output_len tokens) - median TTFT) / (output_len - 1); end-to-end is T(output_len). Nothing is
synchronised between steps (a per-step sync would undo asynchronous scheduling's overlap), only
before and after a run. `num_iters_warmup` whole iterations run first, untimed; the figures are
percentiles (p50, p90, p99) and the mean over `num_iters` timed ones. With load_format="dummy"
the weights are random and only config.json is read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from engine.bench.engine_bench import engine_facts, random_prompts, sync
from engine.bench.results import summary_ms
from engine.core.sampling_params import SamplingParams


def latency_config(model_dir: str | Path, batch_size: int, input_len: int, output_len: int,
                   **options):
    """The engine configuration `bench latency` measures (also scripts/step_profile.py's and
    ab_step.py's): room for `batch_size` sequences of input_len + output_len tokens in blocks
    of 16 and no more, prefix caching off; `options` are EngineConfig.create's and override
    these."""
    from engine.config import EngineConfig

    block = 16
    max_len = input_len + output_len + block
    settings = {"max_model_len": max_len, "max_num_seqs": batch_size,
                "max_num_batched_tokens": max(2048, min(batch_size * input_len, 16384)),
                "block_size": block, "num_kv_blocks": batch_size * -(-max_len // block) + 2,
                "enable_prefix_caching": False}
    return EngineConfig.create(str(model_dir), **{**settings, **options})


def timed_run(engine, prompts: list[list[int]], max_tokens: int, device: str) -> float:
    """Seconds to add `prompts` (greedy, EOS ignored, `max_tokens` each) and step the engine
    until every one finished, the device synchronised only before and after."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(prompt_token_ids=p, sampling_params=params)
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    return time.perf_counter() - t0


def decode_latency(model_dir: str | Path, tp: int = 1, input_len: int = 128,
                   output_len: int = 128, dtype: str = "bfloat16", device: str = "auto",
                   load_format: str = "dummy", enforce_eager: bool = False,
                   seed: int = 0, quantization: str | None = None,
                   kv_cache_dtype: str = "auto", batch_size: int = 1,
                   num_iters_warmup: int = 3, num_iters: int = 10,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """{"results": {"ttft", "tpot", "e2e" (summary_ms of each), "decode_tok_s", ...},
    "facts": engine_facts, "hf_config"}; see the module docstring for the method."""
    from engine.core.llm_engine import LLMEngine

    config = latency_config(
        model_dir, batch_size, input_len, output_len, dtype=dtype, device=device,
        tensor_parallel_size=tp, enforce_eager=enforce_eager, load_format=load_format,
        seed=seed, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(config, stream_outputs=False)
    try:
        facts = engine_facts(engine)
        dev = facts["device"]
        prompts = random_prompts(batch_size, input_len, engine.vocab_size, seed)

        def run(n: int) -> float:
            return timed_run(engine, prompts, n, dev)

        total = num_iters_warmup + num_iters
        for i in range(num_iters_warmup):  # kernels compiled, graphs captured and replayed
            run(1)
            run(output_len)
            if progress is not None:
                progress(i + 1, total)
        first, whole = [], []
        for i in range(num_iters):
            first.append(run(1))
            whole.append(run(output_len))
            if progress is not None:
                progress(num_iters_warmup + i + 1, total)
        ttft = statistics.median(first)
        tpot = [(t - ttft) / max(output_len - 1, 1) for t in whole]
        results = {"ttft": summary_ms(first), "tpot": summary_ms(tpot), "e2e": summary_ms(whole),
                   "decode_tok_s": batch_size / statistics.median(tpot),
                   "num_iters": num_iters, "num_iters_warmup": num_iters_warmup}
        return {"results": results, "facts": facts, "hf_config": config.hf_config}
    finally:
        engine.close()
