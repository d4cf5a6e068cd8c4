"""Offline throughput of the engine beside HF transformers' generate, in the same process.

Figures only: nothing here asserts a time. The report states the workload and the KV budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.sampling_params import SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_prompts(num_prompts: int, input_len: int, vocab_size: int,
                   seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (num_prompts, input_len), generator=g).tolist()


def run_throughput(model: str | Path, num_prompts: int = 64, input_len: int = 128,
                   output_len: int = 128, device: str = "auto", dtype: str = "auto",
                   max_num_seqs: int = 256, baseline: bool = True,
                   hf_batch_size: int | None = None) -> dict:
    """Generate output_len tokens (greedy, EOS ignored) for num_prompts random prompts of
    input_len tokens; returns tokens/s for the engine and, with baseline, for HF generate."""
    from engine.llm import LLM

    llm = LLM(str(model), device=device, dtype=dtype, max_num_seqs=max_num_seqs,
              max_model_len=input_len + output_len + 1, enable_prefix_caching=False)
    worker = llm.engine.worker
    dev = str(worker.device)
    prompts = random_prompts(num_prompts, input_len, llm.engine.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True))  # warm-up: kernels compiled
    _sync(dev)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    _sync(dev)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    report = {
        "model": str(model), "device": dev, "dtype": str(worker.dtype).replace("torch.", ""),
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "kv_blocks": llm.engine.cache_config.num_blocks,
        "block_size": llm.engine.cache_config.block_size,
        "engine_s": elapsed, "engine_output_tok_s": generated / elapsed,
        "engine_total_tok_s": (generated + num_prompts * input_len) / elapsed,
    }
    if baseline:
        del llm, outs
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        report.update(_hf_throughput(model, prompts, output_len, dev, worker.dtype,
                                     hf_batch_size or num_prompts))
        report["speedup"] = report["engine_output_tok_s"] / report["hf_output_tok_s"]
    return report


def _hf_throughput(model, prompts, output_len, device, dtype, batch_size) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # all prompts have one length: no padding
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        _sync(device)
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch_size):
            out = hf.generate(ids[i:i + batch_size], **kwargs)
            generated += (out.shape[1] - ids.shape[1]) * out.shape[0]
        _sync(device)
    elapsed = time.perf_counter() - t0
    return {"hf_s": elapsed, "hf_output_tok_s": generated / elapsed, "hf_batch_size": batch_size}


def make_random_checkpoint(out_dir: str | Path, preset: str = "llama-1b",
                           dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight Llama of a real shape (no download), for benchmarks on a GPU."""
    from transformers import LlamaConfig

    from engine.tiny import make_tiny_checkpoint

    shapes = {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
        "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
        "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    }
    if preset not in shapes:
        from engine.errors import ConfigError

        raise ConfigError(f"preset {preset!r}: one of {', '.join(shapes)}")
    config = LlamaConfig(**shapes[preset], max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=0, eos_token_id=1, architectures=["LlamaForCausalLM"])
    return make_tiny_checkpoint(config, Path(out_dir), dtype=dtype)
