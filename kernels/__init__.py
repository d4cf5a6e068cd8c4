"""aphro's hot kernels: each Triton kernel beside the plain-torch reference of the same function.

Every public function here dispatches: Triton on CUDA tensors, the torch reference elsewhere.
Tests compare the two on CPU with TRITON_INTERPRET=1 (the `*_triton` entry points) and on GPUs.

    ops.py                  the dispatching entry points the engine calls
    triton_common.py        shared jit helpers (dot in IEEE float32 for float32, e4m3 rounding)
    attention_ref.py        paged attention and the KV-cache write in torch
    attention_triton.py     the same in Triton: decode_attention.py + prefill_attention.py
    elementwise_ref.py      RMSNorm (+ residual), rotary, SiLU/GELU-and-mul in torch
    elementwise_triton.py   the same in Triton
    quant_ref.py            per-token FP8 quantization, the INT8 weight-only matmul in torch
    quant_triton.py         the same in Triton (the tiled INT8 matmul for larger batches)
    gemv_ref.py             the small-M linear (decode batches up to 16 tokens) in torch
    gemv_triton.py          the same in Triton: bf16 / e4m3 / int8 weights, one pass over them

Note: Hugging Face's kernel-hub package is also imported as `kernels`; the two cannot be installed
in one environment (see README). `__aphro__` lets tests tell ours apart.
"""

__aphro__ = True
