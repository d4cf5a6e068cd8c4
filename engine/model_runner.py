"""Builds the model, owns the KV cache, turns a scheduled batch into flat tensors and runs it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.attention_metadata import AttentionMetadata
from engine.sequence import Sequence


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    sample_seqs: list[Sequence]  # sequences that get a new token this step
    sample_indices: torch.Tensor  # [len(sample_seqs)] rows of the hidden states to sample from
    # (seq, first prompt position scored, row indices) for sequences that asked prompt_logprobs
    prompt_logprob_rows: list[tuple[Sequence, int, torch.Tensor]]


def map_tensors(obj: Any, fn: Callable[[Any], Any], drop_seqs: bool = False) -> Any:
    """Apply fn to every tensor/array in a ModelInput (dataclasses, lists, tuples); with
    drop_seqs, Sequence objects become None (what the other TP ranks are sent)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return fn(obj)
    if isinstance(obj, Sequence):
        return None if drop_seqs else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn,
                                                               drop_seqs)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn, drop_seqs) for x in obj)
    return obj


def to_device(inp: ModelInput, device: torch.device) -> ModelInput:
    """A host ModelInput (CPU tensors or numpy arrays) on `device`."""
    def move(t):
        t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
        return t.to(device, non_blocking=True)
    return map_tensors(inp, move)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, block_size: int,
                 max_model_len: int = 2048, enforce_eager: bool = False) -> None:
        self.model, self.device, self.block_size = model, device, block_size
        self.max_model_len = max_model_len
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: CUDAGraphs | None = None
        self.enforce_eager = enforce_eager or device.type != "cuda"

    def kv_cache_bytes_per_block(self, dtype: torch.dtype) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device)
                          for _ in range(m.num_layers)]

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> ModelInput:
        return to_device(self.prepare_host(scheduled), self.device)

    def prepare_host(self, scheduled: list[tuple[Sequence, int]]) -> ModelInput:
        """Flatten the batch into CPU tensors (what a TP driver sends its ranks before moving
        its own copy to the GPU). `scheduled` holds prefill chunks first, then decodes."""
        bs = self.block_size
        ids, pos, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
        sample_seqs, sample_rows, prompt_rows = [], [], []
        offset = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            if n == 1:  # decode: scalar arithmetic, no per-sequence arrays
                ids.append(seq.last_token_id if start == len(seq) - 1
                           else seq.token_ids[start])
                pos.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                p = np.arange(start, start + n)
                ids.extend(seq.token_slice(start, start + n))
                pos.extend(range(start, start + n))
                table = np.asarray(seq.block_table, dtype=np.int64)
                slots.extend((table[p // bs] * bs + p % bs).tolist())
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == len(seq):
                sample_seqs.append(seq)
                sample_rows.append(offset + n - 1)
            k = seq.sampling_params.prompt_logprobs
            if k is not None and start < seq.num_prompt_tokens - 1:
                last = min(start + n, seq.num_prompt_tokens - 1)  # position predicting the next
                prompt_rows.append((seq, start + 1,
                                    torch.arange(offset, offset + last - start)))
            offset += n

        num_prefills = sum(1 for n in q_lens if n > 1)
        num_prefill_tokens = sum(q_lens[:num_prefills])
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t

        def tensor(a, dtype):
            return torch.from_numpy(np.asarray(a)).to(dtype)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            context_lens=tensor(ctx_lens, torch.int32),
            query_start_loc=tensor(np.concatenate([[0], np.cumsum(q_lens)]), torch.int32),
            seq_start_loc=tensor(np.concatenate([[0], np.cumsum(ctx_lens)]), torch.int32),
            max_query_len=max(q_lens), max_context_len=max(ctx_lens),
            num_prefills=num_prefills, num_prefill_tokens=num_prefill_tokens,
            num_decode_tokens=offset - num_prefill_tokens)
        return ModelInput(
            input_ids=tensor(ids, torch.int64),
            positions=tensor(pos, torch.int64),
            attn_metadata=meta, sample_seqs=sample_seqs,
            sample_indices=tensor(sample_rows, torch.int64), prompt_logprob_rows=prompt_rows)

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        """Capture decode steps for batch sizes 1, 2, 4, 8, 16, 24, ... up to max_batch_size."""
        if self.enforce_eager:
            return
        try:
            self.graphs = CUDAGraphs(self, max_batch_size)
        except RuntimeError as e:  # a model or kernel that cannot be captured: run eagerly
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)
            self.graphs = None

    def release(self) -> None:
        """Drop the CUDA graphs and the KV cache (the runner is unusable afterwards)."""
        if self.graphs is not None:
            self.graphs.reset()
            self.graphs = None
        self.kv_caches = []

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns logits [len(sample_seqs), vocab] and, per prompt_logprob_rows entry, logits
        of its rows."""
        m = inp.attn_metadata
        if self.graphs is not None and m.num_prefills == 0 and self.graphs.fits(m.num_seqs):
            hidden = self.graphs.run(inp)
        else:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, m)
        logits = self.model.compute_logits(hidden[inp.sample_indices])
        prompt_logits = [self.model.compute_logits(hidden[rows.to(hidden.device)])
                         for _, _, rows in inp.prompt_logprob_rows]
        return logits, prompt_logits


def _graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 8))
    return [b for b in sizes if b <= max_batch_size] or [1]


class CUDAGraphs:
    """Decode-only steps replayed from captured CUDA graphs. A batch of n sequences runs in the
    graph of the smallest captured size >= n; padding rows write nowhere (slot -1) and read one
    cached token of block 0, and their outputs are dropped. All graphs share static inputs
    (slices of the largest) and one memory pool."""

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.sizes = _graph_batch_sizes(max_batch_size)
        n, dev = self.sizes[-1], runner.device
        max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                meta = self._metadata(bs)
                args = (self.input_ids[:bs], self.positions[:bs], runner.kv_caches, meta)
                for _ in range(2):  # warm up: Triton compiles, allocator settles
                    runner.model(*args)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = runner.model(*args)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_start_loc=self.query_start_loc[:bs + 1],  # unused by decode kernels
            max_query_len=1, max_context_len=self.runner.max_model_len, num_prefills=0,
            num_prefill_tokens=0, num_decode_tokens=bs)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def reset(self) -> None:
        """Free the graphs and their memory pool now, whoever still holds this object (a
        graph that captured NCCL all-reduces holds the communicator; see Worker.release)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def run(self, inp: ModelInput) -> torch.Tensor:
        m = inp.attn_metadata
        n = m.num_seqs
        bs = next(b for b in self.sizes if b >= n)
        self.input_ids[:n].copy_(inp.input_ids)
        self.positions[:n].copy_(inp.positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.context_lens[:n].copy_(m.context_lens)
        self.context_lens[n:bs].fill_(1)
        width = m.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(m.block_tables)
        self.block_tables[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
