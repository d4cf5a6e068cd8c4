"""`aphro parity-check [MODEL]`: the engine against HF transformers logits (engine/validate/parity.py)."""

from __future__ import annotations

import json
import math
import sys

import click
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from aphro_cli.main import console, err_console, handle_errors
from aphro_cli.options import kv_cache_dtype_choice
from aphro_cli.progress import log_lines
from engine.errors import AphroError

_MAX_LISTED = 12
QUANTIZATION_CHOICES = ("fp8", "int8")  # parity quantizes a full-precision checkpoint


def _fmt(x: float | None, spec: str = ".1e") -> str:
    return "nan" if x is None or math.isnan(x) else format(x, spec)


def _table(*columns: str, title: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for c in columns:
        table.add_column(c, no_wrap=c not in ("first divergence", "point", "load"))
    return table


def _verdict(ok: bool) -> str:
    return "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"


@click.command("parity-check")
@click.argument("model", required=False)
@click.option("--dtype", default="auto", show_default=True,
              help="Engine dtype (HF always runs float32). auto: float32 on CPU, bf16 on GPU.")
@click.option("--device", default="auto", show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one prompt per line (default: 4 built-in prompts).")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, help="Tiny checkpoint weights, engine.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1),
              help="Tensor-parallel size of the engine.")
@click.option("--keep", is_flag=True, help="Keep the tiny checkpoint folder (path printed).")
@click.option("--atol", type=float, help="Override the logit absolute tolerance.")
@click.option("--rtol", type=float, help="Override the tolerance relative to max |logit|.")
@click.option("--kl", "kl", type=float, help="Override the KL(HF||engine) bound per position.")
@click.option("--quantization", "-q", type=click.Choice(QUANTIZATION_CHOICES), default=None,
              help="Quantize the engine's linear layers at load time (HF stays at full "
                   "precision); judged by top-1 agreement, mean KL and greedy prefix.")
@click.option("--kv-cache-dtype", type=kv_cache_dtype_choice(), default="auto",
              show_default=True, help="The engine's KV cache (fp8: judged by top-1 agreement, "
                                      "mean KL and greedy prefix, as FP8 weights are).")
@click.option("--min-top1", type=float, help="Override the least top-1 agreement of a run.")
@click.option("--mean-kl", type=float, help="Override the mean KL(HF||engine) bound of a run.")
@click.option("--min-greedy-prefix", type=float,
              help="Override the least mean share of greedy tokens before HF's and the "
                   "engine's continuations part.")
@click.option("--chunked/--no-chunked", default=True, show_default=True,
              help="Also run with chunked prefill (a 7-token step budget).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def parity_check(model, dtype, device, prompts_file, max_new_tokens, seed, tp, keep, atol, rtol,
                 kl, quantization, kv_cache_dtype, min_top1, mean_kl, min_greedy_prefix,
                 chunked, as_json):
    """Compare the engine's logits with HF transformers on MODEL and say where they diverge.

    MODEL is a registered architecture name (LlamaForCausalLM), a spec (a name in model_specs/
    or a .toml path) - both checked on a tiny random checkpoint - or a local HF checkpoint
    folder. Without MODEL every registered architecture is checked. Exit 0 when all pass,
    1 when any fails, 2 on a usage error.
    """
    from engine.models.registry import supported_architectures
    from engine.validate.parity import run_parity

    prompts = None
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise AphroError(f"{prompts_file}: no prompts (one per line)")
    kwargs = {"dtype": dtype, "device": device, "prompts": prompts, "seed": seed, "tp": tp,
              "max_new_tokens": max_new_tokens, "chunked_prefill": chunked, "keep": keep,
              "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
              "tolerances": {"atol": atol, "rtol": rtol, "kl": kl, "min_top1": min_top1,
                             "mean_kl": mean_kl, "min_greedy_prefix": min_greedy_prefix}}
    models = [model] if model else supported_architectures()
    reports, errors, shardings = [], {}, {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} models"), TimeElapsedColumn(),
                  console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("parity-check", total=len(models))
        log = log_lines(err_console, "parity-check")  # off a terminal: a line now and then
        for name in models:
            def say(msg: str) -> None:
                bar.update(task, description=msg)
            try:
                reports.append(run_parity(name, progress=say, **kwargs))
                if tp > 1:  # the shards of every parameter, reassembled (engine/validate/sharding.py)
                    from engine.validate.sharding import verify_model_sharding

                    say(f"{name}: sharding over {tp} ranks")
                    shardings[name] = verify_model_sharding(name, tp, device, dtype, seed,
                                                            quantization)
            except Exception as e:  # one model's failure, whatever it is, is that model's row
                if model:  # the one model asked for: a usage error (or a bug: exit 3)
                    raise
                msg = str(e).splitlines()[0] if str(e) else ""
                errors[name] = msg if isinstance(e, AphroError) else f"{type(e).__name__}: {msg}"
            bar.advance(task)
            log(len(reports) + len(errors), len(models))
    passed = (not errors and all(r.passed for r in reports)
              and all(s.ok for s in shardings.values()))
    if as_json:
        if model:
            click.echo(json.dumps(reports[0].to_dict() | (
                {"sharding": shardings[model].to_dict()} if shardings else {}), indent=2))
        else:
            click.echo(json.dumps({"passed": passed, "reports": [r.to_dict() for r in reports],
                                   "errors": errors} | ({"sharding": {
                                       n: s.to_dict() for n, s in shardings.items()}}
                                       if shardings else {}), indent=2))
    elif model:
        print_report(reports[0])
        if shardings:
            print_sharding(shardings[model])
    else:
        _print_summary(reports, errors)
        for name, s in shardings.items():
            console.print(f"{name}: sharding over {tp} ranks {_verdict(s.ok)}", highlight=False)
    sys.exit(0 if passed else 1)


def print_report(r) -> None:
    """One ParityReport in full: load, per-run table, tolerances, localization, verdict (also
    what `aphro register` shows when it refuses a model)."""
    quant = f", quantized {r.quantization}" if r.quantization != "none" else ""
    quant += f", KV cache {r.kv_cache_dtype}" if r.kv_cache_dtype != "auto" else ""
    console.print(f"[bold]{r.model}[/] ({r.source} {r.architecture}): engine {r.dtype} on "
                  f"{r.device}, tp {r.tp}{quant}, vs HF float32", highlight=False)
    if r.checkpoint and r.source == "tiny":
        console.print(f"tiny checkpoint kept in {r.checkpoint}", highlight=False)
    for w in r.warnings:
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    _print_load(r)
    if r.failure is not None:
        f = r.failure
        console.print(f"[bold red]engine failed[/] in the {f.stage}: {f.error}"
                      + (f"  [dim](in {f.module})[/]" if f.module else ""), highlight=False)
    if r.runs:
        table = _table("run", "#", "tokens", "max |Δ|", "rel", "top-1", "max KL", "greedy",
                       "result", title="logits at every position, engine vs HF (teacher-forced)")
        for run in r.runs:
            for p in run.prompts:
                greedy = ("equal" if p.first_mismatch is None
                          else f"@{p.first_mismatch}" + (" ok" if p.greedy_ok else " ✗"))
                table.add_row(run.name, str(p.index),
                              f"{p.num_prompt_tokens}+{len(p.engine_tokens)}",
                              _fmt(p.max_abs), _fmt(p.max_rel), f"{p.top1_agreement:.0%}",
                              _fmt(p.max_kl), greedy, _verdict(p.passed))
        console.print(table)
        _print_tolerances(r)
        for run in r.runs:
            for p in run.prompts:
                if p.outliers:
                    where = ", ".join(map(str, p.outliers[:6])) + (
                        ", …" if len(p.outliers) > 6 else "")
                    console.print(f"  {run.name} prompt {p.index}: {len(p.outliers)} position(s) "
                                  f"outside tolerance ({where}; the logits at position i "
                                  f"predict token i + 1, output token 0 at position "
                                  f"{p.num_prompt_tokens - 1})"
                                  + ("; excused" if p.logits_ok else ""), highlight=False)
                if p.first_mismatch is not None:
                    console.print(f"  {run.name} prompt {p.index}: {p.greedy_note}",
                                  highlight=False)
    if r.localization is not None and not r.passed:
        _print_localization(r.localization)
    console.print(_verdict(r.passed))


def _print_tolerances(r) -> None:
    t = r.tolerances
    where = (r.quantization if r.quantization != "none" else
             f"KV cache {r.kv_cache_dtype}" if r.kv_cache_dtype != "auto" else
             f"{r.dtype}, {r.device}")
    logit = (f"|Δ| ≤ {t.atol:g} + {t.rtol:g}·max|logit|, " if math.isfinite(t.atol) else "")
    console.print(f"tolerances ({where}): {logit}KL ≤ {t.kl:g}, greedy {t.greedy}"
                  + (f", up to {t.outliers:.0%} of positions outside if top-5 agrees"
                     if t.outliers else ""), highlight=False)
    if not t.judges_runs:
        return
    console.print(f"per run: top-1 ≥ {t.min_top1:.0%}, mean KL ≤ {t.mean_kl:g}, greedy prefix ≥ "
                  f"{t.min_greedy_prefix:.0%}" + (" (reported, not judged)"
                                                  if not t.min_greedy_prefix else ""),
                  highlight=False)
    for run in r.runs:
        console.print(f"  {run.name}: top-1 {run.top1_agreement:.1%}, mean KL {_fmt(run.mean_kl)},"
                      f" greedy prefix {run.greedy_prefix:.0%} "
                      + (_verdict(True) if run.aggregate_ok else
                         f"{_verdict(False)} ({run.aggregate_note})"), highlight=False)


def _print_load(r) -> None:
    load = r.load
    if load is None:  # the engine never loaded the weights: nothing to report
        return
    if r.load_ok:
        console.print("load: every checkpoint tensor used once, with the right shape",
                      highlight=False)
        return
    console.print("[bold red]load:[/] the checkpoint does not match the model", highlight=False)
    lines = ([f"missing (never loaded): {n}" for n in load.get("missing", [])]
             + [f"unused checkpoint tensor: {n}" for n in load.get("unexpected", [])]
             + [f"misshaped: {m['name']}: model expects {m['expected']}, checkpoint has "
                f"{m['got']}" for m in load.get("misshaped", [])])
    for line in lines[:_MAX_LISTED]:
        console.print(f"  {line}", highlight=False)
    if len(lines) > _MAX_LISTED:
        console.print(f"  … and {len(lines) - _MAX_LISTED} more (--json lists all)")
    for hint in r.load_hints:
        console.print(f"  [yellow]hint:[/] {hint}", highlight=False)


def _print_localization(loc) -> None:
    table = _table("point", "max |Δ|", "rel", title=f"hidden states, one prefill of "
                   f"{loc.num_tokens} tokens (diverged: rel > {loc.threshold:g})")
    for p in loc.points:
        style = "red" if p.diverged else None
        rel = p.note if p.max_abs is None else _fmt(p.rel)
        table.add_row(p.label, _fmt(p.max_abs), rel, style=style)
    console.print(table)
    console.print(f"[bold]{loc.verdict}[/]", highlight=False)


def _worst(values: list[float]) -> float | None:
    if any(math.isnan(v) for v in values):
        return float("nan")
    return max(values, default=None)


def print_sharding(s) -> None:
    """One ShardingReport: a row per parameter group, the failures, the logits comparison."""
    table = _table("group", "params", "elements", "sharding", "result",
                   title=f"sharding over {s.tp} ranks: every rank's pieces put back together "
                   "vs the TP=1 model, bit for bit")
    for g in s.groups():
        table.add_row(g.group, str(g.params), f"{g.elements:,}", escape(g.sharding),
                      _verdict(True) if g.ok else f"[bold red]{g.failed} FAIL[/]")
    console.print(table)
    for p in s.failures()[:_MAX_LISTED]:
        console.print(f"  [red]{p.name}[/] ({p.group}): {escape(p.problem)}", highlight=False)
    console.print(f"logits TP={s.tp} vs TP=1 ({s.prompt_len} prompt + {s.decode_steps} decode "
                  f"positions): max |Δ| {_fmt(s.logits_max_abs)} (≤ {s.logits_tolerance:g}), "
                  f"top-1 {s.top1_agreement:.0%}, argmax breaks {s.argmax_breaks or 'none'}",
                  highlight=False)
    console.print(_verdict(s.ok))


def _print_summary(reports, errors) -> None:
    where = {(r.dtype, r.device, r.quantization) for r in reports}
    table = _table("model", "max |Δ|", "max KL", "top-1", "greedy", "load", "result",
                   title="every registered model (tiny config) vs HF float32"
                   + "".join(f", engine {d} on {v}" + (f" quantized {q}" if q != "none" else "")
                             for d, v, q in sorted(where)))
    positions = sorted({sum(p.num_positions for run in r.runs for p in run.prompts)
                        for r in reports if r.runs})
    notes = []
    for r in reports:
        prompts = [p for run in r.runs for p in run.prompts]
        n = sum(p.num_positions for p in prompts)
        worst, kl = _worst([p.max_abs for p in prompts]), _worst([p.max_kl for p in prompts])
        top1 = (sum(p.top1_agreement * p.num_positions for p in prompts) / n) if n else None
        problems = sum(len((r.load or {}).get(k, []))
                       for k in ("missing", "unexpected", "misshaped"))
        load = "-" if r.load is None else "ok" if r.load_ok else f"[red]{problems} bad[/]"
        table.add_row(r.model, _fmt(worst), _fmt(kl),
                      "-" if top1 is None else f"{top1:.0%}",
                      f"{sum(p.greedy_ok for p in prompts)}/{len(prompts)}", load,
                      _verdict(r.passed))
        if not r.passed:
            notes.append(f"{r.model}: {_why(r)}")
        notes += [f"{r.model}: [bold yellow]warning:[/] {w}" for w in r.warnings]
    for name, msg in errors.items():
        table.add_row(name, "", "", "", "", "", _verdict(False))
        notes.append(f"{name}: [red]error:[/] {msg}")
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False)
    failed = [r.model for r in reports if not r.passed] + list(errors)
    total = len(reports) + len(errors)
    console.print(f"{total - len(failed)}/{total} models pass"
                  + (f" ({'/'.join(map(str, positions))} logit positions compared each)"
                     if positions else "")
                  + (f"; `aphro parity-check {failed[0]}` shows the details" if failed else ""),
                  highlight=False)


def _why(r) -> str:
    """One line for the summary's notes: every problem found, the load's tensors by name (the
    record's reason, engine.validate.proof.failure_reason, is the first problem only)."""
    parts = []
    for key, what in (("missing", "missing"), ("unexpected", "unused"),
                      ("misshaped", "misshaped")):
        names = [m["name"] if isinstance(m, dict) else m for m in (r.load or {}).get(key, [])]
        if names:
            parts.append(f"{len(names)} {what} tensors ({names[0]}"
                         + (", …)" if len(names) > 1 else ")"))
    if r.failure is not None:
        parts.append(f"engine failed: {r.failure.error}"
                     + (f" in {r.failure.module}" if r.failure.module else ""))
    if r.localization is not None and r.localization.first_divergence:
        parts.append(f"first divergence: {r.localization.first_divergence}")
    elif r.runs:
        parts.append("logits or greedy tokens out of tolerance")
    return "; ".join(parts)
