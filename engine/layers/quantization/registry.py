"""Which scheme a model runs with: `--quantization NAME` and the checkpoint's own
`quantization_config` (config.json), reconciled once (`resolve_quantization`); and which schemes
a model class can be built with (`supported_schemes`, for `aphro models`)."""

from __future__ import annotations

import torch

from engine.errors import ConfigError
from engine.layers.quantization.base import (
    QuantizationConfig,
    UnquantizedConfig,
    takes_linear_method,
)
from engine.layers.quantization.compressed_tensors import CompressedTensorsConfig
from engine.layers.quantization.fp8 import Fp8Config
from engine.layers.quantization.int8 import Int8Config

# the values of --quantization / LLM(quantization=...)
QUANTIZATION_METHODS = ("fp8", "int8", "compressed-tensors")
# what each does, for help texts and `aphro models`
SCHEME_HELP = {
    "fp8": "FP8 e4m3 weights (per-channel, quantized at load time, or an FP8 checkpoint's) and "
           "per-token activations; torch scaled matmul, GPUs of compute capability >= 8.9",
    "int8": "weight-only INT8, per-channel, quantized at load time; Triton dequantizing matmul",
    "compressed-tensors": "a compressed-tensors float-quantized (FP8) checkpoint",
}
_FROM_CHECKPOINT = {"fp8": Fp8Config.from_checkpoint,
                    "compressed-tensors": CompressedTensorsConfig.from_checkpoint}


def checkpoint_quantization(hf_config) -> QuantizationConfig | None:
    """The scheme config.json's `quantization_config` declares, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    method = qc.get("quant_method")
    if method not in _FROM_CHECKPOINT:
        raise ConfigError(f"config.json quantization_config quant_method={method!r} is not "
                          f"supported: aphro loads {', '.join(map(repr, _FROM_CHECKPOINT))} "
                          "checkpoints, or quantizes a full-precision one with --quantization "
                          "fp8 | int8")
    return _FROM_CHECKPOINT[method](qc)


def resolve_quantization(name: str | None, hf_config,
                         device: torch.device | None = None) -> QuantizationConfig:
    """The scheme to run: the checkpoint's when it has one (`name` may repeat it), else the
    one `name` asks for (quantizing at load time), else none. Checked against `device`."""
    if name is not None and name not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={name!r}: one of {', '.join(QUANTIZATION_METHODS)} "
                          "(or none)")
    own = checkpoint_quantization(hf_config)
    if own is not None and name is not None and name != own.name:
        raise ConfigError(f"quantization={name!r}, but the checkpoint is already quantized "
                          f"({own.name}, config.json quantization_config): drop --quantization "
                          "to load it as it is, or start from a full-precision checkpoint")
    if own is not None:
        quant = own
    elif name == "fp8":
        quant = Fp8Config()
    elif name == "int8":
        quant = Int8Config()
    elif name == "compressed-tensors":
        raise ConfigError("quantization='compressed-tensors' needs a checkpoint saved in that "
                          "format (config.json quantization_config); to quantize this one at "
                          "load time use fp8 or int8")
    else:
        quant = UnquantizedConfig()
    if device is not None:
        quant.check_device(device)
    return quant


def supported_schemes(model_cls: type) -> list[str]:
    """The --quantization values `model_cls` can be built with: all of them when its
    constructor takes a `linear_method` (every generated model does), else none. Linear layers
    are quantized; embeddings, the LM head and fused mixture-of-experts weights stay in the
    model dtype."""
    return list(QUANTIZATION_METHODS) if takes_linear_method(model_cls) else []
