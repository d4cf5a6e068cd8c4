"""The model runner's one observer hook: what validation (parity, localization, the sharding
check) may see of a run without touching the engine's objects.

`ObserveSpec` (picklable, so a tensor-parallel driver can send it to rank 0) asks for
- logits: every logits row the step computed (sampled rows and prompt-logprob rows), keyed by
  (seq_id, position), as float32 on the CPU;
- probe: the outputs of the localization points (`probe_names`: embeddings, every decoder layer
  and its sub-layers, the final norm) and the input stream of each decoder layer, for the first
  forward they run in (`Capture`); steps run eagerly while it is set;
- trace_errors: on an exception in a forward, the innermost module running (`ModuleTracer`),
  set as the exception's `failed_module`.

`Capture` and `ModuleTracer` work on any nn.Module: localization hooks the HF model with them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# HF sub-modules that produce no comparable hidden state
_SKIP_PARTS = ("rotary", "drop", "act")


def layer_list_name(model: nn.Module, num_layers: int | None) -> str | None:
    """Dotted name of the decoder layers' ModuleList ("model.layers", "transformer.h")."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if num_layers is not None and len(module) == num_layers:
                return name
            if best is None or len(module) > best[0]:
                best = (len(module), name)
    return best[1] if best else None


def probe_names(hf_model: nn.Module, layers: str) -> list[str]:
    """Candidate points on the HF side: the base model's children (embeddings, final norm),
    every decoder layer and the direct children of each."""
    base = layers.rpartition(".")[0]
    modules = dict(hf_model.named_modules())
    names = []
    prefix = f"{base}." if base else ""
    for child, _ in modules[base].named_children():
        if f"{prefix}{child}" != layers:
            names.append(f"{prefix}{child}")
    for i, _ in enumerate(modules[layers]):
        names.append(f"{layers}.{i}")
        names += [f"{layers}.{i}.{c}" for c, _ in modules[f"{layers}.{i}"].named_children()]
    return [n for n in names if not any(s in n.rpartition(".")[2].lower() for s in _SKIP_PARTS)]


@dataclass(frozen=True)
class ObserveSpec:
    logits: bool = False
    probe: bool = False  # capture probe_names(model) (the localization points), else nothing
    trace_errors: bool = False


@dataclass
class Observations:
    """What an ObserveSpec collected since it was set (ModelRunner.take_observations)."""

    logits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # probe: name -> output
    order: list[str] = field(default_factory=list)  # probe names in the order they first ran
    layers: str | None = None  # dotted name of the decoder layers' ModuleList


def _as_tensor(out, sum_parts: bool) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)):
        parts = [p for p in out if torch.is_tensor(p)]
        if not parts:
            return None
        if sum_parts and len(parts) > 1 and all(p.shape == parts[0].shape for p in parts):
            return sum(p.float() for p in parts)
        return parts[0]
    return out if torch.is_tensor(out) else None


def _stream_input(args: tuple, kwargs: dict, sum_parts: bool) -> torch.Tensor | None:
    """A decoder layer's input residual stream: its first floating-point tensor argument (HF:
    hidden_states); for ours plus the deferred residual beside it (the same shape)."""
    floats = [a for a in (*args, kwargs.get("hidden_states")) if torch.is_tensor(a)
              and a.is_floating_point()]
    if not floats:
        return None
    same = [a for a in floats if a.shape == floats[0].shape] if sum_parts else floats[:1]
    return sum(a.float() for a in same)


class Capture:
    """Forward hooks recording, as float32 on the CPU, the outputs of `names` in the order they
    first ran, and the input stream of every decoder layer under "<layer>:in". `ours`: engine
    layers return (update, residual) and take (positions, hidden, residual, ...)."""

    def __init__(self, model: nn.Module, names: list[str], layers: str | None,
                 ours: bool) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        modules = dict(model.named_modules())
        layer_names = {n for n in names if layers and n.rpartition(".")[0] == layers}
        self._handles = []
        for n in names:
            if n not in modules:
                continue
            self._handles.append(modules[n].register_forward_hook(
                self._output_hook(n, ours and n in layer_names)))
            if n in layer_names:
                self._handles.append(modules[n].register_forward_pre_hook(
                    self._input_hook(f"{n}:in", ours), with_kwargs=True))

    def _keep(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None and name not in self.outputs:
            # a copy: HF may add to a module's output in place afterwards (Falcon's MLP)
            self.outputs[name] = t.detach().to("cpu", torch.float32, copy=True)
            self.order.append(name)

    def _output_hook(self, name: str, sum_parts: bool):
        def hook(module, args, out):
            self._keep(name, _as_tensor(out, sum_parts))
        return hook

    def _input_hook(self, name: str, sum_parts: bool):
        def hook(module, args, kwargs):
            self._keep(name, _stream_input(args, kwargs, sum_parts))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModuleTracer:
    """Remembers the innermost module running when a forward raises, to name it in the error."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def pre_hook(module, args):
            if not self.stack or name == "":
                self.stack.clear()
            self.stack.append(name or type(module).__name__)
        return pre_hook

    def _leave(self, module, args, out):
        if self.stack:
            self.stack.pop()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.stack:
            self.failed_in = self.stack[-1]
        for h in self._handles:
            h.remove()
