"""The MLP blocks a spec chooses among (`MLP_KINDS`): gated, plain, and mixture of experts
(optionally with a shared expert beside the routed ones)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from engine.layers.activation import get_act_fn, get_gated_act
from engine.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from engine.layers.moe import FusedMoE
from engine.models.blocks.dims import Dims
from engine.spec import Arch


class GatedMLP(nn.Module):
    """down(act(gate) * up), gate and up in one column-parallel matmul (SwiGLU, GeGLU); of
    width `intermediate_size` (default: the config's)."""

    def __init__(
        self,
        arch: Arch,
        dims: Dims,
        linear_method: LinearMethod | None,
        intermediate_size: int | None = None,
    ) -> None:
        super().__init__()
        names, h = arch.checkpoint, dims.hidden_size
        i = intermediate_size or dims.intermediate_size
        gate_up = MergedColumnParallelLinear(
            h, [i, i], bias=dims.mlp_bias, linear_method=linear_method
        )
        down = RowParallelLinear(i, h, bias=dims.mlp_bias, linear_method=linear_method)
        self.add_module(
            "gate_up_proj" if isinstance(names.gate_up, tuple) else names.gate_up, gate_up
        )
        self.add_module(names.down, down)
        self.parts = SimpleNamespace(gate_up=gate_up, down=down)
        self.act_fn = get_gated_act(dims.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.down(self.act_fn(self.parts.gate_up(x)))


class PlainMLP(nn.Module):
    """fc_out(act(fc_in(x))) (GELU, ReLU, ...)."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, h, i = arch.checkpoint, dims.hidden_size, dims.intermediate_size
        fc_in = ColumnParallelLinear(h, i, bias=dims.mlp_bias, linear_method=linear_method)
        fc_out = RowParallelLinear(i, h, bias=dims.mlp_bias, linear_method=linear_method)
        self.add_module(names.fc_in, fc_in)
        self.add_module(names.fc_out, fc_out)
        self.parts = SimpleNamespace(fc_in=fc_in, fc_out=fc_out)
        self.act_fn = get_act_fn(dims.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.fc_out(self.act_fn(self.parts.fc_in(x)))


class MoEMLP(nn.Module):
    """Router (replicated linear) + fused experts, top-k softmax routing (Mixtral); plus a
    shared expert every token goes through, optionally scaled by sigmoid(gate(x)) (Qwen2-MoE)."""

    def __init__(self, arch: Arch, dims: Dims, linear_method: LinearMethod | None) -> None:
        super().__init__()
        names, d = arch.checkpoint, dims
        # the router stays in the model dtype under any quantization: a near-tie between
        # experts is a discrete flip (as vLLM keeps it)
        router = ReplicatedLinear(d.hidden_size, d.num_experts, bias=False)
        experts = FusedMoE(
            d.num_experts,
            d.experts_per_token,
            d.hidden_size,
            d.intermediate_size,
            d.activation,
            arch.mlp.renormalize,
        )
        self.add_module(names.router, router)
        self.add_module(names.experts, experts)
        shared = shared_gate = None
        if d.shared_expert_intermediate_size:
            shared = GatedMLP(arch, d, linear_method, d.shared_expert_intermediate_size)
            self.add_module(names.shared_expert, shared)
        if arch.mlp.shared_gate == "sigmoid":
            shared_gate = ReplicatedLinear(
                d.hidden_size, 1, bias=False, linear_method=linear_method
            )
            self.add_module(names.shared_expert_gate, shared_gate)
        self.parts = SimpleNamespace(
            router=router, experts=experts, shared=shared, shared_gate=shared_gate
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts
        out = p.experts(x, p.router(x))  # [T, hidden]
        if p.shared is not None:
            shared = p.shared(x)
            if p.shared_gate is not None:
                shared = torch.sigmoid(p.shared_gate(x)) * shared  # gate [T, 1]
            out = out + shared
        return out


MLP_KINDS: dict[str, type[nn.Module]] = {"gated": GatedMLP, "plain": PlainMLP, "moe": MoEMLP}
