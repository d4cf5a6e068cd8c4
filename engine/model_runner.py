"""Builds the model, owns the KV cache, turns a scheduled batch into flat tensors and runs it."""

from __future__ import annotations

from dataclasses import dataclass

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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, block_size: int) -> None:
        self.model, self.device, self.block_size = model, device, block_size
        self.kv_caches: list[torch.Tensor] = []

    def kv_cache_bytes_per_block(self, dtype: torch.dtype) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device)
                          for _ in range(m.num_layers)]

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> ModelInput:
        """Flatten the batch. `scheduled` holds prefill chunks first, then decodes."""
        bs = self.block_size
        ids, pos, slots, q_lens, ctx_lens, tables = [], [], [], [], [], []
        sample_seqs, sample_rows, prompt_rows = [], [], []
        offset = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            p = np.arange(start, start + n)
            ids.append(seq.token_ids[start:start + n])
            pos.append(p)
            table = np.asarray(seq.block_table, dtype=np.int64)
            slots.append(table[p // bs] * bs + p % bs)
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
        dev = self.device

        def tensor(a, dtype):
            return torch.from_numpy(np.asarray(a)).to(dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(np.concatenate(slots), torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            context_lens=tensor(ctx_lens, torch.int32),
            query_start_loc=tensor(np.concatenate([[0], np.cumsum(q_lens)]), torch.int32),
            seq_start_loc=tensor(np.concatenate([[0], np.cumsum(ctx_lens)]), torch.int32),
            max_query_len=max(q_lens), max_context_len=max(ctx_lens),
            num_prefills=num_prefills, num_prefill_tokens=num_prefill_tokens,
            num_decode_tokens=offset - num_prefill_tokens)
        return ModelInput(
            input_ids=tensor(np.concatenate(ids), torch.int64),
            positions=tensor(np.concatenate(pos), torch.int64),
            attn_metadata=meta, sample_seqs=sample_seqs,
            sample_indices=tensor(sample_rows, torch.int64), prompt_logprob_rows=prompt_rows)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns logits [len(sample_seqs), vocab] and, per prompt_logprob_rows entry, logits
        of its rows."""
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn_metadata)
        logits = self.model.compute_logits(hidden[inp.sample_indices])
        prompt_logits = [self.model.compute_logits(hidden[rows.to(hidden.device)])
                         for _, _, rows in inp.prompt_logprob_rows]
        return logits, prompt_logits
