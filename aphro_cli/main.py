"""`aphro`: thin click commands over engine functions. User errors print one line, no traceback."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import traceback
from typing import ClassVar

import click
from rich.console import Console
from rich.markup import escape

from engine.errors import AphroError

WIDE_COLUMNS = 200  # rich's width when the output is not a terminal (a log, a pipe)


def make_console(stderr: bool = False) -> Console:
    """A console as wide as the terminal, or WIDE_COLUMNS off a terminal (rich would wrap a
    log at 80); COLUMNS, when set, wins."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    # no emoji codes: "pkg.mod:X: ..." in a message must not become "pkg.mod❌ ..."
    return Console(stderr=stderr, emoji=False,
                   width=None if tty or os.environ.get("COLUMNS") else WIDE_COLUMNS)


console = make_console()
err_console = make_console(stderr=True)


def handle_errors(fn):
    """User errors (AphroError) print as one red line and exit 2. Anything else is a bug in aphro:
    one line naming it and a file holding the traceback, exit 3 (APHRO_TRACEBACK=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AphroError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                              soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:
            if os.environ.get("APHRO_TRACEBACK"):
                raise
            with tempfile.NamedTemporaryFile("w", prefix="aphro-traceback-", suffix=".txt",
                                             delete=False) as f:
                traceback.print_exc(file=f)
            err_console.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: "
                              f"{escape(str(e))}\n(traceback in {escape(f.name)}; "
                              "APHRO_TRACEBACK=1 prints it)", highlight=False, soft_wrap=True)
            sys.exit(3)

    return wrapper


class LazyGroup(click.Group):
    """Subcommands live in their own modules, imported only when used (fast `aphro --help`)."""

    commands_by_module: ClassVar[dict[str, tuple[str, str]]] = {
        "generate": ("aphro_cli.generate", "generate"),
        "new-model": ("aphro_cli.new_model", "new_model"),
        "parity-check": ("aphro_cli.parity", "parity_check"),
        "bench": ("aphro_cli.bench", "bench"),
        "serve": ("aphro_cli.serve", "serve"),
        "models": ("aphro_cli.models", "models"),
        "register": ("aphro_cli.register", "register"),
        "unregister": ("aphro_cli.register", "unregister"),
        "worker": ("aphro_cli.worker", "worker"),
    }

    def list_commands(self, ctx):
        return sorted(name for name, (mod, _) in self.commands_by_module.items()
                      if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx, name):
        if name not in self.commands_by_module:
            return None
        module, attr = self.commands_by_module[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name == module:
                return None
            raise


@click.group(cls=LazyGroup)
@click.version_option(package_name="aphro")
def cli() -> None:
    """aphro: add an LLM architecture to a paged-attention engine, prove it right, serve it."""


def main() -> None:
    """The console script."""
    cli()


if __name__ == "__main__":
    main()
