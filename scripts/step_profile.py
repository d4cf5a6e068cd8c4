"""Where one decode step's time goes, on a CUDA device (the `.bench` profiles, kept in the tree).

    python3 scripts/step_profile.py [--preset llama-8b] [--batch-size 1] [--quantization fp8]
                                    [--steps 64] [--top 25]

Builds the engine as `aphro bench latency` does (random weights, graphs on), decodes to a steady
state, then prints, per decode step:
  wall      engine.step() back to back, synchronised only around the whole run;
  graph     the decode graph replayed alone (CUDA events around N replays);
  lm head   compute_logits of the step's hidden rows alone;
  busy      the union of the GPU's kernel / copy intervals in a torch.profiler window, and idle =
            wall - busy (the GPU waiting on the host);
then the profiler's GPU time per kernel name (µs per step, calls per step), top N.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _events_ms(fn, n: int) -> float:
    if not torch.cuda.is_available():  # (a dry run of the script on the CPU)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _busy_us(events) -> float:
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prefill", action="store_true",
                    help="profile one prefill step of --batch-size prompts of --input-len")
    ap.add_argument("--launch-cost", action="store_true",
                    help="host time per call of each linear path at --input-len rows, alone")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    if a.launch_cost:
        return _launch_cost(a.input_len)

    from engine.bench.engine_bench import preset_config_dir, random_prompts, sync
    from engine.bench.latency import latency_config
    from engine.core.llm_engine import LLMEngine
    from engine.core.sampling_params import SamplingParams

    bs = a.batch_size
    chunk = {"max_num_batched_tokens": bs * a.input_len} if a.prefill else {}
    config = latency_config(
        preset_config_dir(a.preset, Path(tempfile.mkdtemp()) / "config"), bs, a.input_len,
        4 * a.steps + 48, dtype="bfloat16", load_format="dummy", quantization=a.quantization,
        **chunk)
    engine = LLMEngine(config, stream_outputs=False)
    runner = engine.executor
    if a.prefill:
        return _prefill(engine, a)
    params = SamplingParams(temperature=0, max_tokens=4 * a.steps, ignore_eos=True)
    for p in random_prompts(bs, a.input_len, engine.vocab_size, 0):
        engine.add_request(prompt_token_ids=p, sampling_params=params)
    tokens_a_step = config.scheduler.max_num_batched_tokens
    for _ in range(-(-bs * a.input_len // tokens_a_step) + 8):  # prefill, first decodes
        engine.step()
    device = str(config.device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / a.steps

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            engine.step()
        sync(device)
    gpu, per_name = _gpu_ops(prof)
    busy_ms = _busy_us(gpu) / 1e3 / a.steps

    graphs = runner.graphs
    if graphs is not None:
        g = next(b for b in graphs.sizes if b >= bs)
        graph_ms = _events_ms(graphs.graphs[g].replay, 100)
        hidden = graphs.outputs[g][:bs]
    else:
        graph_ms = 0.0
        hidden = torch.zeros(bs, runner.model.config.hidden_size, dtype=config.dtype)
    with torch.inference_mode():
        head_ms = _events_ms(lambda: runner.model.compute_logits(hidden), 100)
    engine.close()

    label = a.label or f"{a.preset} b{bs} {a.quantization or 'bf16'}"
    print(f"\n## {label}: per decode step, ms")
    print("| wall | graph alone | lm head alone | rest (wall - graph - head) | GPU busy | idle |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {wall_ms:.3f} | {graph_ms:.3f} | {head_ms:.3f} | "
          f"{wall_ms - graph_ms - head_ms:.3f} | {busy_ms:.3f} | {wall_ms - busy_ms:.3f} |")
    _table(per_name, a.steps, a.top)


def _prefill(engine, a) -> None:
    """One step that prefills every prompt (max_num_batched_tokens holds them all): wall, GPU
    busy and the op table, with the linear layers' achieved TFLOP/s."""
    from engine.bench.engine_bench import random_prompts
    from engine.bench.latency import timed_run
    from engine.bench.roofline import parameter_counts, shape_of

    device = str(engine.config.device)
    prompts = random_prompts(a.batch_size, a.input_len, engine.vocab_size, 0)
    timed_run(engine, prompts, 1, device)  # compiles
    wall_ms = timed_run(engine, prompts, 1, device) * 1e3
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_run(engine, prompts, 1, device)
    gpu, per_name = _gpu_ops(prof)
    tokens = a.batch_size * a.input_len
    shape = shape_of(engine.config.hf_config)
    head = shape["vocab_size"] * shape["hidden_size"]  # the LM head: last tokens only
    flops = 2 * tokens * (parameter_counts(shape)["active"] - head) + 2 * a.batch_size * head
    engine.close()
    print(f"\n## prefill {a.batch_size} x {a.input_len} ({a.quantization or 'bf16'}), ms")
    print("| wall | GPU busy | the linear layers' FLOPs / wall |")
    print("|---:|---:|---:|")
    print(f"| {wall_ms:.2f} | {_busy_us(gpu) / 1e3:.2f} | "
          f"{flops / wall_ms / 1e9:.0f} TFLOP/s |")
    _table(per_name, 1, a.top)


def _launch_cost(rows: int, n: int = 4096, k: int = 4096, calls: int = 300) -> None:
    """Host µs per call (queued, no wait) and µs per call with the GPU's time (synchronised
    at the end) of each piece of a linear layer at `rows` rows: F.linear, the per-token FP8
    quantization, torch._scaled_mm, Fp8LinearMethod.apply as a whole."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from engine.layers.quantization.fp8 import Fp8LinearMethod, quantize_fp8_per_channel
    from kernels.ops import per_token_quant_fp8

    dev = "cuda"
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = quantize_fp8_per_channel(w)
    xq, xs = per_token_quant_fp8(x)
    layer = SimpleNamespace(weight=wq, weight_scale=ws, fp8_scaled_mm=True)
    method = Fp8LinearMethod()
    cases = {
        "F.linear (bf16)": lambda: F.linear(x, w),
        "per_token_quant_fp8 (Triton)": lambda: per_token_quant_fp8(x),
        "torch._scaled_mm, row-wise scales": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16),
        "Fp8LinearMethod.apply": lambda: method.apply(layer, x),
    }
    print(f"\n## one linear's pieces at {rows} rows ({n} x {k}), µs per call")
    print("| call | host (queued) | with the GPU (synchronised) |")
    print("|---|---:|---:|")
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) * 1e6 / calls
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        print(f"| {name} | {host:.1f} | {(time.perf_counter() - t0) * 1e6 / calls:.1f} |")


def _gpu_ops(prof) -> tuple[list, dict[str, list[float]]]:
    """A profile's GPU events (kernels, copies) and their durations (µs) by name."""
    gpu = [e for e in prof.events() if e.device_type.name == "CUDA"]
    per_name: dict[str, list[float]] = {}
    for e in gpu:
        per_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    return gpu, per_name


def _table(per_name: dict[str, list[float]], steps: int, top: int) -> None:
    print(f"\n| GPU op (top {top}) | µs / step | calls / step | µs each (median) |")
    print("|---|---:|---:|---:|")
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    for name, durs in rows:
        print(f"| {name[:90]} | {sum(durs) / steps:.1f} | {len(durs) / steps:.2f} | "
              f"{statistics.median(durs):.2f} |")
    total = sum(sum(d) for d in per_name.values()) / steps
    print(f"| (all ops, summed) | {total:.1f} | "
          f"{sum(len(d) for d in per_name.values()) / steps:.1f} | |")


if __name__ == "__main__":
    main()
