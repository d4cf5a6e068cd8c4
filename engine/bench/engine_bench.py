"""Offline throughput of the engine, the well-known model shapes benchmarks run with random
weights, and the prompts they send (random token ids, or a dataset file).

A dataset file (`--dataset FILE`) is either JSONL - a file named *.jsonl or *.json, one JSON
object a line with a "prompt" string (other keys are ignored) - or plain text, one prompt a line;
blank lines are skipped. Its prompts are tokenized with the model's tokenizer (the engine's
`tokenizer.encode`, as `LLM.generate(prompts)` does), so the engine and the baselines get the same
token ids. Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.core.sampling_params import SamplingParams
from engine.errors import ConfigError


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_prompts(num_prompts: int, input_len: int, vocab_size: int,
                   seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (num_prompts, input_len), generator=g).tolist()


def read_dataset(path: str | Path) -> list[str]:
    """The prompts of a dataset file (the format is in this module's docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--dataset {path}: cannot be read as UTF-8 text ({e})") from None
    prompts = []
    jsonl = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--dataset {path}:{number}: not JSON ({e.msg}); a .jsonl file "
                              'holds one {"prompt": "..."} object a line') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f'--dataset {path}:{number}: no "prompt" string; a .jsonl file '
                              'holds one {"prompt": "..."} object a line')
        prompts.append(row["prompt"])
    if not prompts:
        raise ConfigError(f"--dataset {path}: no prompts in the file")
    return prompts


def dataset_prompts(path: str | Path, tokenizer, vocab_size: int,
                    num_prompts: int | None = None) -> list[list[int]]:
    """The first `num_prompts` (default all) prompts of the file, as token ids."""
    texts = read_dataset(path)
    if num_prompts is not None:
        if num_prompts > len(texts):
            raise ConfigError(f"--num-prompts {num_prompts}: --dataset {path} has only "
                              f"{len(texts)} prompts")
        texts = texts[:num_prompts]
    ids = [tokenizer.encode(t) for t in texts]
    for number, p in enumerate(ids, 1):
        if not p:
            raise ConfigError(f"--dataset {path}: prompt {number} has no tokens")
        if max(p) >= vocab_size:
            raise ConfigError(f"--dataset {path}: prompt {number} has token id {max(p)}, "
                              f"outside the model's vocabulary of {vocab_size}: use the "
                              "model's own tokenizer (--tokenizer)")
    return ids


def engine_facts(engine) -> dict:
    """What the engine was built with: device, dtype, KV budget, batch limits, weight bytes."""
    config = engine.config
    return {"device": str(config.device), "dtype": str(config.dtype).replace("torch.", ""),
            "tp": config.tp_size, "quantization": config.quantization.name,
            "kv_cache_dtype": str(config.kv_cache_dtype).replace("torch.", ""),
            "kv_blocks": engine.num_kv_blocks, "block_size": config.cache.block_size,
            "kv_tokens": engine.num_kv_blocks * config.cache.block_size,
            "max_num_seqs": config.scheduler.max_num_seqs,
            "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
            "max_model_len": config.max_model_len,
            "cuda_graphs": config.device.type == "cuda" and not config.enforce_eager,
            "async_scheduling": config.async_scheduling,
            "weight_bytes_per_rank": engine.collective_rpc(weight_bytes_of)[0]}


def model_record(name: str, hf_config, facts: dict, random_weights: bool) -> dict:
    """The "model" part of a result record."""
    from engine.bench.roofline import parameter_counts, shape_of

    shape = shape_of(hf_config)
    counts = parameter_counts(shape)
    return {"name": name, "architecture": (getattr(hf_config, "architectures", None)
                                           or ["?"])[0],
            "shape": shape, "parameters": counts["total"],
            "active_parameters": counts["active"],
            # all ranks' bytes: known exactly at TP 1 (replicated norms make a sum overcount)
            "weight_bytes": facts["weight_bytes_per_rank"] if facts["tp"] == 1 else None,
            "weight_bytes_per_rank": facts["weight_bytes_per_rank"], "tp": facts["tp"],
            "dtype": facts["dtype"], "quantization": facts["quantization"],
            "random_weights": random_weights}


def throughput_config(model: str | Path, prompts: list[list[int]], output_len: int,
                      **options):
    """The engine configuration `bench throughput` measures (also scripts/ab_step.py
    --offline's): EngineConfig.create's `options` (None: its default), max_model_len the
    longest prompt + output_len + 1 unless given, prefix caching off unless given."""
    from engine.config import EngineConfig

    options.setdefault("enable_prefix_caching", False)
    if options.get("max_model_len") is None:
        options["max_model_len"] = max(len(p) for p in prompts) + output_len + 1
    return EngineConfig.create(str(model), **{k: v for k, v in options.items()
                                              if v is not None})


def run_throughput(model: str | Path, prompts: list[list[int]], output_len: int, *,
                   progress: Callable[[int, int], None] | None = None, **options) -> dict:
    """Generate `output_len` tokens (greedy, EOS ignored) for every prompt through the engine
    (options: EngineConfig.create's; max_model_len defaults to the longest prompt + output_len
    + 1, prefix caching off). Returns {"row": the engine's figures, "facts": engine_facts,
    "hf_config"}."""
    from engine.core.llm_engine import LLMEngine

    engine = LLMEngine(throughput_config(model, prompts, output_len, **options),
                       stream_outputs=False)
    try:
        facts = engine_facts(engine)
        dev = facts["device"]
        engine.warm_up()  # kernels compiled for every kind of step (graphs: captured at start)
        sync(dev)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = _drive(engine, prompts, params, progress)
        sync(dev)
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        prompt_tokens = sum(len(p) for p in prompts)
        row = {"name": "aphro", "requests": len(outputs), "seconds": elapsed,
               "output_tokens": generated, "prompt_tokens": prompt_tokens,
               "output_tok_s": generated / elapsed,
               "total_tok_s": (generated + prompt_tokens) / elapsed}
        return {"row": row, "facts": facts, "hf_config": engine.config.hf_config}
    finally:
        engine.close()


def _drive(engine, prompts: list[list[int]], params: SamplingParams,
           progress: Callable[[int, int], None] | None = None) -> list:
    """Add every prompt, step to the end; the finished outputs in prompt order."""
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts]
    done: dict[str, object] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
                if progress is not None:
                    progress(len(done), len(ids))
    return [done[i] for i in ids]


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


def bench_model(model: str | None, preset: str | None, random_weights: bool, on_gpu: bool,
                tmp: str | Path) -> tuple[str, str, str, bool]:
    """(folder, load_format, name, random weights) of what a bench command runs: MODEL's
    weights; with --random-weights its config only; without MODEL a preset shape (default:
    llama-8b on a GPU, tiny on the CPU), random weights built on the device."""
    if model is not None and preset is not None:
        raise ConfigError("give MODEL or --model-config, not both")
    if model is not None:
        return str(model), "dummy" if random_weights else "auto", str(model), random_weights
    preset = preset or ("llama-8b" if on_gpu else "tiny")
    return str(preset_config_dir(preset, Path(tmp) / "config")), "dummy", preset, True
