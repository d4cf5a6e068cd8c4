"""Vocabulary-parallel embedding and LM head: the (padded) vocabulary is split across ranks."""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from engine.errors import ShapeMismatchError
from engine.layers.linear import copy_checked
from engine.layers.sharding import ShardSpec, split_spec

PAD_MULTIPLE = 64


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Round the vocabulary up to a multiple of 64 * tp so every rank holds an equal slice."""
    multiple = PAD_MULTIPLE * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings  # the real vocabulary
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.per_rank = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.embedding_dim = embedding_dim
        weight = torch.empty(self.per_rank, embedding_dim,
                             dtype=params_dtype or torch.get_default_dtype())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.vocab_rows = slice(self.vocab_start, min(self.vocab_end, num_embeddings))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        if loaded.shape != (self.num_embeddings, self.embedding_dim):
            raise ShapeMismatchError((self.num_embeddings, self.embedding_dim), loaded.shape)
        rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()  # padding rows
        if rows:
            copy_checked(param.data[:rows], loaded[self.vocab_start:self.vocab_start + rows])

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        """Rows of the padded vocabulary, split evenly; padding rows are zero (engine.validate.sharding)."""
        if param_name not in ("weight", "bias"):
            return None
        return split_spec(0, self.num_embeddings_padded, self.tp_size,
                          valid=self.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mask, input_ids - self.vocab_start, 0)
        out = nn.functional.embedding(local, self.weight) * mask[:, None].to(self.weight.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split by vocabulary like the embedding (whose weight it may share).
    LogitsProcessor applies it and gathers the slices."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.per_rank, dtype=self.weight.dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                    shard_id: int | str | None = None) -> None:
        if loaded.shape != (self.num_embeddings,):
            raise ShapeMismatchError((self.num_embeddings,), loaded.shape)
        rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called")
