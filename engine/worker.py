"""One worker per tensor-parallel rank: loads its shard of the model, owns its KV cache, runs
steps. With TP=1 the engine holds the only worker in-process.

Below the Worker: what a worker process does (engine.executor starts it and is its driver): join
the group, then run each message the driver broadcasts until told to stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import CacheConfig
from engine.distributed import set_tensor_parallel
from engine.errors import CheckpointError, ConfigError
from engine.model_runner import ModelInput, ModelRunner, map_tensors, to_device
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
    # tensor parallel: how long a collective may wait for the other ranks
    distributed_timeout_s: float = 600.0
    # "auto": the checkpoint's weights; "dummy": random weights made on the device, nothing
    # read but config.json (latency figures of large shapes without writing a checkpoint)
    load_format: str = "auto"


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


@torch.no_grad()
def _dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place: N(0, 0.02) matrices and biases, norm weights 1."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)


class Worker:
    def __init__(self, cfg: WorkerConfig, load_tokenizer: bool = True) -> None:
        from engine import loader

        path = Path(cfg.model)
        if not path.is_dir():
            raise CheckpointError(f"model {cfg.model!r} is not a local checkpoint folder")
        self.cfg = cfg
        self.hf_config = load_config(path)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.hf_config, self.device)
        self.tokenizer = loader.load_tokenizer(path) if load_tokenizer else None
        self.eos_token_ids = loader.eos_token_ids(path)
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
        if cfg.load_format == "dummy":
            self.load_report = None
            _dummy_weights(model, cfg.seed)
        elif cfg.load_format == "auto":
            self.load_report = model.load_weights(loader.iterate_weights(path))
        else:
            raise ConfigError(f"load_format={cfg.load_format!r}: 'auto' or 'dummy'")
        model.eval()
        self.model = model
        self.runner: ModelRunner | None = None

    def num_kv_blocks(self, cache: CacheConfig) -> int:
        """How many KV blocks this rank's budget holds (a profiling forward pass on CUDA: with
        tensor parallelism every rank runs it together)."""
        per_block = self._new_runner(cache).kv_cache_bytes_per_block(self.dtype)
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
        return num_blocks

    def init_kv_cache(self, cache: CacheConfig, num_blocks: int | None = None) -> int:
        """Allocate the KV cache (this rank's KV heads) of `num_blocks` blocks, by default as
        many as num_kv_blocks() finds; returns the number of blocks."""
        if num_blocks is None:
            num_blocks = self.num_kv_blocks(cache)
        runner = self._new_runner(cache)
        runner.allocate_kv_cache(num_blocks, self.dtype)
        runner.capture_cuda_graphs(self.cfg.max_num_seqs)
        self.runner = runner
        return num_blocks

    def _new_runner(self, cache: CacheConfig) -> ModelRunner:
        return ModelRunner(self.model, self.device, cache.block_size, self.max_model_len,
                           self.cfg.enforce_eager)

    def _profile_free_bytes(self, utilization: float) -> int:
        """Run the largest step once without a cache to measure peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        runner = ModelRunner(self.model, self.device, 16)
        runner.allocate_kv_cache(1, self.dtype)
        from engine.attention_metadata import AttentionMetadata

        i32 = {"dtype": torch.int32, "device": self.device}
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

    def release(self) -> None:
        """Free the CUDA graphs and KV cache now, not when the last reference goes: the
        engine, a test or a caller may still hold this worker after its engine closed."""
        if self.runner is not None:
            self.runner.release()
            self.runner = None

    def prepare(self, scheduled) -> ModelInput:
        return self.runner.prepare(scheduled)

    def prepare_host(self, scheduled) -> ModelInput:
        return self.runner.prepare_host(scheduled)

    def execute(self, model_input: ModelInput):
        return self.runner.execute(model_input)


# -- a tensor-parallel rank --------------------------------------------------------------------
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # a worker waits this long for the next message
ERROR_KEY = "aphro/error/{}"  # store key where a failed local worker leaves its traceback


def rank_device(device: str, local_rank: int) -> str:
    dev = resolve_device(device)
    if dev.type != "cuda":
        return str(dev)
    if dev.index not in (None, local_rank) and device != "auto":
        raise ConfigError(f"device={device!r} with tensor parallelism: give device='cuda'; "
                          "rank r uses GPU LOCAL_RANK (cuda:r on one machine)")
    return f"cuda:{local_rank}"


def to_wire(model_input: ModelInput) -> ModelInput:
    """A host ModelInput as the other ranks need it: numpy arrays, no Sequence objects."""
    return map_tensors(model_input, lambda t: t.numpy(), drop_seqs=True)


def send(msg: tuple, group) -> None:
    dist.broadcast_object_list([msg], src=0, group=group)


def recv(group) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class RankState:
    """The actions behind each driver message. Workers run them on receipt; the driver runs the
    same action right after broadcasting it, so every collective inside is matched."""

    def __init__(self, rank: int, world: int, local_rank: int, control) -> None:
        self.rank, self.world, self.local_rank, self.control = rank, world, local_rank, control
        self.worker: Worker | None = None
        self.undo: Callable[[], Any] | None = None

    def init(self, cfg: WorkerConfig, rank_init: Callable[[], Any] | None) -> Worker:
        """Build this rank's Worker. rank_init runs first; a callable it returns runs at
        release (tests plant and remove a bug this way)."""
        self.release()
        undo = rank_init() if rank_init is not None else None
        self.undo = undo if callable(undo) else None
        if self.world > 1:
            cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, self.local_rank),
                                      tensor_parallel_size=self.world)
        self.worker = Worker(cfg, load_tokenizer=self.rank == 0)  # rank 0 detokenizes
        return self.worker

    def release(self) -> None:
        """Drop the model and KV cache (the ranks stay, ready for another init)."""
        on_gpu = self.worker is not None and self.worker.device.type == "cuda"
        if self.worker is not None:
            self.worker.release()
        self.worker = None
        if self.undo is not None:
            undo, self.undo = self.undo, None
            undo()
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()

    def init_kv_cache(self, cache: CacheConfig) -> int:
        n = torch.tensor([self.worker.num_kv_blocks(cache)], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.control)  # the smallest rank's
        return self.worker.init_kv_cache(cache, int(n.item()))

    def step(self, wire: ModelInput) -> None:
        self.worker.execute(to_device(wire, self.worker.device))

    def call(self, fn: str | Callable, args: tuple) -> Any:
        return fn(self.worker, *args) if callable(fn) else getattr(self.worker, fn)(*args)


def init_groups(backend: str, rank: int, world: int, timeout: datetime.timedelta, store=None):
    """Join the default group (the model's collectives) and make a gloo group for messages.
    Without a store, torchrun's environment (env://) is the rendezvous."""
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timeout)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def serve(rank: int, world: int, local_rank: int, control, store=None) -> None:
    """A worker's loop: run each message from the driver until told to stop. On any failure the
    traceback goes to stderr (and the store) and the process exits."""
    set_tensor_parallel(rank, world, dist.group.WORLD)
    state = RankState(rank, world, local_rank, control)
    try:
        while True:
            msg = recv(control)
            kind = msg[0]
            if kind == "step":
                state.step(msg[1])
            elif kind == "call":
                dist.gather_object(state.call(msg[1], msg[2]), None, dst=0, group=control)
            elif kind == "init":
                state.init(msg[1], msg[2])
            elif kind == "kv":
                state.init_kv_cache(msg[1])
            elif kind == "release":
                state.release()
            elif kind == "stop":
                break
    except BaseException:  # noqa: BLE001 - any failure: report it, leave the group
        text = traceback.format_exc()
        print(f"[aphro tensor-parallel rank {rank}] {text}", file=sys.stderr, flush=True)
        if store is not None:
            with contextlib.suppress(RuntimeError):  # the driver's store may be gone already
                store.set(ERROR_KEY.format(rank), text[-4000:])
        os._exit(1)
    state.release()
    if dist.get_backend() == "nccl":  # leave by exiting, the quickest way (the driver
        sys.stdout.flush()            # aborts its side alone, leave_group)
        sys.stderr.flush()
        os._exit(0)
    leave_group("gloo")


def leave_group(backend: str) -> None:
    """Leave the default group and its subgroups. NCCL groups are aborted, which is local (a
    rank may be gone already). Both abort and destroy block while a CUDA graph that captured
    the group's collectives is alive (4x H200, scripts/nccl_teardown_diag.py): release the
    workers first (Worker.release frees the graphs). gloo groups are destroyed."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    with contextlib.suppress(RuntimeError, ValueError, AssertionError):
        if not dist.is_initialized():
            return
        if backend == "nccl" and abort is not None:
            torch.cuda.synchronize()  # none of this rank's work is in flight
            abort()
        else:
            dist.destroy_process_group()


def worker_main() -> None:
    """Entry point of a worker process the executor starts (rank >= 1). The environment holds
    torchrun's variables plus APHRO_TP_BACKEND, APHRO_TP_TIMEOUT_S and APHRO_TP_THREADS."""
    env = os.environ
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    backend = env["APHRO_TP_BACKEND"]
    timeout = datetime.timedelta(seconds=float(env["APHRO_TP_TIMEOUT_S"]))
    if env.get("APHRO_TP_THREADS"):
        torch.set_num_threads(int(env["APHRO_TP_THREADS"]))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    store.set(f"aphro/joined/{rank}", "1")
    control = init_groups(backend, rank, world, timeout, store)
    serve(rank, world, local_rank, control, store)
