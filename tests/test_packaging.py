"""Packaging facts users rely on: the console script, and our `kernels` package not being
mistaken for Hugging Face's kernel-hub package of the same import name."""

from __future__ import annotations

from click.testing import CliRunner


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    import kernels
    from transformers.utils import import_utils

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


def test_bench_throughput_runs_and_reports_both_sides(tiny_llama_dir):
    import json

    from aphro_cli.main import cli

    result = CliRunner().invoke(cli, ["bench", "throughput", str(tiny_llama_dir),
                                      "--num-prompts", "3", "--input-len", "8",
                                      "--output-len", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["num_prompts"] == 3 and report["engine_output_tok_s"] > 0
    assert report["hf_output_tok_s"] > 0
