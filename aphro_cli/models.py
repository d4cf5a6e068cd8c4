"""`aphro models [ARCH]`: every known architecture, where it comes from, what it is built of and
its last validation (engine/models/catalog.py)."""

from __future__ import annotations

import json
import sys

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aphro_cli.main import console, err_console, handle_errors

_STATUS = {"passed": "[green]pass[/]", "failed": "[bold red]FAIL[/]",
           "not validated": "[yellow]not validated[/]", "missing": "[dim]none[/]"}


def _features(f: dict) -> str:
    """The spec's mechanisms (a class without a spec has none to show) and its schemes."""
    if not f:
        return "-"
    parts = [f["attention"], f["position"]] if f.get("attention") is not None else []
    parts += ["moe"] if f.get("moe") else []
    parts += ["sliding window"] if f.get("sliding_window") else []
    parts += [f"quant: {'/'.join(f['quantization'])}"] if f.get("quantization") else []
    return ", ".join(parts) or "-"


def _validation(e) -> tuple[str, str, str, str]:
    """(status, when, where, worst |Δ|) cells."""
    status = _STATUS[e.status] + (" [bold yellow](stale)[/]" if e.stale else "")
    rec = e.record
    if rec is None:
        return status, "", "", ""
    worst = (rec.worst or {}).get("max_abs")
    return (status, rec.date[:10], f"{rec.dtype} {rec.device} tp{rec.tp}",
            "" if worst is None else f"{worst:.1e}")


@click.command()
@click.argument("architecture", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def models(architecture, as_json):
    """List every known architecture: its source (in-tree generated or explicit, spec, plugin
    entry point, user registry), spec or module, features and last validation; a record whose
    model source changed since is stale. With ARCHITECTURE, its full record."""
    from engine.models.catalog import describe, list_models
    from engine.models.records import registry_path

    if architecture:
        entry = describe(architecture)
        if as_json:
            click.echo(json.dumps(entry.to_dict(), indent=2))
        else:
            _print_entry(entry)
        return
    entries, error = list_models()
    if as_json:
        click.echo(json.dumps({"registry": str(registry_path()), "registry_error": error,
                               "models": [e.to_dict() for e in entries]}, indent=2))
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for c in ("architecture", "source", "spec / module", "features", "validation", "when",
                  "where", "max |Δ|"):
            table.add_column(c, no_wrap=c in ("architecture", "when", "where", "max |Δ|"))
        for e in entries:
            table.add_row(e.architecture, e.source, escape(e.spec or e.module or e.target),
                          _features(e.features) if not e.error else "[red]import error[/]",
                          *_validation(e))
        _wide().print(table)
        console.print(f"user registry: {escape(str(registry_path()))}; `aphro models ARCH` "
                      "shows one model's full record", highlight=False, soft_wrap=True)
    if error:
        err_console.print(f"[bold red]error:[/] {escape(error)}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)


def _print_entry(e) -> None:
    rows = [("architecture", e.architecture), ("source", e.source), ("target", e.target),
            ("spec", e.spec or "-"), ("module", e.module or "-"),
            ("features", _features(e.features)),
            ("validation", _STATUS[e.status] + (" (record from the " + e.record_from + ")"
                                                if e.record_from else ""))]
    if e.error:
        rows.append(("import error", f"[red]{escape(e.error)}[/]"))
    if e.stale:
        rows.append(("stale", "[bold yellow]changed since validated:[/] "
                     + escape(", ".join(e.changed))))
    rows += [("overrides", escape(o)) for o in e.overrides]
    rec = e.record
    if rec is not None:
        worst = rec.worst or {}
        rows += [("date", rec.date),
                 ("versions", ", ".join(f"{k} {v}" for k, v in rec.versions.items())),
                 ("checked on", f"{rec.dtype} on {rec.device}, tp {rec.tp}; "
                  + ", ".join(f"{k} {v}" for k, v in rec.checks.items())),
                 ("checkpoint", " ".join(str(rec.checkpoint.get(k) or "")
                                         for k in ("kind", "path", "hash"))),
                 ("worst", ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in worst.items()) or "-"),
                 ("tolerances", ", ".join(f"{k} {v}" for k, v in (rec.tolerances or {}).items())
                  or "-")]
        if rec.sharding:
            rows.append(("sharding", ", ".join(f"{k} {v}" for k, v in rec.sharding.items())))
        if rec.reason:
            rows.append(("reason", escape(rec.reason)))
        rows.append(("sources", "\n".join(f"{escape(name)} {digest}"
                                           for name, digest in rec.sources.items())))
    table = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    _wide().print(table)


def _wide() -> Console:
    """The terminal's console; off a terminal a wide one, so that no cell is cut."""
    return console if console.is_terminal else Console(width=200, emoji=False)
