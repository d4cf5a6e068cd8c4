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


def test_bench_latency_reports_every_tp_size_and_the_weights_per_rank(tmp_path):
    import json

    from aphro_cli.main import cli
    from engine.bench.engine_bench import PRESETS

    out = tmp_path / "lat.jsonl"
    result = CliRunner().invoke(cli, ["bench", "latency", "--preset", "tiny", "--tp", "1",
                                      "--tp", "2", "--input-len", "8", "--output-len", "4",
                                      "--device", "cpu", "--dtype", "float32",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tp"] for r in rows] == [1, 2]
    s = PRESETS["tiny"]
    h, i, v, layers = (s["hidden_size"], s["intermediate_size"], s["vocab_size"],
                       s["num_hidden_layers"])
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # qkv, o, gate/up/down, norms
    full = (layers * per_layer + 2 * v * h + h) * 4  # + embedding, lm_head, final norm; fp32
    assert rows[0]["weight_bytes_per_rank"] == full
    assert rows[1]["weight_bytes_per_rank"] < full  # sharded: each rank holds a part
    assert all(r["decode_ms_median"] > 0 for r in rows)


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
