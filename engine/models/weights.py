"""Generic load_weights: map checkpoint names onto (possibly fused) parameters; every tensor
that is missing, unused or shaped wrong is reported by name (engine.loader.LoadTracker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.errors import ShapeMismatchError
from engine.layers.linear import copy_checked
from engine.loader import LoadTracker

Transform = Callable[[str, torch.Tensor], "tuple[str, torch.Tensor] | None"]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: int | str | None = None) -> None:
    copy_checked(param.data, loaded)


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                packed_modules: dict[str, tuple[str, int | str]], skip: tuple[str, ...] = (),
                transform: Transform | None = None, strict: bool = True) -> LoadTracker:
    """Load `weights` (checkpoint name, full tensor) into `model`.

    packed_modules maps a checkpoint name piece ("q_proj") to the fused parameter piece and the
    shard id ("qkv_proj", "q"). `transform` may rename or reshape a tensor first (transpose a
    Conv1D weight, reorder a per-head interleaved qkv) or return None to drop it. Checkpoint
    names containing any of `skip` are ignored. With strict, any problem raises CheckpointError.
    """
    params = dict(model.named_parameters())
    shards: dict[str, set] = {}
    for name in params:
        for fused, shard in packed_modules.values():
            if f".{fused}." in f".{name}":
                shards.setdefault(name, set()).add(shard)
    tracker = LoadTracker(params, shards)
    tied = getattr(model, "tie_word_embeddings", False)
    tied_head: tuple[str, torch.Tensor] | None = None

    for ckpt_name, tensor in weights:
        if any(s in ckpt_name for s in skip):
            continue
        name = ckpt_name
        if transform is not None:
            out = transform(ckpt_name, tensor)
            if out is None:
                continue
            name, tensor = out
        if tied and name == "lm_head.weight":
            tied_head = (ckpt_name, tensor)  # checked once the embedding is loaded
            continue
        shard = None
        for piece, (fused, shard_id) in packed_modules.items():
            if f".{piece}." in f".{name}":
                name, shard = name.replace(f"{piece}.", f"{fused}.", 1), shard_id
                break
        param = params.get(name)
        if param is None:
            tracker.unused(ckpt_name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor.to(param.dtype), shard)
        except ShapeMismatchError as e:
            tracker.misshaped(ckpt_name, e.expected, e.got, name, shard)
            continue
        tracker.loaded(ckpt_name, name, shard)
    if tied_head is not None:
        embed = next((p for n, p in params.items() if n.endswith("embed_tokens.weight")), None)
        _check_tied(tracker, *tied_head, embed)
    if strict:
        tracker.raise_if_errors(type(model).__name__)
    return tracker


def _check_tied(tracker: LoadTracker, name: str, tensor: torch.Tensor,
                embed: nn.Parameter | None) -> None:
    """A checkpoint may carry lm_head.weight although the config ties it: it must equal the
    embedding (compared on this rank's rows)."""
    if embed is None:
        tracker.unused(name)
        return
    rows = tensor[getattr(embed, "vocab_rows", slice(None))]
    if not torch.equal(rows.to(embed.dtype), embed.data[: rows.shape[0]]):
        tracker.unused(f"{name} (tie_word_embeddings is set but it differs from the embedding)")
