"""Generic load_weights: map checkpoint names onto (possibly fused) parameters; every tensor
that is missing, unused or shaped wrong is reported by name (engine.checkpoint.files.LoadTracker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.checkpoint.report import LoadTracker
from engine.errors import ShapeMismatchError
from engine.layers.linear import copy_checked

# (name, tensor) -> (name, tensor), (name, tensor, shard_id) or None (drop the tensor)
Transform = Callable[[str, torch.Tensor], "tuple | None"]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: int | str | None = None) -> None:
    copy_checked(param.data, loaded)


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                packed_modules: dict[str, tuple[str, int | str]], skip: tuple[str, ...] = (),
                transform: Transform | None = None, strict: bool = True,
                shards: dict[str, set] | None = None) -> LoadTracker:
    """Load `weights` (checkpoint name, full tensor) into `model`.

    packed_modules maps a checkpoint name piece ("q_proj") to the fused parameter piece and the
    shard id ("qkv_proj", "q"). `transform` may rename or reshape a tensor first (transpose a
    Conv1D weight, reorder a per-head interleaved qkv) or return None to drop it; a third item
    it returns is the shard id (bypassing packed_modules), and `shards` then lists the shard
    ids each such parameter needs (per-expert MoE weights). Checkpoint names containing any of
    `skip` are ignored. With strict, any problem raises CheckpointError. A model whose LM head
    and embedding are not named lm_head / embed_tokens says so in `lm_head_weight_name` and
    `embed_weight_name`.
    """
    params = dict(model.named_parameters())
    needed: dict[str, set] = {name: set(ids) for name, ids in (shards or {}).items()}
    for name in params:
        for fused, shard in packed_modules.values():
            if f".{fused}." in f".{name}":
                needed.setdefault(name, set()).add(shard)
    pieces = {(fused, shard): piece for piece, (fused, shard) in packed_modules.items()}

    def shard_name(param: str, shard) -> str | None:
        for (fused, sid), piece in pieces.items():
            if sid == shard and f".{fused}." in f".{param}":
                return param.replace(f"{fused}.", f"{piece}.", 1)
        return None

    tracker = LoadTracker(params, needed, shard_name)
    tied = getattr(model, "tie_word_embeddings", False)
    head_name = getattr(model, "lm_head_weight_name", "lm_head.weight")
    tied_head: tuple[str, torch.Tensor] | None = None

    for ckpt_name, tensor in weights:
        if any(s in ckpt_name for s in skip):
            continue
        name, given = ckpt_name, []
        if transform is not None:
            out = transform(ckpt_name, tensor)
            if out is None:
                continue
            name, tensor, *given = out
        if tied and name == head_name:
            tied_head = (ckpt_name, tensor)  # checked once the embedding is loaded
            continue
        shard = given[0] if given else None
        for piece, (fused, shard_id) in packed_modules.items():
            if not given and f".{piece}." in f".{name}":
                name, shard = name.replace(f"{piece}.", f"{fused}.", 1), shard_id
                break
        param = params.get(name)
        if param is None:
            tracker.unused(ckpt_name)
            continue
        if _dtype_clash(tensor.dtype, param.dtype):
            tracker.unused(f"{ckpt_name} ({str(tensor.dtype).removeprefix('torch.')}, but "
                           f"{name} is {str(param.dtype).removeprefix('torch.')}: the checkpoint "
                           "is quantized where the model is not, or the other way round; check "
                           "config.json's quantization_config and its ignored layers)")
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor.to(param.dtype), shard)
        except ShapeMismatchError as e:
            tracker.misshaped(ckpt_name, e.expected, e.got, name, shard)
            continue
        tracker.loaded(ckpt_name, name, shard)
    if tied_head is not None:
        embed_name = getattr(model, "embed_weight_name", None)
        embed = params.get(embed_name) if embed_name else next(
            (p for n, p in params.items() if n.endswith("embed_tokens.weight")), None)
        _check_tied(tracker, *tied_head, embed)
    if strict:
        tracker.raise_if_errors(type(model).__name__)
    return tracker


_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def _dtype_clash(tensor: torch.dtype, param: torch.dtype) -> bool:
    """An FP8 tensor into a parameter of another dtype (or the reverse) would be converted
    without its scale: refused."""
    return (tensor in _FP8 or param in _FP8) and tensor != param


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
