"""Random weights, made in one place for every use: tiny test checkpoints (on an HF model before
it is saved), `load_format="dummy"` (on the engine's model, on its device) and the benchmarks'
large shapes.

Every parameter is drawn, so a model that drops a bias or a norm weight cannot agree with
transformers by accident: matrices N(0, 1/fan_in) (the output head 2x, so logits are not near
uniform), norm weights 1 +- 0.1 and norm biases +- 0.1, other biases N(0, 0.1). Deterministic for
a seed and a device.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _output_head(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_output_embeddings"):  # transformers models
        return model.get_output_embeddings()
    return getattr(model, "lm_head", None)


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter of `model` in place (tied parameters once)."""
    head_weight = getattr(_output_head(model), "weight", None)
    generators: dict[torch.device, torch.Generator] = {}
    done: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done:
                continue
            done.add(id(param))
            dev = param.device
            gen = generators.get(dev)
            if gen is None:
                gen = generators[dev] = torch.Generator(dev).manual_seed(seed)
            noise = torch.randn(param.shape, generator=gen, device=dev)
            if _is_norm(module):
                sample = (1.0 if name == "weight" else 0.0) + 0.1 * noise
            elif param.dim() == 1:
                sample = 0.1 * noise
            else:
                gain = 2.0 if param is head_weight else 1.0
                sample = noise.mul_(gain / math.sqrt(param.shape[-1]))
            param.copy_(sample.to(param.dtype))
