"""What every quantization scheme provides (`QuantizationConfig`), the unquantized one, and how
a model is built, exempted layer by layer and finished after loading under a scheme.

A model is built with one `LinearMethod` (the scheme's, threaded through every block); layers a
checkpoint leaves unquantized (`ignored_layers`, `ignore`) then get theirs through
`LinearBase.set_linear_method`, before any tensor is loaded. After loading, every layer's method
runs `process_weights_after_loading` (quantizing at load time happens there).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from engine.distributed.parallel_state import get_tp_size, tp_all_reduce_max
from engine.errors import ConfigError
from engine.layers.linear import LinearBase, LinearMethod, UnquantizedLinearMethod


@dataclass(frozen=True)
class QuantizationConfig:
    """One scheme's settings, resolved once (engine.config.EngineConfig.quantization) and sent
    to every tensor-parallel worker; picklable."""

    name: ClassVar[str] = "none"

    def linear_method(self) -> LinearMethod:
        """The method the model's linear layers are built with."""
        raise NotImplementedError

    def method_for(self, names: list[str], default: LinearMethod) -> LinearMethod:
        """The method of the layer holding checkpoint modules `names` (several for a fused
        layer: q_proj, k_proj, v_proj); `default` is the one it was built with."""
        return default

    def check_device(self, device: torch.device) -> None:
        """Raise ConfigError when the scheme cannot run on `device`."""

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                           ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as the model should see them (a scheme may drop tensors
        the engine has no use for)."""
        return weights

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class UnquantizedConfig(QuantizationConfig):
    """Weights in the model dtype."""

    name: ClassVar[str] = "none"

    def linear_method(self) -> LinearMethod:
        return UnquantizedLinearMethod()


def takes_linear_method(model_cls: type) -> bool:
    """Whether `model_cls(hf_config, linear_method=...)` is accepted."""
    try:
        params = inspect.signature(model_cls).parameters
    except (TypeError, ValueError):
        return False
    return "linear_method" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def construct_model(model_cls: type, hf_config, quant: QuantizationConfig) -> nn.Module:
    """model_cls(hf_config, linear_method=the scheme's), with the layers the scheme exempts
    switched to their own method. A class that takes no linear_method is built plainly, and
    only without quantization."""
    if not takes_linear_method(model_cls):
        if quant.name != UnquantizedConfig.name:
            raise ConfigError(
                f"{model_cls.__name__} cannot be quantized ({quant.describe()}): its constructor "
                "takes no linear_method. Add a `linear_method=None` argument and pass it to its "
                "linear layers (engine/models/blocks do), or run it unquantized")
        return model_cls(hf_config)
    method = quant.linear_method()
    model = model_cls(hf_config, linear_method=method)
    packed = getattr(model, "packed_modules", None) or getattr(
        model, "packed_modules_mapping", None) or {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            chosen = quant.method_for(checkpoint_names(name, packed), module.linear_method)
            if chosen is not module.linear_method:
                module.set_linear_method(chosen)
    return model


def checkpoint_names(module_name: str, packed: dict[str, tuple[str, int | str]]) -> list[str]:
    """The checkpoint modules a layer holds: itself, or the pieces fused into it
    (model.layers.0.self_attn.qkv_proj -> ...q_proj, ...k_proj, ...v_proj)."""
    prefix, _, last = module_name.rpartition(".")
    pieces = [piece for piece, (fused, _) in packed.items() if fused == last]
    if not pieces:
        return [module_name]
    return [f"{prefix}.{piece}" if prefix else piece for piece in pieces]


def process_weights_after_loading(model: nn.Module) -> None:
    """Every linear layer's method finishes its weights, in module order (the same on every
    rank: a method may reduce across ranks)."""
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.linear_method.process_weights_after_loading(module)
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()  # the model-dtype weights just replaced


def matches(name: str, patterns: Iterable[str]) -> bool:
    """`name` equals one of `patterns`, or matches one written "re:REGEX" (re.match)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name:
            return True
    return False


def all_or_none(names: list[str], flags: list[bool], what: str) -> bool:
    """A fused layer is quantized as one: its pieces must agree."""
    if all(flags):
        return True
    if any(flags):
        on = [n for n, f in zip(names, flags) if f]
        off = [n for n, f in zip(names, flags) if not f]
        raise ConfigError(f"{what} names {', '.join(on)} but not {', '.join(off)}; they are one "
                          "fused layer here and must be quantized alike")
    return False


def channel_amax(layer: LinearBase, weight: torch.Tensor) -> torch.Tensor:
    """max |weight| of every output row [out] float32, over the whole input dimension: a
    row-parallel layer's ranks each hold a slice of it, so they take the maximum together,
    and every rank gets the scale the unsharded layer would."""
    amax = weight.detach().abs().amax(dim=1).float()  # [out]
    if layer.splits_input and get_tp_size() > 1:
        tp_all_reduce_max(amax)
    return amax


def drop_named(weights: Iterable[tuple[str, torch.Tensor]], suffixes: tuple[str, ...]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors whose names end in none of `suffixes`."""
    for name, tensor in weights:
        if not name.endswith(suffixes):
            yield name, tensor
