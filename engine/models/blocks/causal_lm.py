"""`DecoderOnlyForCausalLM`, the class every generated model subclasses: the decoder stack under
the checkpoint's module names, the LM head, and the checkpoint -> module mapping its weights load
through (`packed_modules_for`, renames, transposes, de-interleaved qkv, per-expert weights)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from engine.checkpoint.report import LoadTracker
from engine.layers.attention_metadata import AttentionMetadata
from engine.layers.linear import LinearMethod
from engine.layers.logits import LogitsProcessor
from engine.layers.moe import FusedMoE
from engine.layers.vocab_embedding import ParallelLMHead
from engine.models.blocks.decoder import DecoderModel
from engine.models.blocks.dims import Dims
from engine.models.weights import load_params
from engine.spec import Arch


def packed_modules_for(arch: Arch) -> dict[str, tuple[str, int | str]]:
    """Checkpoint piece -> (our fused module, shard id), for separate q/k/v and gate/up."""
    names, packed = arch.checkpoint, {}
    if names.qkv_layout == "separate":
        packed.update(zip(names.qkv, (("qkv_proj", s) for s in "qkv")))
    gated = arch.mlp.kind == "gated" or arch.config.shared_expert_intermediate_size is not None
    if gated and isinstance(names.gate_up, tuple):
        packed.update(zip(names.gate_up, (("gate_up_proj", 0), ("gate_up_proj", 1))))
    return packed


def _attach(parent: nn.Module, dotted: str, module: nn.Module) -> None:
    """parent.<a>.<b> = module, creating empty containers for the outer names."""
    *outer, last = dotted.split(".")
    for name in outer:
        if not hasattr(parent, name):
            parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    parent.add_module(last, module)


class DecoderOnlyForCausalLM(nn.Module):
    """A decoder-only causal LM described by `arch`. Subclasses set `arch` and `packed_modules`
    (engine/models/<family>.py, generated from model_specs/<family>.toml)."""

    arch: ClassVar[Arch]
    packed_modules: ClassVar[dict[str, tuple[str, int | str]]] = {}

    def __init__(self, config, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        arch, names = self.arch, self.arch.checkpoint
        self.config = config
        self.dims = dims = Dims.from_hf(config, arch)
        model = DecoderModel(arch, dims, linear_method)
        _attach(self, names.model, model)
        head = ParallelLMHead(dims.vocab_size, dims.hidden_size, bias=dims.lm_head_bias)
        self.add_module(names.lm_head, head)
        self.tie_word_embeddings = dims.tie_word_embeddings
        if self.tie_word_embeddings:
            head.weight = model.parts.embed.weight
        self.parts = SimpleNamespace(model=model, lm_head=head)
        self.logits_processor = LogitsProcessor(
            dims.vocab_size, dims.logit_scale, dims.final_soft_cap
        )
        self.lm_head_weight_name = f"{names.lm_head}.weight"
        self.embed_weight_name = f"{names.model}.{names.embed_tokens}.weight"
        # the KV cache contract: layers, this rank's KV heads, head size
        self.num_layers = dims.num_layers
        self.num_kv_heads = model.parts.layers[0].parts.attn.attn.num_kv_heads
        self.head_dim = dims.head_dim
        self._expert_re = None
        if arch.mlp.kind == "moe":
            n, esc = names, re.escape
            which = "|".join(esc(w) for w in (n.expert_gate, n.expert_up, n.expert_down))
            self._expert_re = re.compile(
                rf"^(.*\.{esc(n.mlp)}\.{esc(n.experts)})\.(\d+)\.({which})\.weight$"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.parts.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.parts.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadTracker:
        shards = {
            f"{name}.{param}": ids
            for name, module in self.named_modules()
            if isinstance(module, FusedMoE)
            for param, ids in module.expected_shards().items()
        }
        return load_params(
            self,
            weights,
            self.packed_modules,
            skip=self.arch.checkpoint.ignore,
            transform=self.checkpoint_transform,
            shards=shards,
        )

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> tuple | None:
        """One checkpoint tensor -> (our name, tensor[, shard id]): renames, Conv1D transposes,
        per-head interleaved qkv -> [q; k; v], per-expert MoE weights."""
        names = self.arch.checkpoint
        for src, dst in (names.rename or {}).items():
            if f".{src}." in f".{name}":
                name = f".{name}".replace(f".{src}.", f".{dst}.", 1)[1:]
        if tensor.dim() == 2 and any(f".{m}.weight" in f".{name}" for m in names.transpose):
            tensor = tensor.t()
        if names.qkv_layout == "interleaved" and f".{names.attention}.{names.qkv}." in name:
            tensor = _deinterleave_qkv(tensor, self.dims.num_heads)
        if self._expert_re is not None:
            m = self._expert_re.match(name)
            if m is not None:
                prefix, expert, which = m.groups()
                canonical = {
                    names.expert_gate: "w1",
                    names.expert_up: "w3",
                    names.expert_down: "w2",
                }[which]
                param = "w2_weight" if canonical == "w2" else "w13_weight"
                return f"{prefix}.{param}", tensor, (int(expert), canonical)
        return name, tensor


def _deinterleave_qkv(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[heads * (q, k, v) * head_dim, ...] (per-head interleaved) -> [q; k; v]. A tensor of the
    wrong size is passed on unchanged for the loader to report."""
    if tensor.shape[0] % (3 * num_heads):
        return tensor
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(tensor.shape)
