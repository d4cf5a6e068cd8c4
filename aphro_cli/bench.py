"""`aphro bench`: figures, not tests. Each prints the workload and the baseline beside it."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.table import Table

from aphro_cli.bench_engine import command_line, latency, throughput
from aphro_cli.main import console, err_console, handle_errors
from engine.errors import AphroError


@click.group()
def bench() -> None:
    """Benchmarks: kernels against copy bandwidth / torch SDPA, the engine against HF, a
    running server under load."""


@bench.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def kernels(device, dtype, as_json):
    """Time every Triton kernel: GB/s vs device copy bandwidth, or TFLOP/s vs torch SDPA."""
    import torch

    from engine.bench.kernels import run_kernel_bench

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        console.print("[yellow]no GPU: Triton's interpreter, tiny shapes; the figures only show "
                      "that every kernel runs[/]")
    rows = run_kernel_bench(device, getattr(torch, dtype), print_rows=False)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("kernel", "shape", "ms", "achieved", "ratio", "vs")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        table.add_row(r["kernel"], r["shape"], f"{r['ms']:.4f}", f"{r['value']:.1f} {r['unit']}",
                      ratio, r["baseline"])
    console.print(table)


bench.add_command(throughput)
bench.add_command(latency)


@bench.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--tokens", default="1,16", show_default=True,
              help="Comma-separated token counts (rows of x).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def gemv(device, tokens, as_json):
    """Decode-sized linears of Llama-3-8B inside a CUDA graph, weights rotated past L2: cuBLAS
    bf16, the small-M kernel (bf16, fp8, int8), _scaled_mm fp8, the tiled int8 kernel."""
    import torch

    from engine.bench.gemv_bench import print_gemv_table, run_gemv_bench
    from engine.config import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        err_console.print("[yellow]no GPU: Triton's interpreter, a tiny shape; the figures only "
                          "show that every variant runs[/]")
    rows = run_gemv_bench(str(dev), tuple(int(t) for t in tokens.split(",")), print_rows=False)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_gemv_table(rows, torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")


CPU_QUANT_BENCH = ("aphro bench quantization --device cpu --dtype float32 --preset tiny "
                   "--parity-preset tiny --num-prompts 4 --input-len 32 --output-len 32 "
                   "--latency-input-len 16 --latency-output-len 16")


@bench.command("quantization")
@click.option("--preset", default="llama-8b", show_default=True,
              help="Random-weight Llama shape of the TPOT / throughput runs.")
@click.option("--schemes", default="none,fp8,int8", show_default=True,
              help="Comma-separated; the first is the baseline of the ratios.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--num-prompts", default=1000, show_default=True)
@click.option("--input-len", default=256, show_default=True)
@click.option("--output-len", default=256, show_default=True)
@click.option("--latency-input-len", default=128, show_default=True,
              help="Prompt tokens of the batch-1 TPOT run.")
@click.option("--latency-output-len", default=128, show_default=True)
@click.option("--parity-preset", default="llama-1b", show_default=True,
              help="Random checkpoint the parity figures run on; 'none' to skip.")
@click.option("--matmuls", is_flag=True, help="Also time each linear shape's matmul.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the report as JSON to this file.")
@handle_errors
def quantization(preset, schemes, device, dtype, num_prompts, input_len, output_len,
                 latency_input_len, latency_output_len, parity_preset, matmuls, json_path):
    """bf16 vs fp8 vs int8 in one run: batch-1 TPOT, offline throughput, weight memory and
    parity against HF float32 (the table of docs/PERF.md)."""
    import torch

    from engine.bench.quant_bench import compare_quantization, quant_matmul_bench

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AphroError("bench quantization runs on a GPU by default (--device cuda), and "
                         f"none is here: for a small run on the CPU: {CPU_QUANT_BENCH}")
    report = compare_quantization(
        preset, tuple(s.strip() for s in schemes.split(",")), device, dtype,
        latency_input=latency_input_len, latency_output=latency_output_len,
        num_prompts=num_prompts, input_len=input_len, output_len=output_len,
        parity_preset=None if parity_preset == "none" else parity_preset,
        progress=lambda msg: err_console.print(msg, highlight=False))
    if matmuls:
        report["matmuls"] = quant_matmul_bench(preset, device=device)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    table = Table("scheme", "TPOT ms", "x", "tok/s", "x", "weights GB", "x", "top-1",
                  "mean KL", "greedy prefix", "parity")
    for r in report["rows"]:
        p = r.get("parity") or {}
        table.add_row(r["scheme"], f"{r['tpot_ms']:.3f}", f"{r['tpot_ratio']:.2f}",
                      f"{r['throughput_tok_s']:.0f}", f"{r['throughput_ratio']:.2f}",
                      f"{r['weight_gb']:.2f}", f"{r['weight_ratio']:.2f}",
                      f"{p['top1']:.1%}" if "top1" in p else "-",
                      f"{p['mean_kl']:.2e}" if "mean_kl" in p else "-",
                      f"{p['greedy_prefix']:.0%}" if "greedy_prefix" in p else "-",
                      ("PASS" if p.get("passed") else "FAIL") if p else "-")
    console.print(f"{preset} {dtype} on {report['rows'][0]['device']}: TPOT batch 1 "
                  f"({report['latency']} tokens), throughput {report['throughput']}, parity on "
                  f"{report['parity_preset']} vs HF float32")
    console.print(table)
    for m in report.get("matmuls", []):
        console.print(f"  {m['layer']:8s} m={m['m']:<5d} bf16 {m['bf16_ms']:.4f} ms  int8 "
                      f"{m['int8_ms']:.4f} ms" + (f"  fp8 {m['fp8_ms']:.4f} ms"
                                                  if "fp8_ms" in m else ""), highlight=False)


@bench.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="The server: aphro serve, or any OpenAI-compatible one.")
@click.option("--endpoint", default="/v1/completions", show_default=True,
              type=click.Choice(["/v1/completions", "/v1/chat/completions"]))
@click.option("--model", default=None, help="Model name to send (default: the server's first).")
@click.option("--num-prompts", default=100, show_default=True, type=click.IntRange(1))
@click.option("--random-input-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--random-output-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--request-rate", default="inf", show_default=True,
              help="Requests per second (Poisson arrivals), or inf: all at once.")
@click.option("--max-concurrency", default=None, type=click.IntRange(1),
              help="Requests in flight at most.")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --random-output-len tokens.")
@click.option("--seed", default=0, show_default=True)
@click.option("--api-key", envvar="APHRO_API_KEY", default=None, show_envvar=True)
@click.option("--tokenizer", default=None, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint folder for the vocabulary (default: the server's "
                   "/tokenizer_info).")
@click.option("--save-result", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def serve_bench(base_url, endpoint, model, num_prompts, random_input_len, random_output_len,
                request_rate, max_concurrency, ignore_eos, seed, api_key, tokenizer,
                save_result, as_json):
    """Online serving benchmark against a running server, as `vllm bench serve` measures it:
    request and token throughput, TTFT, TPOT, ITL, end-to-end latency, failures."""
    from aphro_cli.progress import progress
    from engine.bench.results import to_json, write_record
    from engine.bench.serve_bench import ServeBenchConfig, run_serve_bench, serve_record
    from engine.errors import ConfigError

    try:
        rate = float(request_rate)
    except ValueError:
        raise ConfigError(f"--request-rate {request_rate!r}: a number or inf") from None
    config = ServeBenchConfig(base_url, endpoint, model, num_prompts, random_input_len,
                              random_output_len, rate, max_concurrency, ignore_eos, seed,
                              api_key, tokenizer)
    with progress(err_console, "bench serve", num_prompts) as update:
        report = run_serve_bench(config, update)
    if save_result or as_json:
        record = serve_record(report, command=command_line(), seed=seed)
        if save_result:
            write_record(record, save_result)
        if as_json:
            click.echo(to_json(record))
            return
    console.print(f"{report['model']} at {base_url}{endpoint}: {num_prompts} prompts x "
                  f"{random_input_len} in / {random_output_len} out, rate {report['request_rate']}"
                  f", max concurrency {max_concurrency or '-'}", highlight=False, soft_wrap=True)
    table = Table("metric", "value")
    table.add_row("successful / failed requests", f"{report['completed']} / {report['failed']}")
    table.add_row("duration (s)", f"{report['duration']:.2f}")
    table.add_row("request throughput (req/s)", f"{report['request_throughput']:.2f}")
    table.add_row("output throughput (tok/s)", f"{report['output_throughput']:.1f}")
    table.add_row("total throughput (tok/s)", f"{report['total_token_throughput']:.1f}")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        table.add_row(f"{label} ms (mean / median / p99)",
                      f"{report[f'mean_{key}_ms']:.2f} / {report[f'median_{key}_ms']:.2f} / "
                      f"{report[f'p99_{key}_ms']:.2f}")
    console.print(table)
    for error in report["errors"]:
        err_console.print(f"[red]failed:[/] {escape(error)}", soft_wrap=True)
