"""Benchmarks: figures, never tests. Each prints the workload, the hardware and the baseline
measured beside it.

    engine_bench.py  offline throughput (beside HF transformers), batch-1 decode latency
    kernels.py       the Triton kernels against copy bandwidth / torch SDPA
    serve_bench.py   a running server under load, as `vllm bench serve` measures it
"""
