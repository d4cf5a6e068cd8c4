"""The engine options every command that builds an engine shares (generate, serve, bench),
named as vLLM names them; `engine_kwargs` turns them into EngineConfig.create's arguments."""

from __future__ import annotations

import functools
import importlib

import click


class LazyChoice(click.Choice):
    """click.Choice over a list the engine keeps (the one place it is spelled), imported when
    first read: the engine's modules import torch, and `aphro --help` (which imports every
    command's module) stays without it."""

    def __init__(self, module: str, name: str) -> None:
        self._source = (module, name)
        super().__init__(())

    @property
    def choices(self):
        module, name = self._source
        return getattr(importlib.import_module(module), name)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns its argument
        pass


def quantization_choice() -> LazyChoice:
    """--quantization's values: engine.layers.quantization's QUANTIZATION_METHODS."""
    return LazyChoice("engine.layers.quantization.registry", "QUANTIZATION_METHODS")


def kv_cache_dtype_choice() -> LazyChoice:
    """--kv-cache-dtype's values: engine.config.KV_CACHE_DTYPES."""
    return LazyChoice("engine.config", "KV_CACHE_DTYPES")


KV_CACHE_DTYPE_HELP = ("KV cache: auto (the model's dtype) or fp8 (e4m3, half the bytes of bf16, "
                       "for memory; values saturate at +-448, no scales; GPUs of compute "
                       "capability >= 8.9).")

_ENGINE_OPTIONS = [
    click.option("--dtype", default="auto", show_default=True,
                 help="auto (float32 on CPU, the checkpoint's / bf16 on GPU), bfloat16, "
                      "float16, float32."),
    click.option("--device", default="auto", show_default=True, help="auto, cuda, cpu."),
    click.option("--tensor-parallel-size", "-tp", "--tp", "tensor_parallel_size", default=1,
                 show_default=True, type=click.IntRange(1), help="Tensor-parallel ranks."),
    click.option("--max-model-len", type=click.IntRange(1), default=None,
                 help="Context length (default: the model's)."),
    click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
                 default=0.9, show_default=True,
                 help="CUDA: share of the GPU's memory for weights, activations and KV cache."),
    click.option("--kv-cache-bytes", type=click.IntRange(1), default=None,
                 help="KV cache budget per rank in bytes (default: CPU 1 GiB, CUDA from "
                      "--gpu-memory-utilization)."),
    click.option("--max-num-seqs", type=click.IntRange(1), default=512, show_default=True,
                 help="Sequences in one step at most."),
    click.option("--max-num-batched-tokens", type=click.IntRange(1), default=None,
                 help="Tokens in one step at most (default 8192)."),
    click.option("--block-size", type=click.Choice(["8", "16", "32", "64", "128"]),
                 default="16", show_default=True, help="Tokens per KV cache block."),
    click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True,
                 show_default=True, help="Share KV blocks of common prompt prefixes."),
    click.option("--quantization", "-q", type=quantization_choice(), default=None,
                 help="Linear layers: fp8 (FP8 weights and activations, GPUs of compute "
                      "capability >= 8.9), int8 (weight-only); default: the checkpoint's "
                      "quantization_config, else none."),
    click.option("--kv-cache-dtype", type=kv_cache_dtype_choice(), default="auto",
                 show_default=True, help=KV_CACHE_DTYPE_HELP),
    click.option("--enforce-eager", is_flag=True, help="No CUDA graphs."),
    click.option("--max-logprobs", type=click.IntRange(0), default=20, show_default=True,
                 help="Largest logprobs / prompt_logprobs a request may ask for."),
    click.option("--seed", "engine_seed", type=int, default=0, show_default=True,
                 help="Seed of the engine (unseeded sampling, random weights)."),
    click.option("--load-format", type=click.Choice(["auto", "dummy"]), default="auto",
                 show_default=True,
                 help="dummy: random weights made on the device, only config.json is read "
                      "(benchmarks of large shapes without a checkpoint)."),
    click.option("--async-scheduling/--no-async-scheduling", default=None,
                 help="Prepare the next step on the host while the device runs this one "
                      "(default: on with CUDA)."),
    click.option("--worker-address", default=None, metavar="HOST:PORT",
                 help="Tensor-parallel workers started elsewhere by torchrun connect here "
                      "(README, Several machines)."),
]

ENGINE_OPTION_NAMES = ("dtype", "device", "tensor_parallel_size", "max_model_len",
                       "gpu_memory_utilization", "kv_cache_bytes", "max_num_seqs",
                       "max_num_batched_tokens", "block_size", "enable_prefix_caching",
                       "quantization", "kv_cache_dtype", "enforce_eager", "max_logprobs",
                       "engine_seed", "load_format", "async_scheduling", "worker_address")


def engine_options(fn):
    """Add the shared engine options to a click command."""
    for option in reversed(_ENGINE_OPTIONS):
        fn = option(fn)
    return fn


def engine_kwargs(kwargs: dict) -> dict:
    """Pop the engine options out of a command's kwargs, as EngineConfig.create arguments."""
    out = {name: kwargs.pop(name) for name in ENGINE_OPTION_NAMES}
    out["seed"] = out.pop("engine_seed")
    out["block_size"] = int(out["block_size"])
    return out


def with_engine_options(fn):
    """engine_options, and the command receives them as one `engine` dict."""
    @engine_options
    @functools.wraps(fn)
    def wrapper(**kwargs):
        engine = engine_kwargs(kwargs)
        return fn(engine=engine, **kwargs)

    return wrapper


# `aphro generate` and `aphro serve`: refuse a model without a passing, current validation record
strict_option = click.option(
    "--strict", is_flag=True,
    help="Refuse an architecture whose validation record is missing, failed or stale "
         "(`aphro models` lists them); without it, one warning line.")


def check_validated_model(checkpoint, strict: bool) -> None:
    """Before serving the checkpoint folder `checkpoint`: one warning line on stderr when its
    architecture's validation record is missing, failed or stale; with `strict` an
    UnvalidatedModelError instead (engine.models.catalog.check_validated)."""
    from rich.markup import escape

    from aphro_cli.main import err_console
    from engine.models.catalog import check_validated, checkpoint_architecture

    arch = checkpoint_architecture(checkpoint)
    problem = check_validated(arch, strict) if arch else None
    if problem:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False,
                          soft_wrap=True)
