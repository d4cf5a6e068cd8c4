"""Per-step attention inputs. Built by the ModelRunner; read by PagedAttention (and `long_rope`
by the rotary embedding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Flattened batch of `num_seqs` sequences: prefills (query_len > 1 or first chunk) first,
    then decodes (query_len == 1).

    Sequence i owns query tokens query_start_loc[i]:query_start_loc[i+1] of the flat batch; they
    sit at positions context_lens[i] - query_len_i ... context_lens[i] - 1 of that sequence, and
    attend causally to the sequence's cached keys 0 ... their own position (KV for this step's
    tokens is written to the cache first, at slot_mapping).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, block * block_size + offset; -1 = skip
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative context lengths
    max_query_len: int
    max_context_len: int
    num_prefills: int  # sequences with a query of more than one token (or a first chunk)
    num_prefill_tokens: int
    num_decode_tokens: int
    # [num_tokens] bool, or None (most steps): the token belongs to a prompt longer than a
    # LongRoPE model's original length, so its rotary uses the long factors at any position
    long_rope: torch.Tensor | None = None
    # the prefill sequences' query lengths (host ints) when every one of them starts at
    # position 0, so their keys are exactly this step's keys (dense causal attention can serve
    # them: engine.layers.attention); None when any has cached tokens before its chunk
    fresh_prefill_lens: tuple[int, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens
