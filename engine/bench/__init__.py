"""Benchmarks: figures, never tests. Each prints the workload, the hardware and the baseline
measured beside it.

    engine_bench.py  offline throughput (beside HF transformers), batch-1 decode latency
    kernels.py       the Triton kernels against copy bandwidth / torch SDPA
    gemv_bench.py    decode-sized linears in a CUDA graph: cuBLAS, the small-M kernel (bf16,
                     fp8, int8), _scaled_mm fp8, the tiled int8 kernel
    quant_bench.py   bf16 vs fp8 vs int8 side by side (TPOT, throughput, weight bytes,
                     parity), and the quantized matmuls beside cuBLAS bf16
    serve_bench.py   a running server under load, as `vllm bench serve` measures it
"""
