"""Hidden states -> logits over the real vocabulary (gathered across TP ranks)."""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel_state import tp_all_gather
from engine.layers.vocab_embedding import VocabParallelEmbedding


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, scale: float = 1.0,
                 soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size, self.scale, self.soft_cap = vocab_size, scale, soft_cap

    def forward(self, lm_head: VocabParallelEmbedding, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, vocab_size], in the model's dtype where nothing
        is applied to them (the greedy sampler's argmax takes them as they are: the argmax of a
        float32 copy is the same token), else float32."""
        logits = hidden @ lm_head.weight.t()
        bias = getattr(lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias
        logits = tp_all_gather(logits)[:, : self.vocab_size]
        if self.scale == 1.0 and not self.soft_cap:
            return logits
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap:
            logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
        return logits
