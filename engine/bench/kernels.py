"""Microbenchmarks of the Triton kernels, each against a baseline measured in the same process.

Memory-bound kernels report GB/s (bytes each input read once + each output written once) and
their ratio to the device-to-device copy bandwidth (bytes read + written of a large copy);
prefill attention reports TFLOP/s and its ratio to torch SDPA's flash backend on contiguous
keys/values of the same shape. On the CPU (Triton interpreter, tiny shapes) the figures only show
that everything runs; they mean something on a GPU.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

_TRITON_MODULES = ("kernels.triton_common", "kernels.decode_attention",
                   "kernels.prefill_attention", "kernels.attention_triton",
                   "kernels.elementwise_triton")


def _load_kernels(interpret: bool) -> dict:
    """Import the Triton modules; on the CPU under the interpreter, (re)importing them after
    TRITON_INTERPRET=1 is set, since Triton decides interpretation when a kernel is defined."""
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        for name in _TRITON_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return {name.split(".")[-1]: importlib.import_module(name) for name in _TRITON_MODULES}


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def _row(kernel: str, shape: str, ms: float, work: float, unit: str, base: float | None,
         baseline: str, **extra) -> dict:
    value = work / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
    row = {"kernel": kernel, "shape": shape, "ms": ms, "value": value, "unit": unit,
           "ratio": (value / base) if base else None, "baseline": baseline}
    row.update(extra)
    return row


def _paged_cache(num_seqs: int, ctx: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: str):
    per_seq = -(-ctx // block_size)
    shape = (num_seqs * per_seq, block_size, kv_heads, head_dim)
    kc = torch.randn(shape, dtype=dtype, device=device)
    vc = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(num_seqs * per_seq, device=device).view(num_seqs, per_seq).int()
    return kc, vc, tables


def run_kernel_bench(device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                     print_rows: bool = True) -> list[dict]:
    """Time every Triton kernel; print one line each and return them as dicts."""
    on_gpu = device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("run_kernel_bench(device='cuda') needs a CUDA GPU; pass device='cpu'")
    mods = _load_kernels(interpret=not on_gpu)
    dec, pre = mods["decode_attention"], mods["prefill_attention"]
    att, ew = mods["attention_triton"], mods["elementwise_triton"]
    bench = _timer(device)
    esize = torch.finfo(dtype).bits // 8
    rows: list[dict] = []

    # the ceilings: device-to-device copy bandwidth (read + write)
    n = (1 << 29) if on_gpu else (1 << 16)
    ms = _copy_ms(bench, n, device)
    copy_bw = 2 * n / (ms * 1e-3) / 1e9
    rows.append(_row("copy (d2d)", f"{n >> 10} KiB", ms, 2 * n, "GB/s", copy_bw, "itself"))

    # decode attention: the target shape, then a long-context few-sequence one
    heads, kv_heads, d, bs = (32, 8, 128, 16) if on_gpu else (4, 2, 64, 16)
    decode_shapes = [(64, 4096), (16, 8192), (4, 32768)] if on_gpu else [(2, 40)]
    for num_seqs, ctx in decode_shapes:
        kc, vc, bt = _paged_cache(num_seqs, ctx, kv_heads, d, bs, dtype, device)
        q = torch.randn(num_seqs, heads, d, dtype=dtype, device=device)
        lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        sms = mods["triton_common"].num_sms(q.device)
        splits = dec.choose_num_splits(num_seqs, kv_heads, ctx, sms)
        ms = bench(lambda q=q, kc=kc, vc=vc, bt=bt, lens=lens, ctx=ctx, out=out:
                   dec.paged_decode_attention_triton(q, kc, vc, bt, lens, d ** -0.5,
                                                     max_context_len=ctx, out=out))
        nbytes = 2 * num_seqs * ctx * kv_heads * d * esize + 2 * q.numel() * esize + bt.numel() * 4
        rows.append(_row("decode_attention", f"b{num_seqs} ctx{ctx} h{heads}/{kv_heads} d{d} "
                         f"bs{bs}", ms, nbytes, "GB/s", copy_bw, "copy", num_splits=splits))
        del kc, vc

    # prefill attention, one causal sequence, vs SDPA flash on contiguous K/V
    seq = 4096 if on_gpu else 48
    kc, vc, bt = _paged_cache(1, seq, kv_heads, d, bs, dtype, device)
    q = torch.randn(seq, heads, d, dtype=dtype, device=device)
    lens = torch.tensor([seq], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, seq], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    ms = bench(lambda: pre.paged_prefill_attention_triton(
        q, kc, vc, bt, lens, qsl, seq, d ** -0.5, out=out))
    flops = 4.0 * d * heads * seq * (seq + 1) / 2
    sdpa_ms, sdpa_name = _sdpa_ms(bench, seq, heads, kv_heads, d, dtype, device)
    sdpa_tflops = flops / (sdpa_ms * 1e-3) / 1e12
    rows.append(_row("sdpa causal", f"s{seq} h{heads}/{kv_heads} d{d}", sdpa_ms, flops,
                     "TFLOP/s", sdpa_tflops, sdpa_name))
    rows.append(_row("prefill_attention", f"s{seq} h{heads}/{kv_heads} d{d} bs{bs}", ms, flops,
                     "TFLOP/s", sdpa_tflops, "sdpa"))

    # chunked prefill after a prefix-cache hit: 4 sequences, 1024 new tokens after 3072
    nseq, new, prefix = (4, 1024, 3072) if on_gpu else (2, 16, 24)
    kc, vc, bt = _paged_cache(nseq, new + prefix, kv_heads, d, bs, dtype, device)
    q = torch.randn(nseq * new, heads, d, dtype=dtype, device=device)
    lens = torch.full((nseq,), new + prefix, dtype=torch.int32, device=device)
    qsl = torch.arange(nseq + 1, dtype=torch.int32, device=device) * new
    out = torch.empty_like(q)
    ms = bench(lambda: pre.paged_prefill_attention_triton(
        q, kc, vc, bt, lens, qsl, new, d ** -0.5, out=out))
    flops = 4.0 * d * heads * nseq * sum(prefix + i + 1 for i in range(new))
    rows.append(_row("prefill_attention chunked", f"{nseq}x{new} after {prefix} h{heads}/"
                     f"{kv_heads} d{d}", ms, flops, "TFLOP/s", sdpa_tflops, "sdpa (full)"))
    del kc, vc

    # the small kernels
    tokens, hidden, inter = (4096, 4096, 14336) if on_gpu else (8, 64, 96)
    kv = torch.randn(tokens, 2, kv_heads, d, dtype=dtype, device=device)
    kc, vc, _ = _paged_cache(1, tokens, kv_heads, d, bs, dtype, device)
    slots = torch.randperm(tokens, device=device)
    ms = bench(lambda: att.reshape_and_cache_triton(kv[:, 0], kv[:, 1], kc, vc, slots))
    rows.append(_row("reshape_and_cache", f"t{tokens} kv{kv_heads} d{d}", ms,
                     4 * kv[:, 0].numel() * esize + slots.numel() * 8, "GB/s", copy_bw, "copy"))

    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    res = torch.randn_like(x)
    w = torch.rand(hidden, dtype=dtype, device=device)
    ms = bench(lambda: ew.rms_norm_triton(x, w, 1e-6, res, 1.0))
    rows.append(_row("add_rms_norm", f"t{tokens} h{hidden}", ms, 4 * x.numel() * esize,
                     "GB/s", copy_bw, "copy"))

    qk = torch.randn(tokens, (heads + kv_heads) * d, dtype=dtype, device=device)
    cache = torch.randn(8192, d, device=device)
    pos = torch.randint(0, 8192, (tokens,), device=device)
    qv, kv_ = qk[:, :heads * d], qk[:, heads * d:]
    ms = bench(lambda: ew.rotary_triton(pos, qv, kv_, cache, d, True))
    rows.append(_row("rotary (neox)", f"t{tokens} h{heads}+{kv_heads} d{d}", ms,
                     2 * qk.numel() * esize + tokens * d * 4, "GB/s", copy_bw, "copy"))

    g = torch.randn(tokens, 2 * inter, dtype=dtype, device=device)
    for name, fn in [("silu_and_mul", lambda: ew.silu_and_mul_triton(g)),
                     ("gelu_and_mul (tanh)", lambda: ew.gelu_and_mul_triton(g, "tanh"))]:
        ms = bench(fn)
        rows.append(_row(name, f"t{tokens} d{inter}", ms, 3 * tokens * inter * esize,
                         "GB/s", copy_bw, "copy"))

    if print_rows:
        print_table(rows)
    return rows


def _copy_ms(bench, nbytes: int, device: str) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def _sdpa_ms(bench, seq: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype,
             device: str) -> tuple[float, str]:
    import torch.nn.functional as F

    q = torch.randn(1, heads, seq, d, dtype=dtype, device=device)
    k = torch.randn(1, kv_heads, seq, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    if device != "cuda":
        k2, v2 = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        return bench(lambda: F.scaled_dot_product_attention(q, k2, v2, is_causal=True)), "sdpa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return bench(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True)), "sdpa flash (gqa)"
        except RuntimeError:
            k2 = k.repeat_interleave(heads // kv_heads, 1)
            v2 = v.repeat_interleave(heads // kv_heads, 1)
            return bench(lambda: F.scaled_dot_product_attention(
                q, k2, v2, is_causal=True)), "sdpa flash (kv expanded)"


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':26s} {'shape':36s} {'ms':>9s} {'value':>9s} {'unit':8s} "
          f"{'ratio':>6s}  vs")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        extra = f" (splits={r['num_splits']})" if "num_splits" in r else ""
        print(f"{r['kernel']:26s} {r['shape']:36s} {r['ms']:9.4f} {r['value']:9.1f} "
              f"{r['unit']:8s} {ratio:>6s}  {r['baseline']}{extra}")


if __name__ == "__main__":
    run_kernel_bench("cuda" if torch.cuda.is_available() else "cpu")
