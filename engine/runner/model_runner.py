"""The model runner of one rank: builds the model and loads its weights, owns the KV cache and
the CUDA graphs, runs a StepBatch and (rank 0) samples from it.

With tensor_parallel_size 1 the engine holds the runner itself as its executor; with N > 1 each
worker process holds one (engine.distributed). Either way the engine calls the same methods:
`available_kv_blocks`, `init_kv_cache`, `execute`, `observe` / `take_observations`,
`collective_rpc`, `close`.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.config import CPU_KV_BYTES, EngineConfig
from engine.core.batch import RunnerOutput, StepBatch
from engine.distributed.parallel_state import tp_broadcast
from engine.errors import ConfigError
from engine.layers.attention_metadata import AttentionMetadata
from engine.runner.cuda_graphs import CUDAGraphs
from engine.runner.observer import (
    Capture,
    ModuleTracer,
    Observations,
    ObserveSpec,
    layer_list_name,
    probe_names,
)
from engine.runner.sampler import (
    DeviceSample,
    Sampler,
    SamplingMetadata,
    prompt_logprob_dicts,
    prompt_logprob_tensors,
)


class PendingOutput:
    """Rank 0's sampled tokens on their way to the host: the copies are queued behind the step
    on the device; result() waits for them (the only wait of a step)."""

    def __init__(self, sample: DeviceSample, prompt: list[list[torch.Tensor]],
                 batch: StepBatch) -> None:
        self.sample, self.batch = sample, batch
        tensors = sample.tensors() + [t for p in prompt for t in p]
        self.event = None
        if tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                         .copy_(t, non_blocking=True) for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensors

    def result(self) -> RunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        n = len(self.sample.tensors())
        out = self.sample.to_host(self.host[:n])
        rest = self.host[n:]
        prompt = [prompt_logprob_dicts(rows, rest[3 * i:3 * i + 3])
                  for i, rows in enumerate(self.batch.prompt_logprobs)]
        return RunnerOutput(out.token_ids, out.logprobs, prompt)


def fresh_prefill_lens(b: StepBatch) -> tuple[int, ...] | None:
    """AttentionMetadata.fresh_prefill_lens of a step: its prefill query lengths when no
    prefill sequence has tokens cached before this step's chunk."""
    n = b.num_prefills
    if n == 0:
        return None
    q_lens = np.diff(b.query_start_loc[:n + 1])
    if not np.array_equal(q_lens, b.context_lens[:n]):
        return None
    return tuple(q_lens.tolist())


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled]


def build_model(config: EngineConfig, device: torch.device):
    """The model of config.model_class on `device` in config.dtype, its weights loaded (or
    random for load_format "dummy"); returns (model, load report dict or None)."""
    from engine.checkpoint.files import iterate_weights
    from engine.checkpoint.random_weights import randomize_weights
    from engine.layers.quantization import construct_model, process_weights_after_loading
    from engine.models.contract import check_load_result, check_model_instance
    from engine.models.registry import load_class

    model_cls = load_class(config.model_class)
    quant = config.quantization  # its LinearMethod goes to every linear layer
    torch.manual_seed(config.seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device):
            model = construct_model(model_cls, config.hf_config, quant)
    finally:
        torch.set_default_dtype(old_dtype)
    check_model_instance(model)
    report = None
    if config.load_format == "dummy":
        randomize_weights(model, config.seed)
    else:
        tracker = model.load_weights(quant.checkpoint_weights(iterate_weights(config.model)))
        report = check_load_result(model, tracker).report()
    process_weights_after_loading(model)  # e.g. quantize what was loaded in the model dtype
    return model.eval(), report


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0) -> None:
        self.config, self.rank = config, rank
        dev = config.device
        self.device = torch.device("cuda", local_rank) if dev.type == "cuda" else dev
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.block_size = config.cache.block_size
        self.max_model_len = config.max_model_len
        self.model, self.load_report = build_model(config, self.device)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: CUDAGraphs | None = None
        self.enforce_eager = config.enforce_eager or self.device.type != "cuda"
        self.sampler = Sampler()
        self._prev_sampled = torch.empty(0, dtype=torch.int64, device=self.device)
        self._observe: ObserveSpec | None = None
        self._observed = Observations()
        self._capture: Capture | None = None

    # -- the KV cache ------------------------------------------------------------------------
    def kv_cache_bytes_per_block(self) -> int:
        m = self.model
        return (2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim
                * self.config.kv_cache_dtype.itemsize)

    def available_kv_blocks(self) -> int:
        """How many KV blocks this rank's budget holds (a profiling forward pass on CUDA)."""
        cache, per_block = self.config.cache, self.kv_cache_bytes_per_block()
        if cache.num_blocks:
            num_blocks = cache.num_blocks
        elif cache.kv_cache_bytes is not None:
            num_blocks = cache.kv_cache_bytes // per_block
        elif self.device.type == "cuda":
            num_blocks = self._profile_free_bytes(cache.gpu_memory_utilization) // per_block
        else:
            num_blocks = CPU_KV_BYTES // per_block
        # no use for more than every sequence at full length
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_blocks = int(min(num_blocks, self.config.scheduler.max_num_seqs * blocks_per_seq + 1))
        if num_blocks < 1:
            raise ConfigError(f"the KV budget holds no block of {self.block_size} tokens "
                              f"({per_block} bytes each)")
        return num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (this rank's KV heads) and capture the decode graphs."""
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.config.kv_cache_dtype,
                                      device=self.device) for _ in range(m.num_layers)]
        if not self.enforce_eager:
            try:
                self.graphs = CUDAGraphs(self, self.config.scheduler.max_num_seqs)
            except RuntimeError as e:  # a model or kernel that cannot be captured: run eagerly
                torch.cuda.synchronize()
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)
                self.graphs = None

    def _profile_free_bytes(self, utilization: float) -> int:
        """Run the largest step once without a cache to measure peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        m, bs = self.model, 16
        cache = torch.zeros((2, 1, bs, m.num_kv_heads, m.head_dim),
                            dtype=self.config.kv_cache_dtype, device=self.device)
        i32 = {"dtype": torch.int32, "device": self.device}
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
            block_tables=torch.zeros((1, -(-n // bs)), **i32),  # every entry block 0
            context_lens=torch.tensor([n], **i32), query_start_loc=torch.tensor([0, n], **i32),
            seq_start_loc=torch.tensor([0, n], **i32), max_query_len=n, max_context_len=n,
            num_prefills=1, num_prefill_tokens=n, num_decode_tokens=0,
            fresh_prefill_lens=(n,))  # (the path a prompt from position 0 takes)
        with torch.inference_mode():
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            hidden = m(ids, torch.arange(n, device=self.device), [cache] * m.num_layers, meta)
            m.compute_logits(hidden[-self.config.scheduler.max_num_seqs:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del cache, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return max(0, int(total * utilization) - peak)

    # -- a step ------------------------------------------------------------------------------
    def to_device(self, b: StepBatch) -> DeviceBatch:
        dev = self.device

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=t(b.slot_mapping), block_tables=t(b.block_tables),
            context_lens=t(b.context_lens), query_start_loc=t(b.query_start_loc),
            seq_start_loc=t(b.seq_start_loc), max_query_len=b.max_query_len,
            max_context_len=b.max_context_len, num_prefills=b.num_prefills,
            num_prefill_tokens=b.num_prefill_tokens, num_decode_tokens=b.num_decode_tokens,
            long_rope=None if b.long_rope is None else t(b.long_rope),
            fresh_prefill_lens=fresh_prefill_lens(b))
        return DeviceBatch(t(b.input_ids), t(b.positions), meta, t(b.sample_rows))

    def execute(self, batch: StepBatch) -> RunnerOutput | None:
        """Run one step; rank 0 samples and returns the tokens, the others return None."""
        pending = self.launch(batch)
        return pending.result() if pending is not None else None

    @torch.inference_mode()
    def launch(self, batch: StepBatch) -> PendingOutput | None:
        """Queue one step on the device and return without waiting for it (rank 0: a handle
        whose result() is the RunnerOutput). A sequence whose token the previous step sampled
        takes it on the device (batch.prev_tokens)."""
        for seq_id in batch.finished_seq_ids:
            self.sampler.free(seq_id)
        d = self.to_device(batch)
        if batch.prev_tokens.shape[1]:
            where = torch.from_numpy(batch.prev_tokens).to(self.device, non_blocking=True)
            d.input_ids[where[0]] = self._prev_sampled[where[1]]
        hidden = self._forward(d)
        logits, prompt_logits = self._logits(hidden, d, batch)
        tp = self.config.tp_size
        if self.rank != 0 and tp > 1:
            if self.config.async_scheduling:  # the next step may need rank 0's tokens
                self._prev_sampled = torch.empty(len(batch.sample_rows), dtype=torch.int64,
                                                 device=self.device)
                tp_broadcast(self._prev_sampled, src=0)
            return None
        meta = SamplingMetadata.from_inputs(batch.sampling, self.device, logits.shape[1])
        pending = batch.sampling.pending_outputs
        if pending.shape[1]:  # penalties count a sequence's pending token: its input here
            at = torch.from_numpy(pending).to(self.device, non_blocking=True)
            meta.output_tokens[at[0], at[1]] = d.input_ids[d.sample_rows[at[0]]]
        sample = self.sampler.sample(logits, meta)
        self._prev_sampled = sample.token_ids
        if tp > 1 and self.config.async_scheduling:
            tp_broadcast(sample.token_ids, src=0)
        prompt = [prompt_logprob_tensors(pl, rows)
                  for pl, rows in zip(prompt_logits, batch.prompt_logprobs)]
        return PendingOutput(sample, prompt, batch)

    def _forward(self, d: DeviceBatch) -> torch.Tensor:
        m = d.attn_metadata
        if (self.graphs is not None and m.num_prefills == 0 and self.graphs.fits(m.num_seqs)
                and self._capture is None and m.long_rope is None):
            return self.graphs.run(d.input_ids, d.positions, m)
        if self._observe is not None and self._observe.trace_errors:
            tracer = ModuleTracer(self.model)
            try:
                with tracer:
                    return self.model(d.input_ids, d.positions, self.kv_caches, m)
            except Exception as e:
                e.failed_module = tracer.failed_in
                raise
        return self.model(d.input_ids, d.positions, self.kv_caches, m)

    def _logits(self, hidden: torch.Tensor, d: DeviceBatch, batch: StepBatch):
        """Logits of the sampled rows, and of each prompt-logprob group's rows."""
        logits = self.model.compute_logits(hidden[d.sample_rows])
        prompt_logits = [self.model.compute_logits(
            hidden[rows.row_start:rows.row_start + len(rows.target_ids)])
            for rows in batch.prompt_logprobs]
        if self._observe is not None and self._observe.logits and self.rank == 0:
            # the first logits of a position are the ones that counted: a sequence recomputed
            # (preempted, or LongRoPE's switch to the long factors) keeps them
            seen = self._observed.logits
            sample_seqs = batch.sampling.seq_ids.tolist()
            for seq_id, row, values in zip(sample_seqs, batch.sample_rows.tolist(), logits):
                seen.setdefault((seq_id, int(batch.positions[row])), values.float().cpu())
            for rows, values in zip(batch.prompt_logprobs, prompt_logits):
                for i, v in enumerate(values.float().cpu()):
                    seen.setdefault((rows.seq_id, int(batch.positions[rows.row_start + i])), v)
        return logits, prompt_logits

    # -- the observer hook -------------------------------------------------------------------
    def observe(self, spec: ObserveSpec | None) -> None:
        """Start collecting what `spec` asks for (None: stop); see engine.runner.observer."""
        self._close_capture()
        self._observe, self._observed = spec, Observations()
        if spec is not None and spec.probe:
            layers = layer_list_name(self.model, getattr(self.model, "num_layers", None))
            names = probe_names(self.model, layers) if layers else []
            self._capture = Capture(self.model, names, layers, ours=True)
            self._observed.layers = layers

    def take_observations(self) -> Observations:
        """What was collected since observe() (or the last take), and start afresh."""
        out = self._observed
        if self._capture is not None:
            out.outputs, out.order = dict(self._capture.outputs), list(self._capture.order)
            self._capture.outputs.clear()
            self._capture.order.clear()
        self._observed = Observations(layers=out.layers)
        return out

    def _close_capture(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    # -- the executor interface at TP=1 --------------------------------------------------------
    def collective_rpc(self, fn: str | Callable, *args) -> list[Any]:
        """fn(runner, *args), or runner.fn(*args) for a name; one result per rank (here one)."""
        return [fn(self, *args) if callable(fn) else getattr(self, fn)(*args)]

    def determine_num_blocks(self) -> int:
        return self.available_kv_blocks()

    def close(self) -> None:
        """Free the CUDA graphs and the KV cache now (whoever still holds the runner)."""
        self._close_capture()
        if self.graphs is not None:
            self.graphs.reset()
            self.graphs = None
        self.kv_caches = []
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
