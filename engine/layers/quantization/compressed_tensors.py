"""Checkpoints saved by llm-compressor in the compressed-tensors `float-quantized` format (FP8).

config.json's `quantization_config`:

    {"quant_method": "compressed-tensors", "format": "float-quantized",
     "config_groups": {"group_0": {"targets": ["Linear"],
         "weights": {"num_bits": 8, "type": "float", "strategy": "channel" | "tensor", ...},
         "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                               "dynamic": true}}},
     "ignore": ["lm_head", "re:.*mlp.gate$"]}

Each group's weights are FP8 with a `weight_scale` per output channel ([out, 1]) or per tensor;
its input activations are quantized per token on the fly (or, `strategy: "tensor"` with
`dynamic: false`, with a static `input_scale`). A layer takes the group whose `targets` name it
("Linear" names every linear layer, "re:REGEX" a pattern); layers in `ignore`, or in no group,
stay in the model dtype. The FP8 math is engine/layers/quantization/fp8.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.errors import ConfigError
from engine.layers.linear import LinearMethod, UnquantizedLinearMethod
from engine.layers.quantization.base import QuantizationConfig, all_or_none, drop_named, matches
from engine.layers.quantization.fp8 import KV_SCALE_SUFFIXES, Fp8LinearMethod, check_fp8_device

SUPPORTED = "FP8 weights (strategy tensor or channel) with FP8 input activations (dynamic per " \
            "token, or static per tensor)"


@dataclass(frozen=True)
class Group:
    name: str
    targets: tuple[str, ...]
    weight_strategy: str  # "tensor" | "channel"
    activation_scheme: str  # "dynamic" (per token) | "static" (per tensor)

    def method(self) -> Fp8LinearMethod:
        return Fp8LinearMethod(True, self.weight_strategy, self.activation_scheme)


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(f"quantization_config {where}: {problem}; aphro loads compressed-tensors "
                       f"checkpoints of {SUPPORTED}")


def _check_float8(args: dict, where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise _fail(where, f"num_bits={args.get('num_bits')!r} type={args.get('type')!r}, "
                           "expected 8 and 'float'")
    if args.get("symmetric") is False:
        raise _fail(where, "symmetric=false")
    if args.get("group_size") or args.get("block_structure"):
        raise _fail(where, "group or block quantization")


def _parse_group(name: str, group: dict, fmt: str | None) -> Group:
    where = f"config_groups.{name}"
    fmt = group.get("format") or fmt
    if fmt != "float-quantized":
        raise _fail(f"{where} format", f"{fmt!r}")
    targets = group.get("targets")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _fail(f"{where}.targets", f"{targets!r}, expected a list of names")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _fail(f"{where}.weights", "missing")
    _check_float8(weights, f"{where}.weights")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel") or weights.get("dynamic"):
        raise _fail(f"{where}.weights.strategy", f"{strategy!r} (dynamic={weights.get('dynamic')})")
    act = group.get("input_activations")
    if not isinstance(act, dict):
        raise _fail(f"{where}.input_activations", "missing (FP8 weight-only is not supported)")
    _check_float8(act, f"{where}.input_activations")
    if act.get("dynamic") is True and act.get("strategy") == "token":
        scheme = "dynamic"
    elif act.get("dynamic") is False and act.get("strategy") == "tensor":
        scheme = "static"
    else:
        raise _fail(f"{where}.input_activations", f"strategy={act.get('strategy')!r} "
                                                   f"dynamic={act.get('dynamic')!r}")
    if group.get("output_activations"):
        raise _fail(f"{where}.output_activations", "set")
    return Group(name, tuple(targets), strategy, scheme)


@dataclass(frozen=True)
class CompressedTensorsConfig(QuantizationConfig):
    name: ClassVar[str] = "compressed-tensors"
    groups: tuple[Group, ...] = ()
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_checkpoint(cls, qc: dict) -> CompressedTensorsConfig:
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise _fail("config_groups", "missing or empty")
        parsed = tuple(_parse_group(name, g, qc.get("format")) for name, g in groups.items()
                       if isinstance(g, dict))
        return cls(groups=parsed, ignore=tuple(qc.get("ignore") or ()))

    def _group_of(self, name: str) -> Group | None:
        """The group naming `name` exactly, else by a pattern, else by "Linear"."""
        for kind in ("name", "regex", "class"):
            for group in self.groups:
                targets = {"name": [t for t in group.targets if not t.startswith("re:")],
                           "regex": [t for t in group.targets if t.startswith("re:")],
                           "class": []}[kind]
                if (kind == "class" and "Linear" in group.targets) or matches(name, targets):
                    return group
        return None

    def linear_method(self) -> LinearMethod:
        group = next((g for g in self.groups if "Linear" in g.targets), None)
        return group.method() if group is not None else UnquantizedLinearMethod()

    def method_for(self, names: list[str], default: LinearMethod) -> LinearMethod:
        unquantized = (default if isinstance(default, UnquantizedLinearMethod)
                       else UnquantizedLinearMethod())
        if all_or_none(names, [matches(n, self.ignore) for n in names],
                       "quantization_config ignore"):
            return unquantized
        groups = {self._group_of(n) for n in names}
        if len(groups) > 1:
            raise ConfigError(f"quantization_config puts {', '.join(names)} in different "
                              "config_groups; they are one fused layer here and must be "
                              "quantized alike")
        group = groups.pop()
        if group is None:
            return unquantized
        if (isinstance(default, Fp8LinearMethod)
                and (default.weight_strategy, default.activation_scheme)
                == (group.weight_strategy, group.activation_scheme)):
            return default
        return group.method()

    def check_device(self, device: torch.device) -> None:
        check_fp8_device(device)

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        return drop_named(weights, KV_SCALE_SUFFIXES)

    def describe(self) -> str:
        kinds = sorted({f"{g.weight_strategy} weights, {g.activation_scheme} activations"
                        for g in self.groups})
        return f"compressed-tensors fp8 ({'; '.join(kinds)})"
