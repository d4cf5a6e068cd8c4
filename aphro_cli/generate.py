"""`aphro generate`: run prompts through the engine; `aphro models`: list what is registered."""

from __future__ import annotations

import json

import click
from rich.table import Table

from aphro_cli.main import console, handle_errors


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="Repeatable.")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=-1, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--max-model-len", type=int, default=None)
@click.option("--tp", "tp", default=1, show_default=True, help="Tensor-parallel size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def generate(model, prompts, max_tokens, temperature, top_p, top_k, seed, dtype, device,
             max_model_len, tp, as_json):
    """Generate completions for PROMPTs with the checkpoint in MODEL (a local HF folder)."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_tokens=max_tokens)
    llm = LLM(model, dtype=dtype, device=device, max_model_len=max_model_len,
              tensor_parallel_size=tp)
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


@click.command()
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def models(as_json):
    """List the registered architectures and the class serving each."""
    from engine.models.registry import resolve, supported_architectures

    rows = {arch: str(resolve(arch)) for arch in supported_architectures()}
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("architecture", "class")
    for arch, target in rows.items():
        table.add_row(arch, target)
    console.print(table)
