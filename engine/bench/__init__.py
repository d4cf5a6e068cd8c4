"""Benchmarks: figures, never tests. Each prints the workload, the hardware and the baseline
measured beside it, and writes one result schema.

    engine_bench.py  offline throughput of the engine, the preset shapes, random / dataset prompts
    hf_baseline.py   HF transformers' generate_batch (continuous batching) and generate, the
                     throughput baselines
    latency.py       decode latency: TTFT and TPOT percentiles at a batch size
    hardware.py      the card: name, memory, copy bandwidth and bf16 matmul rate measured now
    roofline.py      what a model costs per token; the latency and throughput rooflines
    report.py        throughput / latency result records and the lines every run prints
    results.py       the result schema (aphro.bench/1) all benchmarks write, percentiles
    kernels.py       the Triton kernels against copy bandwidth / torch SDPA
    gemv_bench.py    decode-sized linears in a CUDA graph: cuBLAS, the small-M kernel (bf16,
                     fp8, int8), _scaled_mm fp8, the tiled int8 kernel
    quant_bench.py   bf16 vs fp8 vs int8 side by side (TPOT, throughput, weight bytes,
                     parity), and the quantized matmuls beside cuBLAS bf16
    serve_bench.py   a running server under load, as `vllm bench serve` measures it
"""
