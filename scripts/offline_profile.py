"""Where an offline run's time goes, step by step, on a CUDA device.

    python3 scripts/offline_profile.py [--preset llama-8b] [--num-prompts 1000]
        [--input-len 256] [--output-len 256] [--max-num-seqs N] [--max-num-batched-tokens N]
        [--quantization fp8]

Runs the workload `aphro bench throughput` runs (random weights, greedy, EOS ignored, the
engine's configuration as that command builds it), with a CUDA event recorded on the device
stream before and after every step the runner queues. Prints, per kind of step (prefill-only,
mixed prefill + decode, decode-only by batch size), the steps, their device time (first event
to last, gaps inside a step included) and tokens, then the device's idle time between steps and
the wall time. The events themselves cost a few µs a step; read the totals, not the last digit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bucket(num_seqs: int, prefill_tokens: int, decodes: int) -> str:
    if prefill_tokens and decodes:
        return "mixed prefill + decode"
    if prefill_tokens:
        return "prefill only"
    for top in (1, 16, 64, 128, 256, 384, 512, 768, 1024):
        if num_seqs <= top:
            return f"decode, <= {top} seqs"
    return "decode, > 1024 seqs"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--quantization", default=None)
    a = ap.parse_args(argv)

    import torch

    from engine.bench.engine_bench import (
        preset_config,
        preset_config_dir,
        random_prompts,
        throughput_config,
    )
    from engine.core.llm_engine import LLMEngine
    from engine.core.sampling_params import SamplingParams
    from engine.runner.model_runner import ModelRunner

    cuda = torch.cuda.is_available()
    model_dir = preset_config_dir(a.preset, Path(tempfile.mkdtemp()) / "config")
    prompts = random_prompts(a.num_prompts, a.input_len, preset_config(a.preset).vocab_size, 0)
    config = throughput_config(model_dir, prompts, a.output_len,
                               dtype="bfloat16" if cuda else "float32", load_format="dummy",
                               quantization=a.quantization, max_num_seqs=a.max_num_seqs,
                               max_num_batched_tokens=a.max_num_batched_tokens)
    engine = LLMEngine(config, stream_outputs=False)
    engine.warm_up()

    steps: list[tuple] = []  # (start event, end event, num_seqs, prefill tokens, decodes)
    original = ModelRunner.launch

    def launch(self, batch):
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        if start is not None:
            start.record()
        out = original(self, batch)
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        if end is not None:
            end.record()
        steps.append((start, end, batch.num_seqs, batch.num_prefill_tokens,
                      batch.num_decode_tokens))
        return out

    ModelRunner.launch = launch
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    try:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(prompt_token_ids=p, sampling_params=params)
        while engine.has_unfinished_requests():
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        ModelRunner.launch = original
        engine.close()

    rows: dict[str, list[float]] = {}
    idle = 0.0
    for i, (start, end, seqs, pre, dec) in enumerate(steps):
        ms = start.elapsed_time(end) if cuda else 0.0
        if cuda and i:
            idle += max(steps[i - 1][1].elapsed_time(start), 0.0)
        r = rows.setdefault(bucket(seqs, pre, dec), [0, 0.0, 0, 0])
        r[0] += 1
        r[1] += ms
        r[2] += pre
        r[3] += dec
    out_tokens = a.num_prompts * a.output_len
    print(f"\n## offline profile: {a.preset} {a.quantization or config.dtype}, {a.num_prompts} x "
          f"{a.input_len} in / {a.output_len} out, max_num_seqs "
          f"{config.scheduler.max_num_seqs}, max_num_batched_tokens "
          f"{config.scheduler.max_num_batched_tokens}")
    print("| steps of kind | steps | device s | ms / step | prefill tokens | decode tokens "
          "| µs / token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, ms, pre, dec) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        per_tok = ms * 1e3 / max(pre + dec, 1)
        print(f"| {name} | {n} | {ms / 1e3:.3f} | {ms / n:.2f} | {pre} | {dec} | "
              f"{per_tok:.1f} |")
    busy = sum(r[1] for r in rows.values()) / 1e3
    print(f"| device idle between steps | | {idle / 1e3:.3f} | | | | |")
    print(f"| wall | {len(steps)} | {wall:.3f} (steps {busy:.3f} + idle {idle / 1e3:.3f}) | "
          f"| | | {out_tokens / wall:,.0f} output tok/s |")


if __name__ == "__main__":
    main()
