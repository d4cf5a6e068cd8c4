"""`aphro bench throughput` and `aphro bench latency` on the CPU with tiny models: the HF
baselines' rows, --dataset, latency percentiles, the one result schema, scripts/perf_table.py and
every hint the commands print. No timing asserts: counts, shapes and published facts."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.bench.results import RESULT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu"]


def invoke(args: list[str]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


def rows_by_name(record: dict) -> dict:
    return {r["name"]: r for r in record["results"]["rows"]}


def follow_hint(output: str) -> subprocess.CompletedProcess:
    """Run the `next: python scripts/perf_table.py F` line as printed (python: this one)."""
    line = next(x for x in output.splitlines() if x.startswith("next: "))
    argv = shlex.split(line[len("next: "):])
    assert argv[:2] == ["python", "scripts/perf_table.py"]
    return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_bench_throughput_runs_and_reports_both_sides(tiny_llama_dir):
    result = invoke(["bench", "throughput", str(tiny_llama_dir), "--num-prompts", "3",
                     "--input-len", "8", "--output-len", "4", "--json"])
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["workload"]["num_prompts"] == 3
    rows = rows_by_name(report)
    assert rows["aphro"]["output_tok_s"] > 0
    assert rows["HF generate"]["output_tok_s"] > 0


def test_bench_throughput_hf_baseline_on_a_preset_has_both_rows_and_a_table(tmp_path):
    out = tmp_path / "throughput.json"
    result = invoke(["bench", "throughput", "--model-config", "tiny", *CPU, "--num-prompts", "3",
                     "--input-len", "8", "--output-len", "5", "--baseline", "hf",
                     "--json", str(out)])
    record = json.loads(out.read_text())
    jsonschema.validate(record, RESULT_SCHEMA)
    assert record["kind"] == "throughput" and record["model"]["random_weights"]
    rows = rows_by_name(record)
    assert list(rows) == ["aphro", "HF generate_batch", "HF generate"]
    for row in rows.values():  # 3 prompts x 5 new tokens each, EOS ignored
        assert row["requests"] == 3 and row["output_tokens"] == 15
    assert record["hardware"]["device"] == "cpu"
    assert record["hardware"]["copy_bandwidth_gbs"] is None and record["roofline"] is None
    assert "hardware:" in result.output and "KV cache:" in result.output
    table = follow_hint(result.output)
    assert table.returncode == 0, table.stderr
    lines = [x for x in table.stdout.splitlines() if x.startswith("| tiny |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[1] == "3 x 8 / 5"
    assert cells[2] == format(rows["aphro"]["output_tok_s"], ",.1f")
    assert cells[3] == format(rows["HF generate_batch"]["output_tok_s"], ",.1f")
    assert cells[5] == format(rows["HF generate"]["output_tok_s"], ",.1f")
    assert "command: `aphro bench throughput --model-config tiny" in table.stdout


def test_bench_throughput_reads_a_dataset_file(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    prompts = ["The quick brown fox", "jumps over the lazy dog again and again",
               "hello"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                             for i, p in enumerate(prompts)) + "\n")
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(prompts) + "\n")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    lens = [len(tok(p).input_ids) for p in prompts]
    for path, n in ((jsonl, 3), (text, 2)):
        out = tmp_path / f"{path.stem}-{n}.json"
        invoke(["bench", "throughput", str(tiny_llama_dir), "--dataset", str(path),
                "--num-prompts", str(n), "--output-len", "3", "--baseline", "none",
                "--json", str(out)])
        w = json.loads(out.read_text())["workload"]
        assert w["num_prompts"] == n and w["prompt_tokens"] == sum(lens[:n])
        assert (w["min_input_len"], w["max_input_len"]) == (min(lens[:n]), max(lens[:n]))
        assert w["dataset"] == str(path)


def test_bench_throughput_dataset_without_a_tokenizer_hint_works(tiny_llama_dir, tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("one prompt\nanother one\n")
    args = ["bench", "throughput", "--model-config", "tiny", *CPU, "--dataset", str(data),
            "--output-len", "2", "--baseline", "none"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--tokenizer DIR" in result.output
    out = tmp_path / "r.json"
    invoke([*args, "--tokenizer", str(tiny_llama_dir), "--json", str(out)])
    assert json.loads(out.read_text())["workload"]["num_prompts"] == 2


def test_bench_throughput_without_generate_batch_says_so_and_its_hint_works(monkeypatch,
                                                                            tmp_path):
    from transformers import GenerationMixin

    owner = next(c for c in GenerationMixin.__mro__ if "generate_batch" in vars(c))
    monkeypatch.delattr(owner, "generate_batch")  # as in transformers 4.x
    args = ["bench", "throughput", "--model-config", "tiny", *CPU, "--num-prompts", "2",
            "--input-len", "4", "--output-len", "2"]
    out = tmp_path / "r.json"
    result = invoke([*args, "--json", str(out)])
    assert "no generate_batch" in result.output and "--baseline none" in result.output
    rows = rows_by_name(json.loads(out.read_text()))
    assert "skipped" in rows["HF generate_batch"] and rows["HF generate"]["output_tokens"] == 4
    for flag in (["--baseline", "none"], ["--no-baseline"]):  # the hint, and its alias
        invoke([*args, *flag, "--json", str(out)])
        assert list(rows_by_name(json.loads(out.read_text()))) == ["aphro"]


def test_bench_latency_percentiles_and_counts(tmp_path):
    out = tmp_path / "lat.jsonl"
    result = invoke(["bench", "latency", *CPU, "--batch-size", "2", "--num-iters", "3",
                     "--num-iters-warmup", "1", "--input-len", "8", "--output-len", "4",
                     "--json", str(out)])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    jsonschema.validate(record, RESULT_SCHEMA)
    assert record["kind"] == "latency" and record["model"]["name"] == "tiny"  # CPU default
    assert record["model"]["dtype"] == "float32"
    w, r = record["workload"], record["results"]
    assert (w["batch_size"], w["num_iters"], w["num_iters_warmup"]) == (2, 3, 1)
    for name in ("ttft", "tpot", "e2e"):
        s = r[name]  # tpot is a difference of wall times: noise on a loaded CPU can make it < 0
        assert s["n"] == 3 and s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
        assert name == "tpot" or s["p50_ms"] > 0
    assert r["engine"]["max_num_seqs"] == 2
    table = follow_hint(result.output)
    assert table.returncode == 0, table.stderr
    row = next(x for x in table.stdout.splitlines() if x.startswith("| tiny |"))
    t = r["tpot"]
    assert f"{t['p50_ms']:.3f} / {t['p90_ms']:.3f} / {t['p99_ms']:.3f}" in row


def test_bench_latency_reports_every_tp_size_and_the_weights_per_rank(tmp_path):
    from engine.bench.engine_bench import PRESETS

    out = tmp_path / "lat.jsonl"
    invoke(["bench", "latency", "--preset", "tiny", "--tp", "1", "--tp", "2", "--input-len", "8",
            "--output-len", "4", "--device", "cpu", "--dtype", "float32",
            "--num-iters-warmup", "1", "--num-iters", "2", "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["workload"]["tp"] for r in rows] == [1, 2]
    s = PRESETS["tiny"]
    h, i, v, layers = (s["hidden_size"], s["intermediate_size"], s["vocab_size"],
                       s["num_hidden_layers"])
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # qkv, o, gate/up/down, norms
    full = (layers * per_layer + 2 * v * h + h) * 4  # + embedding, lm_head, final norm; fp32
    assert rows[0]["model"]["weight_bytes_per_rank"] == full
    assert rows[0]["model"]["parameters"] * 4 == full
    assert rows[1]["model"]["weight_bytes_per_rank"] < full  # sharded: each rank holds a part
    assert all(r["results"]["tpot"]["p50_ms"] > 0 for r in rows)


def test_roofline_matches_published_figures():
    """Llama-3-8B has 8,030,261,248 parameters and Mixtral-8x7B 46,702,792,704 (their HF
    checkpoints); the issue's batch-1 roofline: 15.0 GB streamed / 4.23 TB/s = 3.55 ms."""
    from engine.bench.engine_bench import preset_config
    from engine.bench.roofline import CostModel, latency_roofline, parameter_counts, shape_of

    llama = shape_of(preset_config("llama-8b"))
    assert parameter_counts(llama)["total"] == 8_030_261_248
    assert parameter_counts(shape_of(preset_config("mixtral-8x7b")))["total"] == 46_702_792_704
    cost = CostModel(llama, 8_030_261_248 * 2, 2, 1, 4230.0, 738.0)
    tpot = latency_roofline(cost, 1, 128, 256)["tpot_ms"]
    assert abs(tpot - 3.55) < 0.02


def test_perf_table_and_the_schema_refuse_what_is_not_a_result(tmp_path):
    import pytest

    from engine.bench.results import make_record, validate
    from engine.errors import ConfigError

    record = make_record("serve", hardware={"device": "cpu", "name": "x"}, model={"name": "m"},
                         workload={}, results={}, roofline=None, command="aphro bench serve")
    bad = {k: v for k, v in record.items() if k != "hardware"}
    with pytest.raises(ConfigError, match="hardware"):
        validate(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RESULT_SCHEMA)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "scripts/perf_table.py", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "hardware" in r.stderr and "Traceback" not in r.stderr


def test_bench_serve_records_the_command_without_the_api_key(monkeypatch, tmp_path):
    """The key lands in no result file (nor a docs/PERF.md table): `--api-key ***`."""
    from engine.bench import serve_bench

    def fake_run(config, progress=None):  # the figures of one request, no server
        result = serve_bench.RequestResult(True, 8, 4, 0.01, 0.05, [0.01, 0.01, 0.01])
        return serve_bench.summarize(config, "m", [result], 1.0)

    monkeypatch.setattr(serve_bench, "run_serve_bench", fake_run)
    for key, flag in (("sk-test-0x5ec12e7", ["--api-key", "sk-test-0x5ec12e7"]),
                      ("sk-test-0xc0ffee", ["--api-key=sk-test-0xc0ffee"])):
        out = tmp_path / "serve.json"
        result = invoke(["bench", "serve", "--num-prompts", "1", *flag, "--save-result", str(out),
                         "--json"])
        record = json.loads(out.read_text())
        assert record["command"].startswith("aphro bench serve --num-prompts 1 --api-key *** ")
        assert key not in out.read_text() and key not in result.output
        assert json.loads(result.stdout) == record  # --json prints the record written
