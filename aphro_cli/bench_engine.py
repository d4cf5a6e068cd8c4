"""`aphro bench throughput` and `aphro bench latency`: the engine's offline figures, each printed
with the hardware, the model, the workload, the KV budget and the roofline, and written as a
result record (engine.bench.results) with --json."""

from __future__ import annotations

import json
import tempfile

import click
from rich.markup import escape
from rich.table import Table

from aphro_cli.main import console, err_console, handle_errors
from aphro_cli.options import KV_CACHE_DTYPE_HELP, kv_cache_dtype_choice, quantization_choice

PRESET_HELP = ("Without MODEL: random weights of this shape, built on the device (tiny, llama-1b, "
               "llama-8b, qwen2.5-7b, mistral-7b, mixtral-8x7b). Default: llama-8b on a GPU, "
               "tiny on the CPU.")
DTYPE_HELP = "auto: the checkpoint's / bfloat16 on a GPU, float32 on the CPU."
JSON_HELP = "Write the result record (schema aphro.bench/1) to FILE; alone or '-': to stdout."

# options whose value never lands in a result record (nor a docs/PERF.md table): `--api-key ***`
SECRET_OPTIONS = frozenset({"--api-key"})
REDACTED = "***"


def command_line() -> str:
    """The running bench command as a user would type it: `aphro` + the command path + the
    options given on the command line (in declaration order), from click's context; the value
    of a SECRET_OPTIONS option (`--api-key X` or `--api-key=X`) written as `***`."""
    import shlex

    from click.core import ParameterSource

    ctx = click.get_current_context()
    names, c = [], ctx
    while c.parent is not None:  # the subcommands' names; the root's is the program's
        names.insert(0, c.info_name)
        c = c.parent
    words = [shlex.quote(w) for w in ("aphro", *names)]  # each quoted, REDACTED as it is
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words.append(shlex.quote(str(value)))
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            words.append(shlex.quote(flag))
            continue
        secret = not SECRET_OPTIONS.isdisjoint(param.opts)
        for v in value if param.multiple else (value,):
            words.append(shlex.quote(flag))
            if v != param.flag_value:
                words.append(REDACTED if secret else shlex.quote(str(v)))
    return " ".join(words)


def _emit(record: dict, json_path: str | None, append: bool = False) -> None:
    """The record to stdout (json_path "-") or to a file (a line appended with `append`)."""
    from engine.bench.results import to_json

    if json_path == "-":
        click.echo(to_json(record) if not append else json.dumps(record))
    elif json_path:
        with open(json_path, "a" if append else "w") as f:
            f.write((json.dumps(record) if append else to_json(record)) + "\n")


def _hint(json_path: str | None) -> None:
    """How to make the docs/PERF.md table of the file just written."""
    if json_path and json_path != "-":
        console.print(f"next: python scripts/perf_table.py {escape(json_path)}", highlight=False,
                      soft_wrap=True)


@click.command()
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--model-config", "--preset", "preset", default=None, help=PRESET_HELP)
@click.option("--random-weights", is_flag=True,
              help="With MODEL: read only its config.json, random weights (implied without "
                   "MODEL).")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), default=None,
              help='Prompts: a .jsonl of {"prompt": "..."} lines, or text, one prompt a line.')
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint folder whose tokenizer encodes --dataset (default: MODEL's).")
@click.option("--num-prompts", type=click.IntRange(1), default=None,
              help="Default 32 random prompts, or every prompt of --dataset.")
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens of each random prompt.")
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(1))
@click.option("--baseline", type=click.Choice(["hf", "none"]), default="hf", show_default=True,
              help="hf: HF transformers' generate_batch (continuous batching) and generate on "
                   "the same prompts in the same run.")
@click.option("--no-baseline", is_flag=True, help="Same as --baseline none.")
@click.option("--baseline-num-prompts", type=click.IntRange(1), default=None,
              help="HF runs on the first N prompts only (default: all).")
@click.option("--baseline-batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Prompts per HF generate call.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help=DTYPE_HELP)
@click.option("--quantization", "-q", type=quantization_choice(), default=None,
              help="The engine's scheme (HF runs the model unquantized).")
@click.option("--kv-cache-dtype", type=kv_cache_dtype_choice(), default="auto",
              show_default=True, help=KV_CACHE_DTYPE_HELP)
@click.option("--max-num-seqs", type=click.IntRange(1), default=None,
              help="Sequences in one step at most (default: the engine's).")
@click.option("--max-num-batched-tokens", type=click.IntRange(1), default=None)
@click.option("--max-model-len", type=click.IntRange(1), default=None,
              help="Default: the longest prompt + --output-len + 1.")
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs.")
@click.option("--seed", default=0, show_default=True, help="Random prompts and weights.")
@click.option("--json", "json_path", is_flag=False, flag_value="-", default=None,
              metavar="[FILE]", help=JSON_HELP)
@handle_errors
def throughput(model, preset, random_weights, dataset, tokenizer, num_prompts, input_len,
               output_len, baseline, no_baseline, baseline_num_prompts, baseline_batch_size,
               device, dtype, quantization, kv_cache_dtype, max_num_seqs,
               max_num_batched_tokens, max_model_len, enforce_eager, seed, json_path):
    """Offline generation throughput of the engine beside HF transformers (generate_batch and
    generate) on the same prompts, with the hardware, the KV budget and the roofline."""
    import torch

    from aphro_cli.progress import progress
    from engine.bench.engine_bench import (
        bench_model,
        dataset_prompts,
        random_prompts,
        run_throughput,
    )
    from engine.bench.hardware import measure_hardware
    from engine.bench.hf_baseline import run_hf_baselines
    from engine.bench.report import describe, throughput_record
    from engine.checkpoint.files import load_tokenizer
    from engine.config import load_config, resolve_device
    from engine.errors import ConfigError

    out = err_console if json_path == "-" else console
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    hw = measure_hardware(dev)
    with tempfile.TemporaryDirectory(prefix="aphro-bench-") as tmp:
        path, load_format, name, random = bench_model(model, preset, random_weights, on_gpu, tmp)
        if dtype == "auto" and model is None:
            dtype = "bfloat16" if on_gpu else "float32"
        vocab = load_config(path).get_text_config().vocab_size
        if dataset:
            tok = load_tokenizer(tokenizer or model) if (tokenizer or model) else None
            if tok is None:
                raise ConfigError("--dataset needs a tokenizer: give MODEL (a checkpoint folder "
                                  "with one) or --tokenizer DIR")
            prompts = dataset_prompts(dataset, tok, vocab, num_prompts)
        else:
            prompts = random_prompts(num_prompts or 32, input_len, vocab, seed)
        with progress(err_console, "bench throughput (aphro)", len(prompts)) as update:
            run = run_throughput(path, prompts, output_len, progress=update, device=str(dev),
                                 dtype=dtype, quantization=quantization,
                                 kv_cache_dtype=kv_cache_dtype, load_format=load_format,
                                 max_num_seqs=max_num_seqs, seed=seed,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 max_model_len=max_model_len, enforce_eager=enforce_eager)
        rows = [run["row"]]
        subset = prompts[:baseline_num_prompts or len(prompts)]
        if baseline == "hf" and not no_baseline:
            with progress(err_console, "bench throughput (HF generate)", len(subset)) as update:
                rows += run_hf_baselines(
                    path, subset, output_len, str(dev), getattr(torch, run["facts"]["dtype"]),
                    random, baseline_batch_size, progress=update,
                    say=lambda msg: err_console.print(msg, highlight=False))
        else:
            subset = []
    record = throughput_record(
        hw=hw, hf_config=run["hf_config"], facts=run["facts"], model_name=name,
        random_weights=random, prompt_lens=[len(p) for p in prompts], output_len=output_len,
        rows=rows, command=command_line(), workload={"dataset": dataset, "seed": seed,
                             "baseline_num_prompts": len(subset),
                             "baseline_batch_size": baseline_batch_size if subset else None})
    for line in describe(record):
        out.print(escape(line), highlight=False, soft_wrap=True)
    table = Table("", "prompts", "output tokens", "seconds", "output tok/s", "aphro / it")
    for r in record["results"]["rows"]:
        if "skipped" in r:
            out.print(f"[yellow]{escape(r['name'])} skipped:[/] {escape(r['skipped'])}",
                      highlight=False, soft_wrap=True)
            continue
        table.add_row(r["name"], str(r["requests"]), str(r["output_tokens"]),
                      f"{r['seconds']:.2f}", f"{r['output_tok_s']:,.1f}",
                      f"{r['ratio']:.2f}x" if r.get("ratio") else "-")
    out.print(table)
    _emit(record, json_path)
    _hint(json_path)


@click.command()
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--model-config", "--preset", "preset", default=None, help=PRESET_HELP)
@click.option("--random-weights", is_flag=True,
              help="With MODEL: read only its config.json, random weights.")
@click.option("--tp", "tp_sizes", type=click.IntRange(min=1), multiple=True,
              help="Tensor-parallel size; repeat to compare (--tp 1 --tp 2). Default 1.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1))
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--num-iters-warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option("--num-iters", default=10, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="auto: bfloat16 on a GPU, float32 on the CPU.")
@click.option("--eager-too", is_flag=True, help="Also run without CUDA graphs.")
@click.option("--eager", is_flag=True, hidden=True, help="Only without CUDA graphs.")
@click.option("--quantization", "-q", type=quantization_choice(), default=None)
@click.option("--kv-cache-dtype", type=kv_cache_dtype_choice(), default="auto",
              show_default=True, help=KV_CACHE_DTYPE_HELP)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", is_flag=False, flag_value="-", default=None,
              metavar="[FILE]",
              help="Append one result record (schema aphro.bench/1) a line per run to FILE; "
                   "alone or '-': to stdout.")
@handle_errors
def latency(model, preset, random_weights, tp_sizes, batch_size, input_len, output_len,
            num_iters_warmup, num_iters, device, dtype, eager_too, eager, quantization,
            kv_cache_dtype, seed, json_path):
    """Decode latency: TTFT and TPOT (p50 / p90 / p99 over the timed iterations) at a batch size
    and one or more tensor-parallel sizes.

    With MODEL the checkpoint's weights are loaded; without it only a config is written and the
    weights are random (nothing to download or save), so large shapes start in seconds. Several
    sizes run one after another.
    """
    from aphro_cli.progress import progress
    from engine.bench.engine_bench import bench_model
    from engine.bench.hardware import measure_hardware
    from engine.bench.latency import decode_latency
    from engine.bench.report import describe, latency_record
    from engine.bench.results import tpot_roofline_ratio
    from engine.config import resolve_device

    out = err_console if json_path == "-" else console
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    dtype = dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    hw = measure_hardware(dev)
    runs = [(tp, e) for e in ((False, True) if eager_too else (eager,)) for tp in tp_sizes or (1,)]
    table = Table("TP", "CUDA graphs", "TTFT ms p50 / p90 / p99", "TPOT ms p50 / p90 / p99",
                  "TPOT mean", "tok/s", "weights/rank GB", "TPOT / roofline")
    for tp, e in runs:  # one engine after another, in this process
        with tempfile.TemporaryDirectory(prefix="aphro-bench-") as tmp:
            path, load_format, name, random = bench_model(model, preset, random_weights,
                                                          on_gpu, tmp)
            label = (f"latency {name} {dtype} TP={tp}{' eager' if e else ''} batch "
                     f"{batch_size}: {input_len} + {output_len} tokens")
            with progress(err_console, label, num_iters_warmup + num_iters) as update:
                run = decode_latency(path, tp, input_len, output_len, dtype=dtype,
                                     device=str(dev), load_format=load_format, enforce_eager=e,
                                     seed=seed, quantization=quantization,
                                     kv_cache_dtype=kv_cache_dtype, batch_size=batch_size,
                                     num_iters_warmup=num_iters_warmup, num_iters=num_iters,
                                     progress=update)
        record = latency_record(
            hw=hw, hf_config=run["hf_config"], facts=run["facts"], model_name=name,
            random_weights=random, results=run["results"], command=command_line(),
            workload={"batch_size": batch_size, "input_len": input_len,
                      "output_len": output_len, "tp": tp, "num_iters": num_iters,
                      "num_iters_warmup": num_iters_warmup, "seed": seed})
        for line in describe(record):
            out.print(escape(line), highlight=False, soft_wrap=True)
        r, ratio = record["results"], tpot_roofline_ratio(record)
        table.add_row(str(tp), str(r["engine"]["cuda_graphs"]), _pcts(r["ttft"]), _pcts(r["tpot"]),
                      f"{r['tpot']['mean_ms']:.3f}", f"{r['decode_tok_s']:.1f}",
                      f"{record['model']['weight_bytes_per_rank'] / 1e9:.2f}",
                      f"{ratio:.2f}x" if ratio is not None else "-")
        _emit(record, json_path, append=True)
    out.print(table)
    _hint(json_path)


def _pcts(s: dict) -> str:
    return f"{s['p50_ms']:.3f} / {s['p90_ms']:.3f} / {s['p99_ms']:.3f}"
