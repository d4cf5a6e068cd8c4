"""HF transformers as the baseline of `bench throughput`, on the same prompts, device and dtype
in the same process (after the engine is closed):

- `generate_batch`: HF's continuous batching (paged KV cache, transformers >= 5). Greedy,
  EOS disabled, exactly output_len new tokens a prompt. Its figure is the output tokens over the
  span from the first request's creation to the last one's end (its own timestamps), so the
  manager's setup (cache allocation, CUDA-graph warm-up) is not counted; the call's wall time is
  reported beside it. A first small call warms it up. HF sizes its cache itself on a GPU; on the
  CPU it gets a cache just large enough (HF's default sizing is slow there).
- `generate`: plain generate in batches of `batch_size` prompts, left-padded, min_new_tokens =
  max_new_tokens = output_len.

With random weights (a preset shape) the HF model is built from the config on the device,
randomly initialised (its weights differ from the engine's; with EOS ignored the work is the same).
Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.bench.engine_bench import sync


def generate_batch_missing() -> str | None:
    """Why HF's continuous batching cannot run here, or None when it can."""
    import transformers
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "generate_batch"):
        return (f"transformers {transformers.__version__} has no generate_batch (continuous "
                "batching, transformers >= 5): pip install -U transformers, or --baseline none")
    return None


def load_hf_model(model: str | Path, dtype: torch.dtype, device: str, random_weights: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        config = AutoConfig.from_pretrained(str(model))
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).to(device)
    return hf.eval()


def hf_generate_batch(hf, prompts: list[list[int]], output_len: int, device: str) -> dict:
    """HF continuous batching on every prompt: its row."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    cb = None
    if not device.startswith("cuda"):
        page = 256  # tokens a block (HF's default page_size)
        blocks = sum(math.ceil((len(p) + output_len) / page) for p in prompts) + 2
        cb = ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=2048)
    kwargs = {"generation_config": gen, "continuous_batching_config": cb}
    with _quiet_logger("ContinuousBatchingLogger"):  # EOS off, psutil: warnings on every call
        hf.generate_batch(prompts[:2], max_new_tokens=min(4, output_len), **kwargs)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        outs = hf.generate_batch(prompts, max_new_tokens=output_len, record_timestamps=True,
                                 **kwargs)
        sync(device)
    wall = time.perf_counter() - t0
    done = [o for o in outs.values() if o.error is None]
    errors = sorted({str(o.error) for o in outs.values() if o.error is not None})[:3]
    generated = sum(len(o.generated_tokens) for o in done)
    span = (max(o.lifespan[1] for o in done) - min(o.created_time for o in done)
            if done else math.nan)
    return {"name": "HF generate_batch", "requests": len(done), "failed": len(prompts) - len(done),
            "seconds": span, "wall_seconds": wall, "output_tokens": generated,
            "output_tok_s": generated / span if done else math.nan, "errors": errors}


@contextlib.contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def hf_generate(hf, prompts: list[list[int]], output_len: int, device: str, batch_size: int,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """HF plain generate, `batch_size` prompts at a time: its row."""
    kwargs = {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False,
              "pad_token_id": 0}
    with torch.no_grad():
        ids, mask = _left_padded(prompts[:2], device)
        hf.generate(ids, attention_mask=mask, max_new_tokens=min(4, output_len),
                    do_sample=False, pad_token_id=0)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[i:i + batch_size], device)  # [b, longest]
            out = hf.generate(ids, attention_mask=mask, **kwargs)  # [b, longest + new]
            generated += (out.shape[1] - ids.shape[1]) * out.shape[0]
            if progress is not None:
                progress(min(i + batch_size, len(prompts)), len(prompts))
        sync(device)
    elapsed = time.perf_counter() - t0
    return {"name": "HF generate", "requests": len(prompts), "seconds": elapsed,
            "output_tokens": generated, "output_tok_s": generated / elapsed,
            "batch_size": batch_size}


def _left_padded(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # [b, longest], pad id 0
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def run_hf_baselines(model: str | Path, prompts: list[list[int]], output_len: int,
                     device: str, dtype: torch.dtype, random_weights: bool, batch_size: int,
                     say: Callable[[str], None] = lambda msg: None,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Both HF rows (generate_batch first); a row with "skipped" when one cannot run."""
    import gc

    from engine.validate.tiny import quiet_transformers

    gc.collect()  # the engine closed just before: its weights and KV cache go back first
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    with quiet_transformers():
        hf = load_hf_model(model, dtype, device, random_weights)
    rows = []
    try:
        missing = generate_batch_missing()
        if missing:
            rows.append({"name": "HF generate_batch", "skipped": missing})
        else:
            say(f"HF generate_batch: {len(prompts)} prompts")
            rows.append(hf_generate_batch(hf, prompts, output_len, device))
        say(f"HF generate: {len(prompts)} prompts, {batch_size} a batch")
        rows.append(hf_generate(hf, prompts, output_len, device, batch_size, progress))
    finally:
        del hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows
