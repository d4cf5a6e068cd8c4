"""The decode-sized linears as the decode CUDA graph sees them: for each Llama-3-8B shape at a
few token counts, cuBLAS bf16 (torch.matmul) beside the small-M kernel (kernels/gemv_triton.py)
in bf16, fp8 (per-token quantization inside) and int8, torch._scaled_mm fp8 after the per-token
quantization kernel, and the tiled int8 kernel (kernels/quant_triton.py).

Each variant is captured in a CUDA graph that calls it once per weight copy, over a rotating
set of copies larger than the L2 cache, so every call streams its weight from HBM; the graph is
replayed several times and timed with CUDA events. Rows print microseconds per call and the
weight bytes per second beside the device-to-device copy bandwidth measured in the same
process. On the CPU (Triton's interpreter, tiny shapes) the figures only show that it runs.
Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

# (name, N, K) of Llama-3-8B's decode linears, one GPU
LLAMA_8B_SHAPES = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
                   ("down", 4096, 14336), ("lm_head", 128256, 4096))
TINY_SHAPES = (("tiny", 48, 80),)
ROTATE_BYTES = 256 << 20  # weight copies per variant: comfortably past an H200's 50 MB L2
CALLS_PER_GRAPH = 64
REPLAYS = 10


def graph_us(fns: list[Callable[[], object]], calls: int = CALLS_PER_GRAPH) -> float:
    """Microseconds per call of a CUDA graph calling fns[i % len(fns)] `calls` times, the
    median over REPLAYS replays."""
    for fn in fns:  # compile and warm outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def _cpu_us(fns: list[Callable[[], object]]) -> float:
    fns[0]()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - t0) * 1e6 / len(fns)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written): on CUDA the figure
    every bench prints (engine.bench.hardware, a 1 GiB copy timed alone), on the CPU a 1 MiB
    copy. Not timed in a graph of many calls: that measured 2.8 TB/s where a lone copy makes
    4.2 on an H200, and put the GEMV rows above 1.0 of it."""
    if device.type == "cuda":
        from engine.bench.hardware import copy_bandwidth_gbs

        return copy_bandwidth_gbs(device) * 1e9
    src = torch.empty(1 << 18, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * (1 << 20) / (_cpu_us([lambda: dst.copy_(src)]) * 1e-6)


def _variants(x: torch.Tensor, w: torch.Tensor, fp8: bool) -> dict[str, tuple[Callable, int]]:
    """name -> (the weight tensors, weight bytes, call(*tensors)); the caller clones the
    tensors into its rotating copies."""
    from engine.layers.quantization.fp8 import fp8_matmul, quantize_fp8_per_channel
    from engine.layers.quantization.int8 import quantize_int8_per_channel
    from kernels import gemv_triton, quant_triton

    n, k = w.shape
    w8, s8 = quantize_int8_per_channel(w)
    out = {
        "cublas bf16": ((w,), n * k * 2, lambda w_: torch.matmul(x, w_.t())),
        "gemv bf16": ((w,), n * k * 2, lambda w_: gemv_triton.gemv_triton(x, w_)),
        "gemv int8": ((w8, s8), n * k, lambda w_, s_: gemv_triton.gemv_triton(x, w_, s_)),
        "tiled int8 (old)": ((w8, s8), n * k, lambda w_, s_:
                             quant_triton.int8_weight_matmul_triton(x, w_, s_)),
    }
    if fp8:
        wf, sf = quantize_fp8_per_channel(w)
        out["gemv fp8"] = ((wf, sf), n * k, lambda w_, s_: gemv_triton.gemv_triton(
            x, w_, s_, quantize_input=True))
        out["quant + scaled_mm fp8"] = ((wf, sf), n * k, lambda w_, s_: fp8_matmul(
            *quant_triton.per_token_quant_fp8_triton(x), w_, s_, x.dtype, True))
    return out


def run_gemv_bench(device: str = "cuda", tokens: tuple[int, ...] = (1, 16),
                   shapes: tuple[tuple[str, int, int], ...] | None = None,
                   print_rows: bool = True) -> list[dict]:
    """One row per (shape, token count, variant): us per call, weight TB/s, ratio to the copy
    bandwidth and to cuBLAS bf16 at the same shape."""
    from engine.layers.quantization.fp8 import fp8_supported

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    if not on_gpu:  # before the first import of the Triton modules: they run interpreted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shapes = shapes or (LLAMA_8B_SHAPES if on_gpu else TINY_SHAPES)
    timer = graph_us if on_gpu else _cpu_us
    copy_bw = copy_bandwidth(dev)
    rows = [{"shape": "copy (d2d)", "m": 0, "variant": "read + write", "us": None,
             "tb_s": copy_bw / 1e12, "of_copy": 1.0, "of_cublas": None}]
    fp8 = fp8_supported(dev)
    for name, n, k in shapes:
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            base = None
            for variant, (tensors, nbytes, call) in _variants(x, w, fp8).items():
                copies = max(2, -(-ROTATE_BYTES // nbytes)) if on_gpu else 2
                sets = [tuple(t.clone() for t in tensors) for _ in range(copies)]
                us = timer([lambda s=s, call=call: call(*s) for s in sets])
                del sets
                base = us if variant == "cublas bf16" else base
                tb_s = nbytes / (us * 1e-6) / 1e12
                rows.append({"shape": f"{name} {n}x{k}", "m": m, "variant": variant, "us": us,
                             "tb_s": tb_s, "of_copy": tb_s * 1e12 / copy_bw,
                             "of_cublas": base / us if base else None})
        del w
        if on_gpu:
            torch.cuda.empty_cache()
    if print_rows:
        print_gemv_table(rows, torch.cuda.get_device_name(dev) if on_gpu else "cpu")
    return rows


def print_gemv_table(rows: list[dict], device_name: str) -> None:
    how = ("CUDA graph, weights rotated past L2" if device_name != "cpu"
           else "Triton interpreter, figures meaningless")
    print(f"decode linears on {device_name}: {how}; TB/s of weight bytes")
    print(f"{'shape':22s} {'m':>3s} {'variant':24s} {'us':>9s} {'TB/s':>6s} {'of copy':>8s} "
          f"{'x cuBLAS':>9s}")
    for r in rows:
        us = f"{r['us']:9.2f}" if r["us"] is not None else f"{'-':>9s}"
        vs = f"{r['of_cublas']:9.2f}" if r["of_cublas"] is not None else f"{'-':>9s}"
        print(f"{r['shape']:22s} {r['m']:3d} {r['variant']:24s} {us} {r['tb_s']:6.2f} "
              f"{r['of_copy']:8.2f} {vs}")


if __name__ == "__main__":
    run_gemv_bench("cuda" if torch.cuda.is_available() else "cpu")
