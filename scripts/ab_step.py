"""Same-process A/B of decode-path variants on a CUDA device: one engine, the decode graphs
recaptured for each variant, the variants timed in turn for several rounds (so drift of the
machine falls on all of them alike). Prints TPOT p50 per variant, as `aphro bench latency`
measures it (greedy, EOS ignored; TPOT = (T(output_len) - T(1)) / (output_len - 1)).

    python3 scripts/ab_step.py --batch-size 1 [--quantization fp8] \\
        --variants old-decode,split-min=256,split-min=64,gemv-rows=16 [--old-tree ab/old]

Variants (comma-separated; "base" is the tree as it is):
  split-min=N   decode attention's per-sequence minimum split length set to N keys
  old-decode    decode attention from another tree's kernels/decode_attention.py (--old-tree)
  gemv-rows=R   the unquantized linear gives the small-M kernel at most R rows (16: cuBLAS
                above 16 rows, as before the long-K rule)

With --offline N: N prompts through the engine's default configuration (as `aphro bench
throughput` runs it), output tok/s per variant instead of TPOT.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def apply_variant(name: str, old_tree: str) -> dict:
    """Patch the modules for `name`; returns {(module, attribute): original} to undo it."""
    import engine.layers.linear_method as lm
    import kernels.attention_triton as at
    import kernels.decode_attention as da

    undo = {}

    def patch(mod, attr, value):
        undo.setdefault((mod, attr), getattr(mod, attr))
        setattr(mod, attr, value)

    for part in name.split("+"):
        if part == "base":
            continue
        if part.startswith("split-min="):
            n = int(part.split("=")[1])
            patch(da, "split_min_tokens", lambda *_, n=n: n)
        elif part == "old-decode":
            spec = importlib.util.spec_from_file_location(
                "old_decode_attention", Path(old_tree) / "kernels" / "decode_attention.py")
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)
            patch(at, "paged_decode_attention_triton", old.paged_decode_attention_triton)
        elif part.startswith("gemv-rows="):
            patch(lm, "GEMV_KERNEL_ROWS", int(part.split("=")[1]))
        else:
            raise SystemExit(f"unknown variant {part!r}")
    return undo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--old-tree", default="ab/old")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--offline", type=int, default=0, metavar="N")
    a = ap.parse_args(argv)

    from engine.bench.engine_bench import (
        preset_config,
        preset_config_dir,
        random_prompts,
        throughput_config,
    )
    from engine.bench.latency import latency_config, timed_run
    from engine.core.llm_engine import LLMEngine
    from engine.runner.cuda_graphs import CUDAGraphs

    bs = a.batch_size
    model_dir = preset_config_dir(a.preset, Path(tempfile.mkdtemp()) / "config")
    options = {"dtype": "bfloat16", "load_format": "dummy", "quantization": a.quantization}
    prompts = random_prompts(a.offline or bs, a.input_len, preset_config(a.preset).vocab_size,
                             0)
    if a.offline:
        config = throughput_config(model_dir, prompts, a.output_len, **options)
    else:
        config = latency_config(model_dir, bs, a.input_len, a.output_len, **options)
    engine = LLMEngine(config, stream_outputs=False)
    runner = engine.executor

    device = str(config.device)

    def run(n: int) -> float:
        return timed_run(engine, prompts, n, device)

    variants = a.variants.split(",")
    figures: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            undo = apply_variant(v, a.old_tree)
            try:
                if runner.graphs is not None:  # (a dry run on the CPU has none)
                    runner.graphs.reset()
                    runner.graphs = CUDAGraphs(runner, config.scheduler.max_num_seqs)
                if a.offline:  # output tok/s of the whole run
                    timed_run(engine, prompts[:256], 2, device)  # warm
                    for _ in range(a.iters):
                        figures[v].append(len(prompts) * a.output_len / run(a.output_len))
                    continue
                run(1)
                run(a.output_len)  # warm: kernels of this variant compiled
                for _ in range(a.iters):
                    first, whole = run(1), run(a.output_len)
                    figures[v].append((whole - first) / (a.output_len - 1) * 1e3)
            finally:
                for (mod, attr), value in undo.items():
                    setattr(mod, attr, value)
    engine.close()
    what = "output tok/s" if a.offline else "TPOT p50 ms"
    label = (f"{a.preset} {a.offline} prompts" if a.offline else f"{a.preset} b{bs}")
    label += f" {a.quantization or 'bf16'}, {a.input_len} in / {a.output_len} out"
    print(f"\n## {what}, {label} ({a.rounds} rounds x {a.iters} runs)")
    print("| variant | median | min | max | vs first |")
    print("|---|---:|---:|---:|---:|")
    first = statistics.median(figures[variants[0]])
    for v in variants:
        med = statistics.median(figures[v])
        print(f"| {v} | {med:.3f} | {min(figures[v]):.3f} | {max(figures[v]):.3f} | "
              f"{med - first:+.3f} |")


if __name__ == "__main__":
    main()
