"""Packaging facts users rely on: the console script, and our `kernels` package not being
mistaken for Hugging Face's kernel-hub package of the same import name."""

from __future__ import annotations

from click.testing import CliRunner


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    from transformers.utils import import_utils

    import kernels

    assert getattr(kernels, "__aphro__", False)  # ours is the one importable here
    assert not import_utils.is_kernels_available()


def test_cli_lists_commands_and_reports_user_errors_in_one_line(tiny_llama_dir):
    from aphro_cli.main import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "generate" in result.output
    result = runner.invoke(cli, ["generate", str(tiny_llama_dir), "-p", "x",
                                 "--temperature", "-1"])
    assert result.exit_code == 2
    assert "temperature" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["generate", str(tiny_llama_dir), "-p", "hello",
                                 "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert '"tokens": 4' in result.output


def test_cli_turns_an_unexpected_exception_into_one_line_and_a_traceback_file(monkeypatch):
    import click

    from aphro_cli.main import handle_errors

    @click.command()
    @handle_errors
    def boom():
        raise ZeroDivisionError("[red]not markup[/]")

    result = CliRunner().invoke(boom, [])
    assert result.exit_code == 3
    assert "internal error: ZeroDivisionError: [red]not markup[/]" in result.output
    path = result.output.split("traceback in ")[1].split(";")[0].strip()
    with open(path) as f:
        assert "ZeroDivisionError" in f.read()
