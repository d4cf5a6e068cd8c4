"""Decode steps replayed from captured CUDA graphs (the model runner's fast path on CUDA)."""

from __future__ import annotations

import torch

from engine.layers.attention_metadata import AttentionMetadata


def _graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 256, then every 32: a batch pads to the next size."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(288, max(max_batch_size, 288) + 32, 32)]
    fitting = [b for b in sizes if b < max_batch_size]
    return fitting + [max_batch_size]


class CUDAGraphs:
    """Decode-only steps replayed from captured CUDA graphs. A batch of n sequences runs in the
    graph of the smallest captured size >= n; padding rows write nowhere (slot -1) and read one
    cached token of block 0, and their outputs are dropped. All graphs share static inputs
    (slices of the largest) and one memory pool."""

    def __init__(self, runner, max_batch_size: int) -> None:
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

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            m: AttentionMetadata) -> torch.Tensor:
        n = m.num_seqs
        bs = next(b for b in self.sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.context_lens[:n].copy_(m.context_lens)
        self.context_lens[n:bs].fill_(1)
        width = m.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(m.block_tables)
        self.block_tables[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
