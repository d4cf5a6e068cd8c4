"""What the quantization tests build themselves: FP8 checkpoints in the two layouts (written here
from a tiny full-precision checkpoint with safetensors + an edited config.json), and the
independent reference they are judged by: HF transformers in float32 with the same quantization
simulated ("fake quant": each nn.Linear's weight replaced by its dequantized FP8 / INT8 value,
its input rounded through FP8 per token or with a static scale).

Quantization here is written out in plain torch from the formats' definitions, not taken from
engine/layers/quantization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")


def linear_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names of the checkpoint's decoder linear layers (not the LM head)."""
    return sorted(n.removesuffix(".weight") for n in tensors
                  if n.endswith(".weight") and n.split(".")[-2] in LINEARS)


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-448.0, 448.0).to(FP8)


def per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / 448.0
    return fp8_round(w.float() / scale), scale


def per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0  # [out, 1]
    return fp8_round(w.float() / scale), scale


def calibrate(src: Path, prompts: list[list[int]]) -> dict[str, float]:
    """max |input| of every decoder linear layer over `prompts` (HF float32)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEARS:
            def hook(m, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in prompts:
            hf(torch.tensor([ids]))
    return amax


def write_fp8_checkpoint(src: Path, dst: Path, layout: str, ignore: tuple[str, ...] = (),
                         input_amax: dict[str, float] | None = None) -> dict:
    """Copy the full-precision checkpoint `src` to `dst` with its decoder linear layers in FP8.

    layout "fp8": quant_method "fp8", one weight_scale per tensor (shape []), activation_scheme
    static when `input_amax` is given (input_scale per tensor) else dynamic; `ignore` becomes
    ignored_layers. "ct-channel" / "ct-tensor": compressed-tensors float-quantized, weight
    strategy channel (weight_scale [out, 1]) or tensor ([1]), dynamic per-token inputs; `ignore`
    goes in as given (may hold "re:" patterns; matched here with re.match).
    Returns {"weights": {module: dequantized float32 weight}, "input_scales": {module: s}}."""
    import re

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    dequantized, input_scales = {}, {}
    for prefix in linear_prefixes(tensors):
        if any(re.match(p[3:], prefix) if p.startswith("re:") else p == prefix for p in ignore):
            continue
        w = tensors[f"{prefix}.weight"]
        q, scale = per_channel(w) if layout == "ct-channel" else per_tensor(w)
        tensors[f"{prefix}.weight"] = q
        stored = scale.reshape(1) if layout == "ct-tensor" else scale
        tensors[f"{prefix}.weight_scale"] = stored.contiguous()
        dequantized[prefix] = q.float() * scale
        if input_amax is not None:
            s = torch.tensor(input_amax[prefix] / 448.0)
            tensors[f"{prefix}.input_scale"] = s
            input_scales[prefix] = s.item()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if layout == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static" if input_amax else "dynamic",
            "ignored_layers": list(ignore)}
    else:
        strategy = layout.removeprefix("ct-")
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": list(ignore),
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                            "symmetric": True, "dynamic": False, "group_size": None},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                      "symmetric": True, "dynamic": True}}}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return {"weights": dequantized, "input_scales": input_scales}


def load_time_weights(src: Path, scheme: str) -> dict[str, torch.Tensor]:
    """The dequantized weights --quantization `scheme` should compute with (per channel)."""
    out = {}
    tensors = load_file(str(src / "model.safetensors"))
    for prefix in linear_prefixes(tensors):
        w = tensors[f"{prefix}.weight"].float()
        if scheme == "fp8":
            q, scale = per_channel(w)
            out[prefix] = q.float() * scale
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 127.0
            out[prefix] = torch.round(w / scale).clamp(-127, 127) * scale
    return out


def fake_quant_hf(src: Path, weights: dict[str, torch.Tensor], activations: str,
                  input_scales: dict[str, float] | None = None, fused_groups=()):
    """HF float32 on `src` with `weights` swapped in; inputs of those layers rounded through
    FP8 per token ("dynamic"), with their static scale ("static"; a fused group of layers uses
    the largest of its scales, as one fused layer must), or left alone ("none")."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    scales = dict(input_scales or {})
    for group in fused_groups:
        for layer_prefix in {k.rsplit(".", 1)[0] for k in scales}:
            names = [f"{layer_prefix}.{g}" for g in group if f"{layer_prefix}.{g}" in scales]
            top = max((scales[n] for n in names), default=None)
            for n in names:
                scales[n] = top
    for name, mod in hf.named_modules():
        if name not in weights:
            continue
        mod.weight.data = weights[name].clone()
        if activations == "none":
            continue

        def hook(m, args, name=name):
            x = args[0].float()
            if activations == "static":
                s = torch.tensor(scales[name])
            else:
                s = x.abs().amax(dim=-1, keepdim=True) / 448.0
            return (fp8_round(x / s).float() * s,)

        mod.register_forward_pre_hook(hook)
    return hf


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def engine_logits(ckpt: Path, ids: list[int], device: str = "cpu", **options) -> torch.Tensor:
    """The engine's logits at every position of one prompt [len(ids), vocab] (prefill),
    float32 on the CPU."""
    from engine import LLM, SamplingParams
    from engine.runner.observer import ObserveSpec

    with LLM(str(ckpt), device=device, num_kv_blocks=64, **options) as llm:
        engine = llm.engine
        engine.executor.observe(ObserveSpec(logits=True))
        engine.add_request(None, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                           ids)
        while engine.has_unfinished_requests():
            engine.step()
        seen = engine.executor.take_observations().logits
    rows = sorted(seen.items(), key=lambda kv: kv[0][1])
    return torch.stack([v for _, v in rows])[: len(ids)]


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(a||b)) of two [positions, vocab] logit tables."""
    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item(), kl.mean().item()
