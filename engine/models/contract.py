"""The model contract: what every model class gives the engine, parity-check (with
localization), the sharding check and the loader's report. Generated, explicit and out-of-tree
models are held to the same contract (docs/MODELS.md).

`CausalLM` writes it down as a Protocol. `check_model_class` checks a class when the registry
registers or loads it; `check_model_instance` checks the model the runner has just built, and
`check_load_result` what its load_weights returned. Each names the missing piece in a
ModelContractError instead of an AttributeError deep inside a run.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from engine.checkpoint.report import LoadTracker
from engine.errors import ModelContractError

FORWARD_ARGS = ("input_ids", "positions", "kv_caches", "attn_metadata")
RUNNER_ATTRIBUTES = ("num_layers", "num_kv_heads", "head_dim")
GUIDE = "docs/MODELS.md, The model contract"


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only causal LM the engine can run (an nn.Module).

    Built as `cls(hf_config)` (or `cls(hf_config, linear_method)`) under the target device and
    dtype; every tensor-parallel layer reads its rank from engine.distributed at construction.
    """

    num_layers: int  # decoder layers: one KV cache tensor each
    num_kv_heads: int  # KV heads on this rank (1 where KV heads are replicated across ranks)
    head_dim: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        """Flat tokens of the whole step [T] and their positions [T] -> hidden states [T, H].
        kv_caches[i] is layer i's [2, blocks, block_size, num_kv_heads, head_dim] cache; only
        PagedAttention reads it and attn_metadata."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, H] -> float32 logits [N, vocab] over the real vocabulary,
        gathered across ranks (LogitsProcessor)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadTracker:
        """Load (checkpoint name, full tensor) pairs; every parameter's weight_loader cuts this
        rank's piece. Returns the LoadTracker naming missing, unused and misshaped tensors."""
        ...


def _positional(fn: Any, skip_self: bool = True) -> tuple[list[str], list[str], bool]:
    """(positional parameter names, the required ones among them, takes *args)."""
    params = list(inspect.signature(fn).parameters.values())
    if skip_self and params and params[0].name == "self":
        params = params[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    required = [p.name for p in positional if p.default is inspect.Parameter.empty]
    varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    return [p.name for p in positional], required, varargs


def _check_method(cls: type, name: str, args: tuple[str, ...]) -> None:
    fn = getattr(cls, name, None)
    want = f"{name}({', '.join(args)})"
    if not callable(fn):
        raise ModelContractError(f"{cls.__qualname__} has no {want} method ({GUIDE})")
    try:
        positional, required, varargs = _positional(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): trust it
        return
    if len(required) > len(args) or (len(positional) < len(args) and not varargs):
        got = f"{name}({', '.join(positional)})"
        raise ModelContractError(f"{cls.__qualname__}.{got} does not take the contract's "
                                 f"{want} ({GUIDE})")


def check_model_class(cls: Any) -> None:
    """Raise ModelContractError naming what `cls` lacks to serve as an engine model."""
    if not isinstance(cls, type):
        raise ModelContractError(f"{cls!r} is not a class: register the model class itself")
    if not issubclass(cls, nn.Module):
        raise ModelContractError(f"{cls.__qualname__} is not a torch.nn.Module ({GUIDE})")
    try:
        _, required, _ = _positional(cls.__init__)
    except (TypeError, ValueError):
        required = []
    if len(required) > 2:
        raise ModelContractError(
            f"{cls.__qualname__}.__init__ requires ({', '.join(required)}); the engine builds "
            f"models as {cls.__name__}(hf_config) or {cls.__name__}(hf_config, linear_method)")
    _check_method(cls, "forward", FORWARD_ARGS)
    _check_method(cls, "compute_logits", ("hidden",))
    _check_method(cls, "load_weights", ("weights",))


def check_model_instance(model: nn.Module) -> None:
    """The built model: the attributes the runner reads, its decoder layers in one ModuleList
    (localization and the KV cache count them), and a sharding description on every layer that
    holds parameters (the sharding check reads it)."""
    name = type(model).__qualname__
    for attr in RUNNER_ATTRIBUTES:
        value = getattr(model, attr, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelContractError(
                f"{name}.{attr} is {value!r}: the runner reads {', '.join(RUNNER_ATTRIBUTES)} "
                f"(positive integers) from the model to size the KV cache ({GUIDE})")
    if not any(isinstance(m, nn.ModuleList) and len(m) == model.num_layers
               for m in model.modules()):
        raise ModelContractError(
            f"{name} has no nn.ModuleList of its {model.num_layers} decoder layers: keep them "
            f"in one, under the checkpoint's name (model.layers) ({GUIDE})")
    for mod_name, module in model.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        # a layer without tp_shard_spec cannot be checked at all; one that returns None for a
        # parameter is named by the sharding check itself when the ranks' shapes differ
        if own and not callable(getattr(module, "tp_shard_spec", None)):
            where = mod_name or "the model itself"
            raise ModelContractError(
                f"{name}: {where} ({type(module).__name__}) holds parameters "
                f"{', '.join(own)} but does not describe their sharding (tp_shard_spec): build "
                f"it from engine.layers (ReplicatedLinear for a small replicated matrix) "
                f"({GUIDE})")


def check_load_result(model: nn.Module, result: Any) -> LoadTracker:
    """load_weights must return the LoadTracker that names every missing, unused and
    misshaped tensor (engine.models.weights.load_params returns one)."""
    if not isinstance(result, LoadTracker):
        raise ModelContractError(
            f"{type(model).__qualname__}.load_weights returned {type(result).__name__}, not the "
            f"LoadTracker of engine.checkpoint.report: return load_params(...) ({GUIDE})")
    return result
