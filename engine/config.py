"""Engine configuration: one validating dataclass per concern."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.90  # CUDA: share of total device memory the engine may use
    kv_cache_bytes: int | None = None  # explicit KV budget (CPU default: 1 GiB)
    num_blocks: int | None = None  # set once the cache is sized

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size={self.block_size}: must be one of 8, 16, 32, 64, 128")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: "
                              "must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes={self.kv_cache_bytes}: must be positive")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # token budget of one step
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True  # split prompts longer than the step's budget

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}: enable chunked prefill or raise the budget")
