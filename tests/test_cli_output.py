"""CLI output off a terminal: rich uses a wide width (a log does not wrap at 80 columns), an
error stays on one line, and long work prints a progress line now and then."""

from __future__ import annotations

import io
import sys

import click
from click.testing import CliRunner
from rich.console import Console
from rich.table import Table

from aphro_cli.main import WIDE_COLUMNS, handle_errors, make_console
from aphro_cli.progress import log_lines
from engine.errors import AphroError


def test_consoles_are_wide_off_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    console = make_console()
    assert console.width == WIDE_COLUMNS > 80
    table = Table("name", "value")
    table.add_row("x" * 60, "y" * 60)
    console.print(table)
    lines = sys.stdout.getvalue().splitlines()
    assert any("x" * 60 in line and "y" * 60 in line for line in lines)
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100


def test_a_long_error_is_one_line(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)

    @click.command()
    @handle_errors
    def fail():
        raise AphroError("a problem " * 30 + "and what to do")

    result = CliRunner().invoke(fail, [])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "and what to do" in result.output


def test_progress_lines_in_a_log():
    out = io.StringIO()
    console = Console(file=out, width=WIDE_COLUMNS)  # a file: not a terminal
    every = log_lines(console, "work", every_s=3600)
    for done in range(1, 6):
        every(done, 5)
    assert out.getvalue().splitlines() == ["work: 5/5 done, 0 s"]  # only the last, here
    out.seek(0)
    out.truncate()
    each = log_lines(console, "work", every_s=0)
    for done in range(1, 4):
        each(done, 3)
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == \
        ["work: 1/3 done", "work: 2/3 done", "work: 3/3 done"]
