"""The engine's configuration: one `EngineConfig`, built once by `EngineConfig.create` (model
config read, dtype and device resolved, `max_model_len` derived and checked) and handed to every
part. Nothing downstream re-derives a value from the HF config or the user's options."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from engine.layers.quantization import QuantizationConfig

CPU_KV_BYTES = 1 << 30  # the KV budget on CPU when none is given
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.90  # CUDA: share of total device memory the engine may use
    kv_cache_bytes: int | None = None  # explicit KV budget per rank (CPU default: 1 GiB)
    num_blocks: int | None = None  # exactly this many blocks (overrides the budget)
    # "auto": the model's dtype; "fp8" (= "fp8_e4m3"): float8 e4m3, values saturating at
    # +-448, no scale (vLLM's --kv-cache-dtype fp8 without calibrated k/v scales)
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size={self.block_size}: must be one of 8, 16, 32, 64, 128")
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.cache_dtype!r}: one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: "
                              "must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes={self.kv_cache_bytes}: must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_blocks}: must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 512  # 1000 x 256/256 on an H200: +20% over 256 (docs/PERF.md)
    max_num_batched_tokens: int = 8192  # token budget of one step
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True  # split prompts longer than the step's budget

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}: enable chunked prefill or raise the budget")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 600.0  # how long a collective may wait for the other ranks
    shutdown_timeout_s: float = 10.0  # close(): workers still running after this are killed
    # Workers started elsewhere (torchrun on several machines) connect to this address
    # instead of being started here: "HOST:PORT" (README, "Several machines").
    worker_address: str | None = None

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tensor_parallel_size={tp!r}: must be an integer >= 1")
        if self.shutdown_timeout_s < 0:
            raise ConfigError(f"shutdown_timeout_s={self.shutdown_timeout_s}: must be >= 0")


def _unquantized() -> QuantizationConfig:
    from engine.layers.quantization import UnquantizedConfig

    return UnquantizedConfig()


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, resolved. Picklable: TP workers receive it whole."""

    model: str  # local HF checkpoint folder
    hf_config: Any  # transformers PretrainedConfig
    model_class: str | type  # "module:Class" (or the class) serving hf_config.architectures
    dtype: torch.dtype
    device: torch.device  # TP > 1 on CUDA: rank r uses cuda:LOCAL_RANK
    max_model_len: int
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs
    # "auto": the checkpoint's weights; "dummy": random weights made on the device, nothing
    # read but config.json (figures for large shapes without writing a checkpoint)
    load_format: str = "auto"
    max_logprobs: int = 20  # the largest logprobs / prompt_logprobs a request may ask for
    # prepare step N+1 on the host while the device runs step N (default: on CUDA)
    async_scheduling: bool = False
    # the linear layers' scheme: --quantization, or the checkpoint's quantization_config
    quantization: QuantizationConfig = field(default_factory=_unquantized)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def tp_size(self) -> int:
        return self.parallel.tensor_parallel_size

    @property
    def vocab_size(self) -> int:
        return self.hf_config.get_text_config().vocab_size

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type (CacheConfig.cache_dtype resolved)."""
        return self.dtype if self.cache.cache_dtype == "auto" else torch.float8_e4m3fn

    @classmethod
    def create(cls, model: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
               device: str = "auto", max_model_len: int | None = None, block_size: int = 16,
               max_num_seqs: int = 512, max_num_batched_tokens: int | None = None,
               enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
               kv_cache_bytes: int | None = None, num_kv_blocks: int | None = None,
               gpu_memory_utilization: float = 0.9, seed: int = 0,
               tensor_parallel_size: int = 1, enforce_eager: bool = False,
               load_format: str = "auto", distributed_timeout_s: float = 600.0,
               shutdown_timeout_s: float = 10.0, worker_address: str | None = None,
               max_logprobs: int = 20, async_scheduling: bool | None = None,
               quantization: str | None = None, kv_cache_dtype: str = "auto") -> EngineConfig:
        """Read the checkpoint's config and resolve every option; a bad value is a ConfigError
        (a missing or unreadable checkpoint a CheckpointError) before anything is started.
        `quantization`: "fp8", "int8" (quantize at load time) or "compressed-tensors"; None
        takes the checkpoint's quantization_config, if any. `kv_cache_dtype`: "auto" (the
        model's dtype) or "fp8" (CacheConfig.cache_dtype)."""
        from engine.layers.quantization import resolve_quantization
        from engine.models.registry import resolve_class_path

        path = Path(model)
        if not path.is_dir():
            raise CheckpointError(f"model {str(model)!r} is not a local checkpoint folder")
        if load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format={load_format!r}: 'auto' or 'dummy'")
        if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) \
                or max_logprobs < 0:
            raise ConfigError(f"max_logprobs={max_logprobs!r}: must be an integer >= 0")
        hf_config = load_config(path)
        dev = resolve_device(device)
        quant = resolve_quantization(quantization, hf_config, dev)
        cache = CacheConfig(block_size, enable_prefix_caching, gpu_memory_utilization,
                            kv_cache_bytes, num_kv_blocks, kv_cache_dtype)
        if cache.cache_dtype != "auto" and dev.type == "cuda":
            from engine.layers.quantization.fp8 import fp8_supported

            if not fp8_supported(dev):
                raise ConfigError(
                    f"kv_cache_dtype={kv_cache_dtype!r} needs a GPU of compute capability "
                    ">= 8.9 (Ada, Hopper) for its FP8 conversions; this one is "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}")
        parallel = ParallelConfig(tensor_parallel_size, distributed_timeout_s,
                                  shutdown_timeout_s, worker_address)
        check_tp_config(hf_config, parallel.tensor_parallel_size, dev,
                        external=worker_address is not None)
        model_max = model_max_len(hf_config)
        if max_model_len is None:
            max_model_len = model_max
        elif max_model_len > model_max:
            raise ConfigError(f"max_model_len={max_model_len} is larger than the model's "
                              f"max_position_embeddings ({model_max})")
        batched = max_num_batched_tokens or max(8192, 0 if enable_chunked_prefill
                                                else max_model_len)
        return cls(
            model=str(path), hf_config=hf_config,
            model_class=resolve_class_path(getattr(hf_config, "architectures", None) or []),
            dtype=resolve_dtype(dtype, hf_config, dev), device=dev,
            max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
            load_format=load_format, max_logprobs=max_logprobs, quantization=quant,
            async_scheduling=dev.type == "cuda" if async_scheduling is None
            else bool(async_scheduling),
            cache=cache,
            scheduler=SchedulerConfig(max_num_seqs, batched, max_model_len,
                                      enable_chunked_prefill),
            parallel=parallel)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def model_max_len(hf_config) -> int:
    """The longest context the model's position scheme supports."""
    text = hf_config.get_text_config()
    return (getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
            or 2048)


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here")
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r}: cuda or cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, hf_config, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        ckpt = _DTYPES.get(str(ckpt).replace("torch.", ""), torch.float32)
        return torch.bfloat16 if ckpt == torch.float32 else ckpt
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}: one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_config(path: str | os.PathLike):
    """config.json -> a transformers config object, without ever importing remote code."""
    from transformers import AutoConfig, PretrainedConfig

    from engine.checkpoint.files import load_hf_config

    raw = dict(load_hf_config(path))
    raw.pop("auto_map", None)
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError):
        return PretrainedConfig(model_type=model_type, **raw)


def _first_int(cfg, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_tp_config(hf_config, tp: int, device: torch.device | None = None,
                    external: bool = False) -> None:
    """Raise ConfigError when the model cannot be split over `tp` ranks (checked before any
    process starts; the layers check again as they are built)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor_parallel_size={tp!r}: must be an integer >= 1")
    if tp == 1:
        return
    hint = "choose a tensor_parallel_size that divides it"
    heads = _first_int(hf_config, "num_attention_heads", "n_head", "num_heads")
    if heads is not None and heads % tp:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by "
                          f"tensor_parallel_size={tp}: {hint}")
    kv = 1 if getattr(hf_config, "multi_query", False) else \
        _first_int(hf_config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is not None and kv % tp and tp % kv:
        raise ConfigError(f"num_key_value_heads={kv} neither is divisible by nor divides "
                          f"tensor_parallel_size={tp}: KV heads are split when there are more "
                          "than ranks and replicated when fewer; choose a size that fits")
    for name in ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size",
                 "shared_expert_intermediate_size"):
        size = _first_int(hf_config, name)
        if size is not None and size % tp:
            raise ConfigError(f"{name}={size} is not divisible by tensor_parallel_size={tp}: "
                              f"{hint}")
    if device is not None and device.type == "cuda" and not external:
        count = torch.cuda.device_count()
        if tp > count:
            raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs, this machine has "
                              f"{count}: lower it, or start the ranks on several machines "
                              "(README, Several machines)")
