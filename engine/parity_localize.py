"""Where an engine model departs from transformers, and which checkpoint tensors it mishandled.

Localization: forward hooks record the output of the embedding, of every decoder layer and of each
sub-layer inside it (norms, attention, MLP) on both sides for the same prefill. Engine models keep
the HF checkpoint's module names, so one dotted name addresses the same sub-layer on both sides.
The first point whose relative error passes the threshold is named ("layer 0 self_attn").

Our decoder layers return (hidden, residual) with the residual add deferred to the next norm, so a
layer's true output is the sum of its tuple parts; any other module's output is its first part
(a fused norm returns (normed, residual sum); HF attention returns (output, weights)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.loader import LoadTracker

# HF sub-modules that produce no comparable hidden state
_SKIP_PARTS = ("rotary", "dropout", "drop", "act")


@contextlib.contextmanager
def non_strict_loading() -> Iterator[None]:
    """Let every model's load_weights finish on a checkpoint that does not match it, so the
    tracker it returns names every missing, unused and misshaped tensor (normally the first
    check raises CheckpointError). Scoped: the strict check is back on exit."""
    strict = LoadTracker.raise_if_errors
    LoadTracker.raise_if_errors = lambda self, model_name: None
    try:
        yield
    finally:
        LoadTracker.raise_if_errors = strict


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


def _as_tensor(out, sum_parts: bool) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)):
        parts = [p for p in out if torch.is_tensor(p)]
        if not parts:
            return None
        if sum_parts and len(parts) > 1 and all(p.shape == parts[0].shape for p in parts):
            return sum(p.float() for p in parts)
        return parts[0]
    return out if torch.is_tensor(out) else None


class Capture:
    """Forward hooks recording the outputs of `names` (as float32 on the CPU) and the order in
    which they first ran. `layer_names` are summed over their tuple parts."""

    def __init__(self, model: nn.Module, names: list[str], layer_names: set[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n, n in layer_names))
                         for n in names if n in modules]

    def _hook(self, name: str, sum_parts: bool):
        def hook(module, args, out):
            t = _as_tensor(out, sum_parts)
            if t is not None and name not in self.outputs:
                self.outputs[name] = t.detach().float().cpu()
                self.order.append(name)
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


@dataclass
class ProbePoint:
    name: str  # dotted module name, the same on both sides
    label: str  # "layer 0 self_attn"
    max_abs: float | None  # None when the shapes could not be compared
    rel: float | None  # max_abs / max |HF output|
    diverged: bool
    note: str = ""


@dataclass
class Localization:
    num_tokens: int
    threshold: float  # relative error above which a point counts as diverged
    points: list[ProbePoint] = field(default_factory=list)
    first_divergence: str | None = None  # label of the first diverged point
    first_module: str | None = None  # its dotted name
    verdict: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def point_label(name: str, layers: str | None) -> str:
    if layers and name.startswith(f"{layers}."):
        index, _, part = name[len(layers) + 1:].partition(".")
        return f"layer {index} {part}" if part else f"layer {index} output"
    return name


def localize(hf: dict[str, torch.Tensor], hf_order: list[str], ours: dict[str, torch.Tensor],
             num_tokens: int, layers: str | None, threshold: float) -> Localization:
    """Compare the captured outputs point by point, in the order HF ran them."""
    loc = Localization(num_tokens=num_tokens, threshold=threshold)
    for name in hf_order:
        if name not in ours:
            continue
        ref = hf[name].reshape(-1)
        got = ours[name].reshape(-1)
        label = point_label(name, layers)
        if ref.numel() != got.numel() or ref.numel() % num_tokens:
            loc.points.append(ProbePoint(name, label, None, None, False,
                                         f"not comparable: HF {tuple(hf[name].shape)}, "
                                         f"engine {tuple(ours[name].shape)}"))
            continue
        max_abs = (got - ref).abs().max().item()
        rel = max_abs / max(ref.abs().max().item(), 1e-30)
        diverged = not rel <= threshold  # NaN counts as diverged
        loc.points.append(ProbePoint(name, label, max_abs, rel, diverged))
        if diverged and loc.first_divergence is None:
            loc.first_divergence, loc.first_module = label, name
    compared = [p for p in loc.points if p.max_abs is not None]
    if loc.first_divergence is not None:
        loc.verdict = (f"first divergence: {loc.first_divergence} ({loc.first_module}), "
                       f"relative error {_fmt(_point(loc).rel)} > {threshold:g}")
    elif not compared:
        loc.verdict = ("no module could be compared: the engine model does not use the HF "
                       "checkpoint's module names")
    else:
        loc.verdict = (f"hidden states agree at all {len(compared)} points up to "
                       f"{compared[-1].label}: the difference arises after the last one "
                       "(final norm, output head, logit scaling or soft-capping), or in decode "
                       "steps through the KV cache rather than in prefill")
    return loc


def _point(loc: Localization) -> ProbePoint:
    return next(p for p in loc.points if p.name == loc.first_module)


def _fmt(x: float | None) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.2e}"


def load_hints(load: dict) -> list[str]:
    """What a misshaped or missing tensor usually means, in words."""
    hints = []
    kv = [m for m in load.get("misshaped", [])
          if any(k in m["name"] for k in ("k_proj", "v_proj", "qkv", "query_key_value", "c_attn"))]
    if kv:
        m = kv[0]
        hints.append(f"attention projections have another shape ({m['name']}: the model expects "
                     f"{m['expected']}, the checkpoint has {m['got']}): check the number of KV "
                     "heads (num_key_value_heads / multi_query) and head_dim the model reads "
                     "from the config")
    if load.get("missing") and load.get("unexpected"):
        hints.append("tensors are both missing and unused: a checkpoint name is probably mapped "
                     "to the wrong parameter name")
    elif load.get("missing"):
        hints.append("parameters left unloaded keep uninitialised memory: check the model's "
                     "load_weights name mapping and skip list")
    return hints
