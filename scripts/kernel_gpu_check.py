"""One GPU session's worth of kernel work: correctness at real sizes, a small tile-config sweep,
then the benchmark table (printed last).

    python -m kernels.gpu_check [--no-tests] [--no-sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _env() -> str:
    import triton

    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, "
            f"triton {triton.__version__}, python {sys.version.split()[0]}")


def run_tests(out_dir: str | None) -> int:
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider",
           "-n", "6", "--durations=5"]
    t0 = time.time()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=False)
    log = proc.stdout + proc.stderr
    if out_dir:
        with open(os.path.join(out_dir, "pytest.log"), "w") as f:
            f.write(log)
    print(log[-6000:])
    print(f"[tests] rc={proc.returncode} in {time.time() - t0:.0f}s", flush=True)
    return proc.returncode


def sweep() -> list[dict]:
    """Time the attention kernels under a few tile configs (the defaults first)."""
    import triton.testing

    from kernels import bench
    from kernels.decode_attention import paged_decode_attention_triton
    from kernels.prefill_attention import paged_prefill_attention_triton

    dt = torch.bfloat16
    res = []

    def timed(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    heads, kvh, d, bs = 32, 8, 128, 16
    for nseq, ctx, cfgs in [
        (64, 4096, [({}, None), ({"block_n": 128}, None), ({"num_stages": 4}, None), ({}, 2)]),
        (32, 4096, [({}, None), ({}, 2), ({}, 4)]),
        (16, 8192, [({}, None), ({}, 1), ({}, 2), ({}, 8)]),
        (4, 32768, [({}, None), ({}, 1), ({}, 9), ({}, 32)]),
    ]:
        kc, vc, bt = bench._paged_cache(nseq, ctx, kvh, d, bs, dt, "cuda")
        q = torch.randn(nseq, heads, d, dtype=dt, device="cuda")
        lens = torch.full((nseq,), ctx, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        nbytes = 2 * nseq * ctx * kvh * d * 2
        for cfg, splits in cfgs:
            try:
                ms = timed(lambda q=q, kc=kc, vc=vc, bt=bt, lens=lens, ctx=ctx, s=splits,
                           out=out, cfg=cfg: paged_decode_attention_triton(
                               q, kc, vc, bt, lens, d ** -0.5, max_context_len=ctx,
                               num_splits=s, out=out, config=cfg))
                r = {"what": f"decode b{nseq} ctx{ctx}", "cfg": cfg, "splits": splits,
                     "ms": ms, "GB/s": nbytes / ms / 1e6}
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result
                r = {"what": f"decode b{nseq} ctx{ctx}", "cfg": cfg, "error": repr(e)[:200]}
            print(r, flush=True)
            res.append(r)
        del kc, vc

    seq = 4096
    kc, vc, bt = bench._paged_cache(1, seq, kvh, d, bs, dt, "cuda")
    q = torch.randn(seq, heads, d, dtype=dt, device="cuda")
    lens = torch.tensor([seq], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    flops = 4.0 * d * heads * seq * (seq + 1) / 2
    for cfg in [{}, {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
                {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4},
                {"block_m": 256, "block_n": 64, "num_warps": 8, "num_stages": 3}]:
        try:
            ms = timed(lambda cfg=cfg: paged_prefill_attention_triton(
                q, kc, vc, bt, lens, qsl, seq, d ** -0.5, out=out, config=cfg))
            r = {"what": "prefill s4096", "cfg": cfg, "ms": ms, "TFLOP/s": flops / ms / 1e9}
        except Exception as e:  # noqa: BLE001
            r = {"what": "prefill s4096", "cfg": cfg, "error": repr(e)[:200]}
        print(r, flush=True)
        res.append(r)
    for hd, cfgs in [(64, [{}, {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}]),
                     (256, [{}, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
                            {"block_m": 128, "block_n": 32, "num_warps": 8, "num_stages": 2}])]:
        kc, vc, bt = bench._paged_cache(1, seq, kvh, hd, bs, dt, "cuda")
        q = torch.randn(seq, heads, hd, dtype=dt, device="cuda")
        out = torch.empty_like(q)
        flops = 4.0 * hd * heads * seq * (seq + 1) / 2
        for cfg in cfgs:
            try:
                ms = timed(lambda cfg=cfg, q=q, kc=kc, vc=vc, bt=bt, out=out, hd=hd:
                           paged_prefill_attention_triton(q, kc, vc, bt, lens, qsl, seq,
                                                          hd ** -0.5, out=out, config=cfg))
                r = {"what": f"prefill s4096 d{hd}", "cfg": cfg, "ms": ms,
                     "TFLOP/s": flops / ms / 1e9}
            except Exception as e:  # noqa: BLE001
                r = {"what": f"prefill s4096 d{hd}", "cfg": cfg, "error": repr(e)[:200]}
            print(r, flush=True)
            res.append(r)
    return res


def small_kernel_ab() -> None:
    """reshape_and_cache tokens-per-program and add+RMSNorm warps, timed with do_bench (L2
    flushed, launches included) and with CUDA-graph replay (launch gaps removed)."""
    import triton.testing

    from kernels import bench
    from kernels.attention_triton import _reshape_and_cache_kernel
    from kernels.elementwise_triton import _rms_norm_kernel

    def both(fn):
        a = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        b = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return a, b

    dt = torch.bfloat16
    kv = torch.randn(4096, 2, 8, 128, dtype=dt, device="cuda")
    k, v = kv[:, 0], kv[:, 1]
    kc, vc, _ = bench._paged_cache(1, 4096, 8, 128, 16, dt, "cuda")
    slots = torch.randperm(4096, device="cuda")
    nbytes = 4 * k.numel() * 2
    for bt in (1, 2, 4, 8):
        for warps in (1, 4):
            a, b = both(lambda bt=bt, warps=warps: _reshape_and_cache_kernel[(4096 // bt,)](
                k, v, kc, vc, slots, 4096, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1),
                vc.stride(2), NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_T=bt, BLOCK_H=8, BLOCK_D=128,
                PAGE=16, num_warps=warps))
            print(f"[ab] reshape_and_cache block_t={bt} warps={warps}: {a * 1e3:.1f} us "
                  f"({nbytes / a / 1e6:.0f} GB/s), graph {b * 1e3:.1f} us "
                  f"({nbytes / b / 1e6:.0f} GB/s)", flush=True)
    x = torch.randn(4096, 4096, dtype=dt, device="cuda")
    res, out, res_out = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
    w = torch.rand(4096, dtype=dt, device="cuda")
    for warps in (4, 8, 16):
        a, b = both(lambda warps=warps: _rms_norm_kernel[(4096,)](
            x, res, w, out, res_out, 1e-6, 1.0, 4096, 4096, 4096, 4096, 4096, BLOCK=4096,
            HAS_RES=True, HAS_OFFSET=True, num_warps=warps))
        print(f"[ab] add_rms_norm warps={warps}: {a * 1e3:.1f} us "
              f"({4 * x.numel() * 2 / a / 1e6:.0f} GB/s), graph {b * 1e3:.1f} us", flush=True)


def compiled_report() -> None:
    """Registers, spills, shared memory and matrix instructions of each compiled variant."""
    from kernels import decode_attention, prefill_attention

    for fn in (decode_attention._decode_kernel, prefill_attention._prefill_kernel):
        try:
            for entry in fn.device_caches.values():
                for k in entry[0].values():
                    md = k.metadata
                    ptx = k.asm.get("ptx", "")
                    print(f"[{fn.__name__}] warps={md.num_warps} stages={md.num_stages} "
                          f"regs={k.n_regs} spills={k.n_spills} smem={md.shared} "
                          f"wgmma={'wgmma' in ptx} mma.sync={'mma.sync' in ptx} "
                          f"cp.async={'cp.async' in ptx}", flush=True)
        except Exception as e:  # noqa: BLE001 - the report is best-effort across versions
            print(f"[{fn.__name__}] no report: {e!r}"[:200])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--ab", action="store_true", help="small-kernel A/B timings")
    ap.add_argument("--repeat", type=int, default=1, help="run the bench this many times")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    print(_env(), flush=True)
    rc = 0 if args.no_tests else run_tests(args.out)
    sweep_rows = [] if args.no_sweep else sweep()
    if not args.no_sweep:
        compiled_report()
    from engine.bench.kernels import print_table, run_kernel_bench

    if args.ab:
        small_kernel_ab()
    for _ in range(args.repeat - 1):
        print_table(run_kernel_bench("cuda", torch.bfloat16, print_rows=False))
    rows = run_kernel_bench("cuda", torch.bfloat16, print_rows=False)
    if args.out:
        with open(os.path.join(args.out, "kernels_bench.json"), "w") as f:
            json.dump({"env": _env(), "tests_rc": rc, "sweep": sweep_rows, "bench": rows}, f,
                      indent=1, default=str)
    print(f"\n== {_env()} | tests rc={rc}")
    print_table(rows)


if __name__ == "__main__":
    main()
