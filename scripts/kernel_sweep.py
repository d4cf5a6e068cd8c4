"""Launch sweeps of the decode-attention and small-M linear kernels on a CUDA device, printed as
markdown tables (what docs/PERF.md quotes; nothing here is a test).

    python3 scripts/kernel_sweep.py decode   # split counts (and tiles) per batch x context
    python3 scripts/kernel_sweep.py gemv     # the small-M kernel at 16-64 rows against cuBLAS
    python3 scripts/kernel_sweep.py prefill  # prefill attention tiles, pages, beside torch SDPA

Every figure is µs per call from CUDA-graph replays of many calls whose inputs rotate past L2
(KV caches / weights of several "layers"), Llama-3-8B's shapes, bf16; prefill calls (ms each)
are timed with CUDA events around a few calls instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROTATE_BYTES = 512 * 2**20  # inputs of all the calls in one graph, together past L2


def graph_us(calls) -> float:
    """µs per call of the list `calls` (zero-argument callables), all of them in one graph."""
    from engine.bench.gemv_bench import graph_us as timed

    return timed(calls, max(len(calls), 64))


def copy_bandwidth() -> float:
    """TB/s of a lone 1 GiB device-to-device copy, the figure every bench prints."""
    from engine.bench.hardware import copy_bandwidth_gbs

    return copy_bandwidth_gbs(torch.device("cuda")) / 1e3


def sweep_decode(args) -> None:
    from kernels.decode_attention import choose_num_splits
    from kernels.triton_common import num_sms

    heads, kv_heads, d, page = 32, 8, 128, 16
    sms = num_sms(torch.device("cuda"))
    bw = copy_bandwidth()
    print(f"\n## decode attention, 32 / 8 heads, d 128, bf16, pages of {page}; copy {bw:.2f} TB/s")
    splits = [1, 2, 4, 8, 16, 32, 64]
    print("| batch | context | KV MB a call | " + " | ".join(f"{s} split" for s in splits)
          + " | best (of copy BW) | the rule's |")
    print("|---:|---:|---:|" + "---:|" * len(splits) + "---:|---:|")
    cases = [(1, 256), (1, 512), (1, 1024), (1, 4096), (4, 1024), (16, 256), (16, 1024),
             (16, 8192), (64, 256), (64, 1024), (128, 256), (256, 384), (512, 256), (512, 384)]
    for bs, ctx in cases:
        per_call = bs * ctx * kv_heads * d * 2 * 2
        calls = decode_calls(bs, ctx, heads, kv_heads, d, page)
        row = [None if s > 1 and s > ctx // 64 else graph_us(calls(num_splits=s))
               for s in splits]
        rule = choose_num_splits(bs, kv_heads, ctx, sms)
        best = min(x for x in row if x is not None)
        cells = " | ".join("-" if x is None else f"{x:.2f}" for x in row)
        print(f"| {bs} | {ctx} | {per_call / 1e6:.1f} | {cells} | {best:.2f} "
              f"({per_call / best / 1e6 / bw:.2f}) | {rule} |")

    print("\n| batch x context | block_n / warps / stages: µs (1 split) |")
    print("|---|---|")
    for bs, ctx in [(64, 256), (512, 384)]:
        per_call = bs * ctx * kv_heads * d * 2 * 2
        calls = decode_calls(bs, ctx, heads, kv_heads, d, page)
        cells = []
        for bn, w, st in itertools.product([32, 64, 128], [4, 8], [2, 3, 4]):
            cfg = {"block_n": bn, "num_warps": w, "num_stages": st}
            try:
                cells.append(f"{bn}/{w}/{st}: {graph_us(calls(num_splits=1, config=cfg)):.1f}")
            except Exception as e:  # noqa: BLE001 (out of resources: reported, not fatal)
                cells.append(f"{bn}/{w}/{st}: {type(e).__name__}")
        print(f"| {bs} x {ctx} ({per_call / 1e6:.0f} MB) | {', '.join(cells)} |")


def decode_calls(bs: int, ctx: int, heads: int, kv_heads: int, d: int, page: int):
    """calls(**kwargs): one decode call per rotated cache (scattered pages, every sequence at
    `ctx`), with paged_decode_attention_triton's keyword arguments."""
    from kernels.decode_attention import paged_decode_attention_triton

    per_call = bs * ctx * kv_heads * d * 2 * 2
    copies = max(2, min(256, math.ceil(ROTATE_BYTES / per_call)))
    blocks = bs * ctx // page
    k = torch.randn(copies * blocks, page, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(copies * blocks, device="cuda", dtype=torch.int32).view(
        copies, bs, blocks // bs)
    lens = torch.full((bs,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(bs, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return lambda **kw: [functools.partial(paged_decode_attention_triton, q, k, v, t, lens,
                                           d ** -0.5, out=out, **kw) for t in tables]


def sweep_gemv(args) -> None:
    import torch.nn.functional as F

    from kernels.gemv_triton import GemvConfig, dot_rows, gemv_config, gemv_triton

    bw = copy_bandwidth()
    print(f"\n## small-M linear against cuBLAS, bf16 weights; copy {bw:.2f} TB/s")
    shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "down": (4096, 14336),
              "gate_up": (28672, 4096)}
    grid = [GemvConfig(bn, rb // 2, 4, st, sp) for bn, rb, st, sp in itertools.product(
        [32, 64, 128], [256, 512], [3, 4], [1, 2])]
    print("| shape | M | cuBLAS µs (TB/s) | table: config µs | best of the grid: config µs "
          "(TB/s) |")
    print("|---|---:|---:|---:|---:|")
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, math.ceil(ROTATE_BYTES / nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
              for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cub = graph_us([functools.partial(F.linear, x, w) for w in ws])
            table = gemv_config(n, k, torch.bfloat16, 2, None, dot_rows(m))

            def ours(c, x=x, ws=ws):
                try:
                    return graph_us([functools.partial(gemv_triton, x, w, config=c)
                                     for w in ws])
                except Exception:  # noqa: BLE001 (a launch past the shared memory)
                    return math.inf
            t_table = ours(table)
            results = [(ours(c), c) for c in grid]
            best_us, best = min(results, key=lambda r: r[0])

            def fmt(c):
                return f"{c.block_n}/{c.block_k * 2}B/{c.num_stages}st/split{c.split_k}"
            print(f"| {name} {n}x{k} | {m} | {cub:.2f} ({nbytes / cub / 1e6:.2f}) | "
                  f"{fmt(table)}: {t_table:.2f} | {fmt(best)}: {best_us:.2f} "
                  f"({nbytes / best_us / 1e6:.2f}) |")


def events_ms(fn, reps: int = 5) -> float:
    """Median ms of fn() between CUDA events (calls long enough not to need a graph)."""
    from engine.bench.hardware import _cuda_ms

    return _cuda_ms(fn, reps)


def sweep_prefill(args) -> None:
    """Causal prefill, 32 / 8 heads, d 128: our kernel per tile config and page size (keys
    and values read from a paged cache, pages in random order), against torch's SDPA backends
    on the same q / k / v laid out densely ([B, H, S, D]). TFLOP/s counts the causal half:
    2 * S^2 * D * heads per sequence."""
    print("\n## prefill attention, causal, 32 / 8 heads, d 128, bf16 (TFLOP/s; ms per call)")
    print("| seqs x len | page | default [tile]: TFLOP/s (ms) | best tile: config, TFLOP/s | "
          "SDPA flash | SDPA cuDNN | SDPA efficient |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for bs, s in args.prefill_shapes:
        prefill_rows(bs, s, args.pages)


def prefill_rows(bs: int, s: int, pages: list[int]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels.prefill_attention import default_prefill_config, paged_prefill_attention_triton

    heads, kv_heads, d = 32, 8, 128
    configs = [{"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
               for bm, bn, w, st in itertools.product([64, 128], [64, 128], [4, 8], [2, 3])]
    flop = 2 * s * s * d * heads * bs
    tokens = bs * s
    q = torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16)
    kd = torch.randn(tokens, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    starts = torch.arange(0, tokens + 1, s, dtype=torch.int32, device="cuda")
    lens = torch.full((bs,), s, dtype=torch.int32, device="cuda")
    dense = [t.view(bs, s, -1, d).transpose(1, 2) for t in (q, kd, vd)]

    def sdpa_tflops(backend) -> str:
        try:
            with sdpa_kernel(backend):
                ms = events_ms(lambda: sdpa(*dense, is_causal=True, enable_gqa=True))
            return f"{flop / ms / 1e9:.0f} ({ms:.2f})"
        except Exception as e:  # noqa: BLE001 (a backend this build or shape lacks)
            return f"n/a ({type(e).__name__})"

    sdpa_row = [sdpa_tflops(b) for b in (SDPBackend.FLASH_ATTENTION,
                                         SDPBackend.CUDNN_ATTENTION,
                                         SDPBackend.EFFICIENT_ATTENTION)]
    out = torch.empty_like(q)
    for page in pages:
        blocks = tokens // page
        perm = torch.randperm(blocks, device="cuda")
        kc = torch.empty(blocks, page, kv_heads, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.empty_like(kc)
        kc[perm] = kd.view(blocks, page, kv_heads, d)
        vc[perm] = vd.view(blocks, page, kv_heads, d)
        tables = perm.to(torch.int32).view(bs, -1)  # logical page j is at perm[j]

        def call(cfg=None, kc=kc, vc=vc, tables=tables):
            return paged_prefill_attention_triton(q, kc, vc, tables, lens, starts, s,
                                                  d ** -0.5, out=out, config=cfg)
        if page == pages[0]:  # the layout is right: our output equals SDPA's
            call()
            ref = sdpa(*dense, is_causal=True, enable_gqa=True)
            err = (out.view(bs, s, heads, d).transpose(1, 2) - ref).abs().max().item()
            assert err < 2e-2, f"prefill kernel against SDPA: max abs error {err}"

        def ours(cfg=None, call=call) -> tuple[float, float]:
            try:
                ms = events_ms(lambda: call(cfg))
            except Exception:  # noqa: BLE001 (a tile past the shared memory)
                return 0.0, math.inf
            return flop / ms / 1e9, ms
        base_tf, base_ms = ours()
        best_tf, best = max(((ours(c)[0], c) for c in configs), key=lambda r: r[0])
        name = "/".join(str(best[k]) for k in ("block_m", "block_n", "num_warps",
                                               "num_stages"))
        dc = default_prefill_config(d, s)
        print(f"| {bs} x {s} | {page} | [{dc['block_m']}/{dc['block_n']}/{dc['num_warps']}/"
              f"{dc['num_stages']}] {base_tf:.0f} ({base_ms:.2f}) | {name}: {best_tf:.0f} | "
              + " | ".join(sdpa_row) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "gemv", "prefill"])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--pages", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--prefill-shapes", type=lambda t: tuple(map(int, t.split("x"))),
                    nargs="+", default=[(8, 4096), (32, 256), (1, 16384)], metavar="BxS")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    {"decode": sweep_decode, "gemv": sweep_gemv, "prefill": sweep_prefill}[args.what](args)


if __name__ == "__main__":
    main()
