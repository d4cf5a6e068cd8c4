"""The shared blocks every generated model is wired from, driven by an `engine.spec.Arch`.

A generated `engine/models/<family>.py` only subclasses `DecoderOnlyForCausalLM` with its `arch`
constant and `packed_modules`. Modules carry the checkpoint's names (`Arch.checkpoint`), so HF
tensors load under their own names and hooks find the same module paths on both sides. The
numbers (widths, heads, eps, biases, ...) are read from the HF config through `Arch.config`.

    dims.py       Dims (the numbers, from the HF config) and make_norm
    attention.py  Attention
    mlp.py        GatedMLP, PlainMLP, MoEMLP and MLP_KINDS, the spec's choice among them
    decoder.py    DecoderLayer, LearnedPositions, DecoderModel (embeddings, layers, final norm)
    causal_lm.py  DecoderOnlyForCausalLM (the LM head, weight loading) and packed_modules_for
"""

from engine.models.blocks.attention import Attention
from engine.models.blocks.causal_lm import DecoderOnlyForCausalLM, packed_modules_for
from engine.models.blocks.decoder import DecoderLayer, DecoderModel, LearnedPositions
from engine.models.blocks.dims import Dims, make_norm
from engine.models.blocks.mlp import MLP_KINDS, GatedMLP, MoEMLP, PlainMLP

__all__ = [
    "MLP_KINDS",
    "Attention",
    "DecoderLayer",
    "DecoderModel",
    "DecoderOnlyForCausalLM",
    "Dims",
    "GatedMLP",
    "LearnedPositions",
    "MoEMLP",
    "PlainMLP",
    "make_norm",
    "packed_modules_for",
]
