"""Fused mixture-of-experts (Mixtral-style): a softmax router picks the top-k experts of each
token, every expert runs its gated MLP on the tokens routed to it, and the outputs are summed
with the routing weights.

The token-expert pairs are sorted by expert so each expert reads one contiguous slice. On CUDA
all experts run as two batched matmuls over a padded [experts, max tokens per expert, hidden]
buffer; elsewhere (the reference) one matmul per expert on its slice. Never a loop over tokens.

Tensor parallel: each expert's intermediate dimension is split across ranks (w1/w3 by rows, w2 by
columns, like MergedColumnParallelLinear + RowParallelLinear); the partial outputs are summed
with one all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from engine.errors import ShapeMismatchError
from engine.layers.activation import get_gated_act
from engine.layers.linear import load_shard
from engine.layers.sharding import ShardPart, ShardSpec, divide, split_spec


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] float32, expert ids [T, k] int64), as HF Mixtral: softmax
    in float32, top-k, optionally renormalised to sum to 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: every expert's [gate; up]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    act: nn.Module,  # gated activation: [N, 2 * I] -> [N, I]
    batched: bool | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(act(w13_e x_t)) with e = topk_ids[t, j] -> [T, H]."""
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [T * k]
    order = flat_ids.argsort(stable=True)  # pair indices, grouped by expert
    sorted_ids = flat_ids[order]
    token_of = order // top_k  # the token of each sorted pair
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device)  # [E], no host sync
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    xs = x[token_of]  # [T * k, H], expert-contiguous
    if batched is None:
        batched = x.is_cuda
    if batched:
        ys = _experts_padded(xs, sorted_ids, counts, w13, w2, act)
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                seg = xs[start : start + n]  # [n, H]
                ys[start : start + n] = act(seg @ w13[e].t()) @ w2[e].t()
                start += n
    ys = ys * topk_weights.reshape(-1)[order, None]  # float32 weights, as HF
    out = torch.zeros_like(x)
    return out.index_add_(0, token_of, ys.to(x.dtype))


def _experts_padded(xs, sorted_ids, counts, w13, w2, act) -> torch.Tensor:
    """All experts in two bmm calls: pairs scattered into [E, C, H], multiplied, gathered back
    in sorted order. C is the busiest expert's pair count, or, while a CUDA graph is captured
    (no reading device values), every pair (decode batches are small)."""
    num_experts, hidden = w13.shape[0], xs.shape[1]
    if xs.is_cuda and torch.cuda.is_current_stream_capturing():
        capacity = xs.shape[0]
    else:
        capacity = int(counts.max().item()) if xs.shape[0] else 0
    starts = torch.cumsum(counts, 0) - counts  # [E]
    slot = torch.arange(xs.shape[0], device=xs.device) - starts[sorted_ids]  # row in its expert
    buf = xs.new_zeros(num_experts, capacity, hidden)
    buf[sorted_ids, slot] = xs
    h = torch.bmm(buf, w13.transpose(1, 2))  # [E, C, 2I]
    h = act(h.view(num_experts * capacity, -1)).view(num_experts, capacity, -1)  # [E, C, I]
    out = torch.bmm(h, w2.transpose(1, 2))  # [E, C, H]
    return out[sorted_ids, slot]


class FusedMoE(nn.Module):
    """Experts of one MoE layer. The router lives outside (its logits are passed in).

    Checkpoint tensors load per expert with shard_id (expert, "w1" | "w3" | "w2"): w1 is the
    gate projection, w3 the up projection (both [I, H]), w2 the down projection ([H, I]).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        renormalize: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.per_rank = divide(intermediate_size, self.tp_size, "intermediate_size")
        dtype = params_dtype or torch.get_default_dtype()
        w13 = torch.empty(num_experts, 2 * self.per_rank, hidden_size, dtype=dtype)
        w2 = torch.empty(num_experts, hidden_size, self.per_rank, dtype=dtype)
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.act_fn = get_gated_act(activation)

    def expected_shards(self) -> dict[str, set]:
        """Parameter (relative name) -> the shard ids a full checkpoint provides."""
        e = range(self.num_experts)
        return {
            "w13_weight": {(i, w) for i in e for w in ("w1", "w3")},
            "w2_weight": {(i, "w2") for i in e},
        }

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None
    ) -> None:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise ShapeMismatchError(
                tuple(param.shape), tuple(loaded.shape), "expert weights load one expert at a time"
            )
        expert, which = shard_id
        if not 0 <= expert < self.num_experts:
            raise ShapeMismatchError(
                tuple(param.shape[1:]),
                tuple(loaded.shape),
                f"expert {expert} of {self.num_experts}",
            )
        if which == "w2":
            load_shard(param.data[expert], loaded, 1, self.tp_rank, self.intermediate_size)
            return
        offset = 0 if which == "w1" else self.per_rank
        dst = param.data[expert].narrow(0, offset, self.per_rank)
        load_shard(dst, loaded, 0, self.tp_rank, self.intermediate_size)

    def tp_shard_spec(self, param_name: str) -> ShardSpec | None:
        """w13 is split along its rows (gate and up each cut in tp pieces), w2 along its
        columns; read by engine.validate.sharding."""
        size, per_rank = self.intermediate_size, self.per_rank
        if param_name == "w13_weight":
            return ShardSpec(
                1, (ShardPart(size, per_rank, 1, "w1"), ShardPart(size, per_rank, 1, "w3"))
            )
        if param_name == "w2_weight":
            return split_spec(2, size, self.tp_size, "w2")
        return None

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H] (summed over ranks)."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = fused_experts(x, self.w13_weight, self.w2_weight, weights, ids, self.act_fn)
        return tp_all_reduce(out) if self.tp_size > 1 else out
