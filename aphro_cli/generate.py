"""`aphro generate`: run prompts through the engine."""

from __future__ import annotations

import json

import click
from rich.table import Table

from aphro_cli.main import console, err_console, handle_errors
from aphro_cli.options import check_validated_model, strict_option, with_engine_options


@click.command()
@click.argument("model")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="Repeatable.")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=-1, show_default=True)
@click.option("--sampling-seed", type=int, default=None, help="Seed of the request's sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@strict_option
@with_engine_options
@handle_errors
def generate(model, prompts, max_tokens, temperature, top_p, top_k, sampling_seed, as_json,
             strict, engine):
    """Generate completions for PROMPTs with MODEL: a local HF checkpoint folder, or a
    registered architecture or spec (run on a tiny random-weight checkpoint)."""
    from engine import LLM, SamplingParams
    from engine.validate.tiny import model_folder

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=sampling_seed, max_tokens=max_tokens)
    with model_folder(model, say=lambda msg: err_console.print(msg, highlight=False)) as path:
        check_validated_model(path, strict)
        with LLM(str(path), **engine) as llm:
            outputs = llm.generate(list(prompts), params)
    rows = [{"prompt": o.prompt, "text": o.outputs[0].text,
             "tokens": len(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason} for o in outputs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("prompt", "completion", "tokens", "finish")
    for r in rows:
        table.add_row(r["prompt"], r["text"], str(r["tokens"]), r["finish_reason"])
    console.print(table)
