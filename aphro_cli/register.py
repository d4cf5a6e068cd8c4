"""`aphro register MODEL` / `aphro unregister ARCH`: the user registry, with proof
(engine/validate/register.py); `aphro register --in-tree` rewrites the in-tree records."""

from __future__ import annotations

import contextlib
import sys

import click
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from aphro_cli.main import console, err_console, handle_errors
from aphro_cli.parity import print_report, print_sharding
from engine.errors import AphroError


@contextlib.contextmanager
def _progress():
    """say(msg) on a transient spinner line (nothing off a terminal)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("register")
        yield lambda msg: bar.update(task, description=msg)


def _figures(rec) -> str:
    w = rec.worst or {}
    parts = [f"{rec.dtype} on {rec.device}, tp {rec.tp}"]
    if w.get("max_abs") is not None:
        parts.append(f"max |Δ| {w['max_abs']:.1e}, max KL {w['max_kl']:.1e}, "
                     f"greedy {w['greedy']}")
    return "; ".join(parts)


@click.command()
@click.argument("model", required=False)
@click.option("--arch", "architecture", metavar="NAME",
              help="The HF architecture to register (default: the spec's first, the class's "
                   "name, the checkpoint's).")
@click.option("--dtype", default="auto", show_default=True,
              help="Engine dtype of the check (HF runs float32).")
@click.option("--device", default="auto", show_default=True)
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1),
              help="Tensor-parallel size: > 1 also verifies the sharding.")
@click.option("--seed", default=0, show_default=True, help="Tiny checkpoint weights, engine.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--chunked/--no-chunked", default=True, show_default=True,
              help="Also check chunked prefill.")
@click.option("--force", is_flag=True,
              help="Replace a name something else serves; register a model that fails as "
                   "'not validated'.")
@click.option("--in-tree", "in_tree", is_flag=True,
              help="Re-validate the in-tree models whose committed record is missing or stale "
                   "and rewrite engine/models/validation.json.")
@handle_errors
def register(model, architecture, dtype, device, tp, seed, max_new_tokens, chunked, force,
             in_tree):
    """Validate MODEL against HF transformers and record it in the user registry with the
    report it passed. MODEL: a spec (name in model_specs/ or .toml path), module:Class, a
    checkpoint folder, or a registered architecture (checked again). A model that fails is
    refused, the parity table shown, nothing written (exit 1). The registry file is
    $APHRO_REGISTRY, else ~/.config/aphro/registry.json."""
    check = {"dtype": dtype, "device": device, "tp": tp, "seed": seed,
             "max_new_tokens": max_new_tokens, "chunked": chunked}
    if in_tree:
        if model or architecture or force:
            raise AphroError("--in-tree takes no MODEL, --arch or --force")
        _in_tree(check)
        return
    if not model:
        raise AphroError("no MODEL: aphro register SPEC | module:Class | FOLDER | ARCH "
                         "(or --in-tree)")
    from engine.validate.register import register as register_model

    with _progress() as say:
        reg = register_model(model, architecture=architecture, force=force, progress=say,
                             **check)
    arch, rec = reg.candidate.architecture, reg.record
    proof = reg.proof
    if not reg.written:
        print_report(proof.report)
        if proof.sharding is not None:
            print_sharding(proof.sharding)
        err_console.print(
            f"[bold red]refused:[/] {escape(arch)} ({escape(rec.target)}) failed validation: "
            f"{escape(rec.reason)}. Nothing was written to {escape(str(reg.path))}; fix the "
            "model and register it again, or add --force to register it as not validated.",
            highlight=False, soft_wrap=True)
        sys.exit(1)
    if rec.status != "passed" and proof is not None:
        print_report(proof.report)
    verdict = ("[bold green]passed[/]" if rec.status == "passed"
               else f"[bold yellow]{rec.status.upper()}[/]: {escape(rec.reason)}")
    console.print(f"registered [bold]{escape(arch)}[/] -> {escape(rec.target)}: {verdict} "
                  f"({escape(_figures(rec))})", highlight=False, soft_wrap=True)
    if reg.replaces:
        console.print(f"replaces {escape(reg.replaces)}", highlight=False, soft_wrap=True)
    elif reg.previous is not None:
        console.print(f"replaces its record of {reg.previous.date} ({reg.previous.status})",
                      highlight=False)
    console.print(f"in {escape(str(reg.path))}", highlight=False, soft_wrap=True)


def _in_tree(check: dict) -> None:
    from engine.models import records
    from engine.validate.register import refresh_in_tree_records

    with _progress() as say:
        outcome = refresh_in_tree_records(progress=say, **check)
    for arch, what in sorted(outcome.items()):
        if what != "kept":
            style = {"passed": "green", "failed": "bold red"}.get(what, "yellow")
            console.print(f"{arch}: [{style}]{what}[/]", highlight=False)
    kept = sum(what == "kept" for what in outcome.values())
    console.print(f"{kept} in-tree record(s) up to date, "
                  f"{len(outcome) - kept} rewritten: {records.IN_TREE_RECORDS}", highlight=False,
                  soft_wrap=True)
    if "failed" in outcome.values():
        sys.exit(1)


@click.command()
@click.argument("architecture")
@handle_errors
def unregister(architecture):
    """Remove ARCHITECTURE from the user registry (models added with `aphro register`)."""
    from engine.models.records import registry_path
    from engine.models.registry import target_name
    from engine.validate.register import unregister as unregister_model

    removed, now = unregister_model(architecture)
    console.print(f"unregistered {escape(architecture)} ({escape(removed.target)}, "
                  f"{removed.status} {removed.date[:10]}) from {escape(str(registry_path()))}",
                  highlight=False, soft_wrap=True)
    console.print(f"now served by {escape(target_name(now.target))} ({now.origin})" if now
                  else f"nothing serves {escape(architecture)} now", highlight=False,
                  soft_wrap=True)
