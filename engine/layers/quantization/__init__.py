"""Quantization schemes, plugged into every linear layer through its `LinearMethod`
(engine/layers/linear.py): a model gets quantized serving without model code changes, as long as
its constructor takes a `linear_method` and passes it to its linear layers (generated models do).
The scheme is chosen by `--quantization` / `LLM(..., quantization=...)` or read from the
checkpoint's `quantization_config`, once, into `EngineConfig.quantization`.

    base.py                QuantizationConfig (what a scheme provides), UnquantizedConfig,
                           construct_model (build + per-layer exemptions),
                           process_weights_after_loading, channel_amax
    fp8.py                 Fp8Config, Fp8LinearMethod: FP8 e4m3 weights and per-token (or static)
                           activations; decode batches through the small-M kernel
                           (kernels/gemv_triton.py), larger ones through torch._scaled_mm on
                           compute capability >= 8.9; a reference on the CPU; quant_method
                           "fp8" checkpoints
    int8.py                Int8Config, Int8LinearMethod: weight-only per-channel INT8; the
                           small-M kernel for decode batches, the tiled dequantizing matmul
                           (kernels/quant_triton.py) above
    compressed_tensors.py  CompressedTensorsConfig: compressed-tensors float-quantized (FP8)
                           checkpoints, config_groups and ignore
    registry.py            QUANTIZATION_METHODS, resolve_quantization (flag vs checkpoint),
                           supported_schemes(model_cls) for `aphro models`

The KV cache stays in the model dtype under every scheme (KV-cache scales in a checkpoint are
not read).
"""

from engine.layers.quantization.base import (
    QuantizationConfig,
    UnquantizedConfig,
    construct_model,
    process_weights_after_loading,
)
from engine.layers.quantization.registry import (
    QUANTIZATION_METHODS,
    SCHEME_HELP,
    checkpoint_quantization,
    resolve_quantization,
    supported_schemes,
)

__all__ = [
    "QUANTIZATION_METHODS",
    "SCHEME_HELP",
    "QuantizationConfig",
    "UnquantizedConfig",
    "checkpoint_quantization",
    "construct_model",
    "process_weights_after_loading",
    "resolve_quantization",
    "supported_schemes",
]
