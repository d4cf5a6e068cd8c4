"""`aphro new-model`: generate model modules from specs, start a new spec from a family's, or
write an explicit (hand-editable) model file from a family."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from aphro_cli.main import console, handle_errors
from engine.errors import AphroError


@click.command()
@click.argument("specs", nargs=-1)
@click.option("--like", metavar="FAMILY", help="Start NAME from FAMILY's spec (e.g. llama).")
@click.option("--explicit", is_flag=True,
              help="With --like: write an explicit model file NAME.py (yours to edit, never "
                   "regenerated) instead of a spec.")
@click.option("--arch", "architecture", metavar="CLASS",
              help="With --like: the HF architecture name (default: transformers' class of "
                   "model type NAME, else <Name>ForCausalLM).")
@click.option("--model-type", metavar="TYPE",
              help="With --like: the HF model_type whose transformers code is the parity "
                   "reference (default: NAME if transformers knows it, else FAMILY's).")
@click.option("--all", "all_specs", is_flag=True, help="Regenerate every spec in --specs-dir.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The project folder to write into (model_specs/ and aphro_models/). "
                   "Default: this checkout inside it, else the current directory.")
@click.option("--specs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where specs are read (and --like writes). Default: the project's "
                   "model_specs/.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where model modules are written. Default: the project's models folder.")
@click.option("--force", is_flag=True, help="Overwrite files that were not generated.")
@handle_errors
def new_model(specs, like, explicit, architecture, model_type, all_specs, out, specs_dir,
              out_dir, force):
    """Generate a model module from each SPEC (a model_specs/*.toml path or a family name) and
    register its architectures. With --like FAMILY, SPEC is the NAME of a new spec to start
    from FAMILY's; with --like FAMILY --explicit, of a new explicit model file.

    Inside the aphro checkout the files go to model_specs/ and engine/models/; elsewhere to
    the project in the current directory (or --out DIR): DIR/model_specs/ and
    DIR/aphro_models/, which aphro finds when run in DIR."""
    from engine.spec import generator
    from engine.spec.project import project_for

    project = project_for(out)
    specs_dir = specs_dir or project.specs_dir
    package = project.package if out_dir is None else None
    out_dir = out_dir or project.models_dir
    if explicit and not like:
        raise AphroError("--explicit goes with --like: aphro new-model NAME --like llama --explicit")
    if like:
        if len(specs) != 1 or all_specs:
            raise AphroError(
                "--like FAMILY takes exactly one NAME: aphro new-model NAME --like llama")
        if explicit:
            _explicit(specs[0], like, specs_dir, out_dir, package, architecture, model_type,
                      force, project)
            return
        path, ident = generator.new_spec_like(specs[0], like, specs_dir, architecture, force,
                                              model_type)
        console.print(f"wrote [bold]{_shown(path)}[/] (from {like}, in {project.describe()})",
                      highlight=False)
        _notes(ident.notes)
        console.print(f"next: edit it, then run [bold]aphro new-model {_shown(path)}"
                      + _out_flags(out, specs_dir, out_dir, project) + "[/]", highlight=False,
                      soft_wrap=True)
        return
    if architecture or model_type:
        raise AphroError("--arch and --model-type only go with --like")
    paths = [generator.resolve_spec(s, specs_dir) for s in specs]
    if all_specs:
        paths += generator.spec_paths(specs_dir)
    if not paths:
        raise AphroError("no spec given: aphro new-model model_specs/NAME.toml (or --all)")
    from engine.spec.loader import load_spec

    loaded = [load_spec(p) for p in dict.fromkeys(paths)]  # every spec valid before any write
    for spec in loaded:
        written, registered = generator.generate(spec, out_dir, force, package)
        for w in written:
            console.print(f"{w.status:>9} {_shown(w.path)}", highlight=False)
        for arch, target in registered.items():
            console.print(f"registered {arch} -> {target}", highlight=False, soft_wrap=True)
    where = _cd(project)
    if len(loaded) == 1:
        console.print(f"next: [bold]{where}aphro parity-check {loaded[0].model.name}[/]",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"next: [bold]{where}aphro parity-check NAME[/] for each of them",
                      highlight=False, soft_wrap=True)


def _explicit(name, like, specs_dir, out_dir, package, architecture, model_type, force,
              project) -> None:
    from engine.spec.explicit import write_explicit
    from engine.spec.project import DEFAULT_SPECS_DIR

    target, registry, registered, ident = write_explicit(
        name, like, [specs_dir, DEFAULT_SPECS_DIR], out_dir, package, architecture, model_type,
        force)
    console.print(f"wrote [bold]{_shown(target)}[/] (explicit, from {like}, in "
                  f"{project.describe()}): yours to edit, nothing regenerates it", highlight=False)
    for arch, where in registered.items():
        console.print(f"registered {arch} -> {where} ({_shown(registry)})", highlight=False,
                      soft_wrap=True)
    _notes(ident.notes)
    console.print(f"next: [bold]{_cd(project)}aphro parity-check {ident.architecture}[/]",
                  highlight=False, soft_wrap=True)


def _notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _out_flags(out, specs_dir, out_dir, project) -> str:
    """The flags the next `aphro new-model` needs to write where this one did."""
    flags = ""
    if out is not None and not _is_cwd(out):
        flags += f" --out {_shown(out)}"
    if out_dir != project.models_dir:
        flags += f" --out-dir {_shown(out_dir)}"
    return flags


def _cd(project) -> str:
    """`cd DIR && ` when the project is not the current directory (aphro finds a project's
    models from its folder)."""
    if project.root is None or _is_cwd(project.root):
        return ""
    return f"cd {_shown(project.root)} && "


def _is_cwd(path: Path) -> bool:
    return Path(path).resolve() == Path.cwd().resolve()


def _shown(path: Path) -> str:
    """path relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
