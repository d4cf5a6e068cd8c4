"""One worker per tensor-parallel rank: loads its shard of the model, owns its KV cache, runs
steps. With TP=1 the engine holds the only worker in-process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import CacheConfig
from engine.errors import CheckpointError, ConfigError
from engine.model_runner import ModelInput, ModelRunner
from engine.models.registry import load_model_class

CPU_KV_BYTES = 1 << 30
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


@dataclass
class WorkerConfig:
    model: str  # local HF checkpoint folder
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # no CUDA graphs


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here")
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


def load_config(path: str | Path):
    """config.json -> a transformers config object, without ever importing remote code."""
    from transformers import AutoConfig, PretrainedConfig

    from engine.loader import load_hf_config

    raw = dict(load_hf_config(path))
    raw.pop("auto_map", None)
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError):
        return PretrainedConfig(model_type=model_type, **raw)


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        from engine.loader import eos_token_ids, iterate_weights, load_tokenizer

        path = Path(cfg.model)
        if not path.is_dir():
            raise CheckpointError(f"model {cfg.model!r} is not a local checkpoint folder")
        self.cfg = cfg
        self.hf_config = load_config(path)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.hf_config, self.device)
        self.tokenizer = load_tokenizer(path)
        self.eos_token_ids = eos_token_ids(path)
        max_pos = getattr(self.hf_config, "max_position_embeddings", None) or \
            getattr(self.hf_config, "n_positions", None) or 2048
        self.max_model_len = min(cfg.max_model_len or max_pos, max_pos)
        torch.manual_seed(cfg.seed)
        model_cls = load_model_class(getattr(self.hf_config, "architectures", None) or [])
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(self.hf_config)
        finally:
            torch.set_default_dtype(old_dtype)
        self.load_report = model.load_weights(iterate_weights(path))
        model.eval()
        self.model = model
        self.runner: ModelRunner | None = None

    def init_kv_cache(self, cache: CacheConfig) -> int:
        """Size and allocate the KV cache; returns the number of blocks."""
        runner = ModelRunner(self.model, self.device, cache.block_size, self.max_model_len,
                             self.cfg.enforce_eager)
        per_block = runner.kv_cache_bytes_per_block(self.dtype)
        if cache.num_blocks:
            num_blocks = cache.num_blocks
        elif cache.kv_cache_bytes is not None:
            num_blocks = cache.kv_cache_bytes // per_block
        elif self.device.type == "cuda":
            num_blocks = self._profile_free_bytes(cache.gpu_memory_utilization) // per_block
        else:
            num_blocks = CPU_KV_BYTES // per_block
        # no use for more than every sequence at full length
        blocks_per_seq = -(-self.max_model_len // cache.block_size)
        num_blocks = int(min(num_blocks, self.cfg.max_num_seqs * blocks_per_seq + 1))
        if num_blocks < 1:
            raise ConfigError(f"the KV budget holds no block of {cache.block_size} tokens "
                              f"({per_block} bytes each)")
        runner.allocate_kv_cache(num_blocks, self.dtype)
        runner.capture_cuda_graphs(self.cfg.max_num_seqs)
        self.runner = runner
        return num_blocks

    def _profile_free_bytes(self, utilization: float) -> int:
        """Run the largest step once without a cache to measure peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        runner = ModelRunner(self.model, self.device, 16)
        runner.allocate_kv_cache(1, self.dtype)
        from engine.attention_metadata import AttentionMetadata

        i32 = dict(dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
            block_tables=torch.zeros((1, -(-n // 16)), **i32),  # every entry block 0
            context_lens=torch.tensor([n], **i32), query_start_loc=torch.tensor([0, n], **i32),
            seq_start_loc=torch.tensor([0, n], **i32), max_query_len=n, max_context_len=n,
            num_prefills=1, num_prefill_tokens=n, num_decode_tokens=0)
        with torch.inference_mode():
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, torch.arange(n, device=self.device), runner.kv_caches, meta)
            self.model.compute_logits(hidden[-self.cfg.max_num_seqs:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del runner, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return max(0, int(total * utilization) - peak)

    def prepare(self, scheduled) -> ModelInput:
        return self.runner.prepare(scheduled)

    def execute(self, model_input: ModelInput):
        return self.runner.execute(model_input)
