"""Where an engine model departs from transformers, and which checkpoint tensors it mishandled.

Localization: forward hooks on both sides record, for one prefill of the same tokens, the input
of decoder layer 0 (the embeddings), the output of every sub-layer (norms, attention, MLP) and of
every layer, and what follows the layers (the final norm). Engine models keep the HF checkpoint's
module names, so one dotted name addresses the same module on both sides. `localize` goes stage
by stage and, inside the first layer that diverges, names its first diverging sub-layer.

Our decoder layers take (positions, hidden, residual, ...) and return (update, residual) with the
residual add deferred to the next norm, so a layer's true input and output are the sums of those
parts; any other module's output is its first part (a fused norm returns (normed, residual sum);
HF attention returns (output, weights)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from engine.runner.observer import Capture, layer_list_name, probe_names  # noqa: F401


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


def point_label(name: str, layers: str | None) -> str:
    if layers and name == f"{layers}.0:in":
        return "embeddings (input of layer 0)"
    if layers and name.startswith(f"{layers}."):
        index, _, part = name[len(layers) + 1:].partition(".")
        return f"layer {index} {part}" if part else f"layer {index} output"
    return name


def localize(hf: Capture, ours: Capture, layers: str, num_tokens: int,
             threshold: float) -> Localization:
    """Compare the captured points in the order HF ran them. The embeddings (layer 0's input)
    and each layer's output decide which stage diverges first; inside that layer its first
    diverging sub-layer is named. A sub-layer also agrees when HF's module adds the layer's
    input stream itself (Bloom's attention does); sub-layers of an agreeing layer never count,
    since families split a layer into modules differently."""
    loc = Localization(num_tokens=num_tokens, threshold=threshold)
    layer_of = {}  # point name -> its layer's name
    in_layers = [i for i, n in enumerate(hf.order) if _layer(n, layers) is not None]
    # what runs before layer 0 (token / position embeddings) is judged by layer 0's input
    after = hf.order[in_layers[0]:] if in_layers else []
    for name in [f"{layers}.0:in"] + [n for n in after if not n.endswith(":in")]:
        if name not in ours.outputs or name not in hf.outputs:
            continue
        layer = _layer(name, layers)
        point = _compare(name, hf.outputs[name], ours.outputs[name], num_tokens, threshold,
                         point_label(name, layers))
        if layer is not None and name != layer and point.diverged:
            stream = ours.outputs.get(f"{layer}:in")  # HF's module may include the residual
            if stream is not None and stream.numel() == ours.outputs[name].numel():
                alt = _compare(name, hf.outputs[name], ours.outputs[name] + stream.view_as(
                    ours.outputs[name]), num_tokens, threshold, point.label)
                if not alt.diverged:
                    point = replace(alt, note="HF's module output includes the residual")
        layer_of[name] = layer
        loc.points.append(point)
    agreeing = {p.name for p in loc.points if p.name in layer_of.values() and not p.diverged}
    loc.points = [replace(p, diverged=False, note="differs, but the layer's output agrees")
                  if p.diverged and layer_of.get(p.name) in agreeing and not _stage(p, layer_of)
                  else p for p in loc.points]
    first = _first_divergence(loc.points, layer_of)
    compared = [p for p in loc.points if p.max_abs is not None]
    if first is not None:
        loc.first_divergence, loc.first_module = first.label, first.name.removesuffix(":in")
        loc.verdict = (f"first divergence: {first.label} ({loc.first_module}), relative error "
                       f"{_fmt(first.rel)} > {threshold:g}")
    elif not compared:
        loc.verdict = ("no module could be compared: the engine model does not use the HF "
                       "checkpoint's module names")
    else:
        loc.verdict = (f"hidden states agree at all {len(compared)} points up to "
                       f"{compared[-1].label}: the difference arises after the last one "
                       "(final norm, output head, logit scaling or soft-capping), or in decode "
                       "steps through the KV cache rather than in prefill")
    return loc


def _layer(name: str, layers: str) -> str | None:
    if not name.startswith(f"{layers}."):
        return None
    index = name[len(layers) + 1:].split(".")[0].removesuffix(":in")
    return f"{layers}.{index}"


def _compare(name: str, ref: torch.Tensor, got: torch.Tensor, num_tokens: int,
             threshold: float, label: str) -> ProbePoint:
    if ref.numel() != got.numel() or ref.numel() % num_tokens:
        return ProbePoint(name, label, None, None, False, f"not comparable: HF "
                          f"{tuple(ref.shape)}, engine {tuple(got.shape)}")
    max_abs = (got.reshape(-1) - ref.reshape(-1)).abs().max().item()
    rel = max_abs / max(ref.abs().max().item(), 1e-30)
    return ProbePoint(name, label, max_abs, rel, not rel <= threshold)  # NaN: diverged


def _stage(p: ProbePoint, layer_of: dict) -> bool:
    """A stage point (embeddings, a layer's output, what follows the layers), not a sub-layer."""
    layer = layer_of.get(p.name)
    return layer is None or p.name == layer or p.name.endswith(":in")


def _first_divergence(points: list[ProbePoint], layer_of: dict) -> ProbePoint | None:
    """Stage by stage: embeddings, then layer outputs (and what follows the layers); in the
    first diverging layer, its first diverging sub-layer, else the layer output itself."""
    for p in points:
        if not (_stage(p, layer_of) and p.diverged):
            continue
        layer = layer_of.get(p.name)
        if p.name != layer:
            return p
        inside = [q for q in points if layer_of.get(q.name) == layer and not _stage(q, layer_of)]
        return next((q for q in inside if q.diverged), p)
    return None


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


def load_summary(load: dict, limit: int = 3) -> str:
    """The load report's problems in one line: misshaped first, naming each tensor."""
    parts = [f"misshaped {m['name']} (model expects {m['expected']}, checkpoint has "
             f"{m['got']})" for m in load.get("misshaped", [])]
    parts += [f"missing {n}" for n in load.get("missing", [])]
    parts += [f"unused {n}" for n in load.get("unexpected", [])]
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
