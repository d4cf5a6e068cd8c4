"""Offline throughput of the engine beside HF transformers' generate, in the same process.

Figures only: nothing here asserts a time. The report states the workload and the KV budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.core.sampling_params import SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_prompts(num_prompts: int, input_len: int, vocab_size: int,
                   seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (num_prompts, input_len), generator=g).tolist()


def run_throughput(model: str | Path, num_prompts: int = 64, input_len: int = 128,
                   output_len: int = 128, device: str = "auto", dtype: str = "auto",
                   max_num_seqs: int | None = None, baseline: bool = True,
                   hf_batch_size: int | None = None, quantization: str | None = None,
                   load_format: str = "auto") -> dict:
    """Generate output_len tokens (greedy, EOS ignored) for num_prompts random prompts of
    input_len tokens; returns tokens/s for the engine and, with baseline, for HF generate.
    `quantization` is the engine's (HF runs the checkpoint as it is); load_format "dummy":
    random weights, only config.json read (no baseline then)."""
    from engine.core.llm import LLM

    seqs = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}  # else the default
    llm = LLM(str(model), device=device, dtype=dtype,
              max_model_len=input_len + output_len + 1, enable_prefix_caching=False,
              quantization=quantization, load_format=load_format, **seqs)
    config = llm.engine.config
    dev = str(config.device)
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
        "model": str(model), "device": dev, "dtype": str(config.dtype).replace("torch.", ""),
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "kv_blocks": llm.engine.num_kv_blocks, "block_size": config.cache.block_size,
        "quantization": config.quantization.name,
        "weight_bytes_per_rank": llm.engine.executor.collective_rpc(weight_bytes_of)[0],
        "engine_s": elapsed, "engine_output_tok_s": generated / elapsed,
        "engine_total_tok_s": (generated + num_prompts * input_len) / elapsed,
    }
    llm.close()
    if baseline and load_format != "dummy":
        del llm, outs
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        report.update(_hf_throughput(model, prompts, output_len, dev, config.dtype,
                                     hf_batch_size or num_prompts))
        report["speedup"] = report["engine_output_tok_s"] / report["hf_output_tok_s"]
    return report


def _hf_throughput(model, prompts, output_len, device, dtype, batch_size) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # all prompts have one length: no padding
    kwargs = {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False,
              "pad_token_id": 0}
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


def weight_bytes_of(runner) -> int:
    """The bytes of one rank's parameters (collective_rpc)."""
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


# Well-known shapes for benchmarks with random weights (no download): HF config fields, and the
# HF model type where it is not Llama
PRESETS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
    "mistral-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768},
    "mixtral-8x7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "num_local_experts": 8, "num_experts_per_tok": 2},
}
PRESET_TYPES = {"qwen2.5-7b": ("qwen2", "Qwen2ForCausalLM"),
                "mistral-7b": ("mistral", "MistralForCausalLM"),
                "mixtral-8x7b": ("mixtral", "MixtralForCausalLM")}
ALIASES = {"llama-3-8b": "llama-8b"}


def preset_config(preset: str):
    from transformers import AutoConfig

    preset = ALIASES.get(preset, preset)
    if preset not in PRESETS:
        from engine.errors import ConfigError

        raise ConfigError(f"preset {preset!r}: one of {', '.join([*PRESETS, *ALIASES])}")
    model_type, arch = PRESET_TYPES.get(preset, ("llama", "LlamaForCausalLM"))
    return AutoConfig.for_model(model_type, **PRESETS[preset], max_position_embeddings=32768,
                                rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
                                torch_dtype="bfloat16", architectures=[arch])


def make_random_checkpoint(out_dir: str | Path, preset: str = "llama-1b",
                           dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight Llama of a preset shape, saved as safetensors with a tokenizer."""
    from engine.validate.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(preset_config(preset), Path(out_dir), dtype=dtype)


def preset_config_dir(preset: str, out_dir: str | Path) -> Path:
    """A folder holding only the config.json of a preset shape (for load_format="dummy")."""
    out = Path(out_dir)
    preset_config(preset).save_pretrained(out)
    return out


def decode_latency(model_dir: str | Path, tp: int = 1, input_len: int = 128,
                   output_len: int = 128, dtype: str = "bfloat16", device: str = "auto",
                   load_format: str = "dummy", enforce_eager: bool = False,
                   seed: int = 0, quantization: str | None = None) -> dict:
    """One request (batch 1) of `input_len` random prompt tokens and `output_len` greedy tokens
    at tensor_parallel_size=`tp`, timed as a user sees it: TTFT is a 1-token request's wall
    time, a decode step is (T(output_len tokens) - T(1 token)) / (output_len - 1), nothing
    synchronised in between (a per-step sync would undo asynchronous scheduling's overlap);
    the median and mean over 3 runs. With load_format="dummy" the weights are random and only
    config.json is read. Also reports the weight bytes each rank streams per decode step, for
    the memory roofline."""
    import statistics

    from engine.config import EngineConfig
    from engine.core.llm_engine import LLMEngine

    block = 16
    max_len = input_len + output_len + block
    config = EngineConfig.create(
        model_dir, dtype=dtype, device=device, max_model_len=max_len, max_num_seqs=1,
        max_num_batched_tokens=max(2048, input_len), tensor_parallel_size=tp,
        enforce_eager=enforce_eager, load_format=load_format, seed=seed, block_size=block,
        num_kv_blocks=-(-max_len // block) + 2, enable_prefix_caching=False,
        quantization=quantization)
    engine = LLMEngine(config)
    try:
        dev = str(config.device)
        weight_bytes = engine.collective_rpc(weight_bytes_of)[0]
        ids = random_prompts(1, input_len, engine.vocab_size, seed)[0]

        def run(n: int) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            engine.add_request(prompt_token_ids=ids, sampling_params=SamplingParams(
                temperature=0, max_tokens=n, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
            _sync(dev)
            return time.perf_counter() - t0

        run(8)  # warm-up: kernels compiled, graphs replayed once
        first = [run(1) for _ in range(3)]
        decode = [(run(output_len) - statistics.median(first)) / max(output_len - 1, 1)
                  for _ in range(3)]
        return {"model": str(model_dir), "tp": tp, "dtype": dtype, "device": dev,
                "quantization": config.quantization.name,
                "input_len": input_len, "output_len": output_len,
                "cuda_graphs": dev.startswith("cuda") and not enforce_eager,
                "weight_bytes_per_rank": weight_bytes,
                "prefill_ms": statistics.median(first) * 1e3,
                "decode_ms_median": statistics.median(decode) * 1e3,
                "decode_ms_mean": statistics.fmean(decode) * 1e3,
                "decode_tok_s": len(decode) / sum(decode)}
    finally:
        engine.close()
