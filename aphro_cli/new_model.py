"""`aphro new-model`: generate model modules from specs, or start a new spec from an existing one."""

from __future__ import annotations

from pathlib import Path

import click

from aphro_cli.main import console, handle_errors
from engine.errors import AphroError


@click.command()
@click.argument("specs", nargs=-1)
@click.option("--like", metavar="FAMILY", help="Start spec NAME from FAMILY's spec (e.g. llama).")
@click.option(
    "--arch",
    "architecture",
    metavar="CLASS",
    help="With --like: the HF architecture name (default: <Name>ForCausalLM).",
)
@click.option("--all", "all_specs", is_flag=True, help="Regenerate every spec in --specs-dir.")
@click.option(
    "--specs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where specs are read (and --like writes). Default: model_specs/.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where model modules are written. Default: engine/models/.",
)
@click.option("--force", is_flag=True, help="Overwrite files that were not generated.")
@handle_errors
def new_model(specs, like, architecture, all_specs, specs_dir, out_dir, force):
    """Generate engine/models/<name>.py from each SPEC (a model_specs/*.toml path or a family
    name) and register its architectures. With --like FAMILY, SPEC is the NAME of a new spec to
    start from FAMILY's."""
    from engine.spec import generator

    specs_dir = specs_dir or generator.DEFAULT_SPECS_DIR
    out_dir = out_dir or generator.DEFAULT_OUT_DIR
    if like:
        if len(specs) != 1 or all_specs:
            raise AphroError(
                "--like FAMILY takes exactly one NAME: aphro new-model NAME --like llama"
            )
        path = generator.new_spec_like(specs[0], like, specs_dir, architecture, force)
        console.print(f"wrote [bold]{_shown(path)}[/] (from {like})", highlight=False)
        console.print(f"next: edit it, then run [bold]aphro new-model {_shown(path)}[/]")
        return
    if architecture:
        raise AphroError("--arch only goes with --like")
    paths = [generator.resolve_spec(s, specs_dir) for s in specs]
    if all_specs:
        paths += generator.spec_paths(specs_dir)
    if not paths:
        raise AphroError("no spec given: aphro new-model model_specs/NAME.toml (or --all)")
    from engine.spec.loader import load_spec

    loaded = [load_spec(p) for p in dict.fromkeys(paths)]  # every spec valid before any write
    for spec in loaded:
        written, registered = generator.generate(spec, out_dir, force)
        for w in written:
            console.print(f"{w.status:>9} {_shown(w.path)}", highlight=False)
        for arch, target in registered.items():
            console.print(f"registered {arch} -> {target}", highlight=False, soft_wrap=True)
    if len(loaded) == 1:
        console.print(f"next: [bold]aphro parity-check {loaded[0].model.name}[/]")
    else:
        console.print("next: [bold]aphro parity-check NAME[/] for each of them")


def _shown(path: Path) -> str:
    """path relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
