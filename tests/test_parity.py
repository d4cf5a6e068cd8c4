"""`aphro parity-check` on correct models: the engine matches HF at every position, greedy
continuations agree, the report and the CLI say so; usage errors are errors, not failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.errors import AphroError
from engine.validate.compare import judge_greedy
from engine.validate.localize import localize
from engine.validate.parity import run_parity
from engine.validate.report import Tolerances, default_tolerances

CPU = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def llama_report(tiny_llama_dir):
    return run_parity(tiny_llama_dir, max_new_tokens=12, **CPU)


def test_correct_llama_passes_at_every_position(llama_report):
    r = llama_report
    assert r.passed, r.to_dict()
    assert r.load_ok and r.failure is None and r.localization is None
    assert [run.name for run in r.runs] == ["batched", "chunked"]
    lengths = {p.num_prompt_tokens for p in r.runs[0].prompts}
    assert len(lengths) == len(r.runs[0].prompts) > 1  # prompts of different lengths
    for run in r.runs:
        for p in run.prompts:
            # every prompt position and every decode step but the last token's own
            assert p.num_positions == p.num_prompt_tokens + 12 - 1
            assert len(p.engine_tokens) == 12 and p.first_mismatch is None
            assert p.max_abs < 1e-4 and p.top1_agreement == 1.0 and p.max_kl < 1e-6
    assert r.tolerances == default_tolerances(torch.float32, "cpu")


def test_report_is_json(llama_report):
    d = json.loads(json.dumps(llama_report.to_dict()))
    assert d["passed"] is True and d["runs"][1]["name"] == "chunked"
    assert len(d["runs"][0]["prompts"][0]["per_position"]["kl"]) == \
        d["runs"][0]["prompts"][0]["num_positions"]


def test_tolerances_decide(tiny_llama_dir):
    """An absurdly tight tolerance fails the same correct model: the numbers are used."""
    r = run_parity(tiny_llama_dir, max_new_tokens=2, chunked_prefill=False,
                   tolerances={"atol": 0.0, "rtol": 0.0, "kl": 0.0}, **CPU)
    assert not r.passed
    assert r.tolerances.atol == 0.0 and r.tolerances.greedy == "exact"


def test_registered_name_builds_a_tiny_checkpoint_and_keep_keeps_it():
    r = run_parity("LlamaForCausalLM", max_new_tokens=2, chunked_prefill=False, keep=True,
                   **CPU)
    assert r.passed and r.source == "tiny"
    kept = Path(r.checkpoint)
    assert (kept / "config.json").is_file()
    shutil.rmtree(kept)


def test_usage_errors_raise(tiny_llama_dir):
    with pytest.raises(AphroError, match="not a checkpoint folder, a spec or a registered"):
        run_parity("NoSuchForCausalLM", **CPU)
    with pytest.raises(AphroError, match="exceeds the model's context"):
        run_parity(tiny_llama_dir, prompts=["word " * 600], **CPU)


def test_greedy_rules():
    ref = torch.zeros(4, 10)
    ours = torch.zeros(4, 10)
    ref[1, 3], ref[1, 4] = 5.0, 5.0 - 1e-6  # HF: a tie between 3 and 4 at position 1
    ours[1, 4], ours[1, 3] = 6.0, 5.0
    exact = Tolerances(1e-4, 0.0, 1e-6, "exact", 0.0, 1e-4)
    ok, note = judge_greedy(0, [4, 0], [3, 0], ours, ref, 2, exact)
    assert ok and "tie" in note
    ref[1, 4] = 4.0  # no longer a tie
    assert not judge_greedy(0, [4, 0], [3, 0], ours, ref, 2, exact)[0]
    top5 = Tolerances(0.1, 0.05, 0.05, "top5", 0.01, 0.1)
    assert judge_greedy(0, [4, 0], [3, 0], ours, ref, 2, top5)[0]  # 4 in HF top-5 and back
    ref[1] = torch.arange(10.0)  # 4 is HF's 6th: outside its top 5
    ref[1, 3] = 20.0
    assert not judge_greedy(0, [4, 0], [3, 0], ours, ref, 2, top5)[0]
    assert judge_greedy(None, [1, 2], [1, 2], ours, ref, 2, exact) == (True, "2/2 tokens equal")


def captured(points: dict) -> SimpleNamespace:
    return SimpleNamespace(outputs=points, order=list(points))


def test_localize_goes_stage_by_stage_then_into_the_layer():
    a = torch.ones(3, 4)
    hf = {"m.embed": a, "m.layers.0:in": a, "m.layers.0.attn": a, "m.layers.0.mlp": a,
          "m.layers.0": a, "m.norm": a}
    ours = dict(hf, **{"m.embed": 2 * a, "m.layers.0.attn": a + 1e-6, "m.layers.0.mlp": 2 * a,
                       "m.layers.0": 3 * a, "m.norm": 3 * a})
    loc = localize(captured(hf), captured(ours), "m.layers", 3, 1e-4)
    # the raw token embedding is not a stage (Gemma scales it outside the module): layer 0's
    # input is, and it agrees; layer 0 diverges, first inside it the MLP
    assert loc.first_divergence == "layer 0 mlp" and loc.first_module == "m.layers.0.mlp"
    assert loc.points[0].label == "embeddings (input of layer 0)"
    # a sub-layer that differs inside a layer whose output agrees does not count
    ours.update({"m.layers.0": a, "m.norm": a})
    loc = localize(captured(hf), captured(ours), "m.layers", 3, 1e-4)
    assert loc.first_divergence is None and "agree" in loc.verdict
    assert "layer's output agrees" in next(p for p in loc.points if p.name.endswith("mlp")).note
    # HF's module may add the residual stream itself (Bloom's attention): ours + input agrees
    hf["m.layers.0.attn"], ours["m.layers.0"], hf["m.layers.0"] = 2 * a, 5 * a, 4 * a
    ours["m.layers.0.mlp"] = a
    loc = localize(captured(hf), captured(ours), "m.layers", 3, 1e-4)
    assert loc.first_divergence == "layer 0 output"  # its sub-layers agree: the wiring differs


# -- the command ---------------------------------------------------------------------------------

def test_cli_json_passes_with_exit_0(tiny_llama_dir):
    res = CliRunner().invoke(cli, ["parity-check", str(tiny_llama_dir), "--device", "cpu",
                                   "--no-chunked", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["passed"] and d["model"] == str(tiny_llama_dir) and len(d["runs"]) == 1


def test_cli_table_prompts_file_and_overrides(tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n\nand a second, longer prompt here\n")
    args = ["parity-check", str(tiny_llama_dir), "--device", "cpu", "--no-chunked",
            "--max-new-tokens", "2", "--prompts", str(prompts)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "PASS" in res.stdout and "batched" in res.stdout
    res = CliRunner().invoke(cli, [*args, "--atol", "0", "--rtol", "0", "--kl", "0"])
    assert res.exit_code == 1 and "FAIL" in res.stdout


def test_cli_usage_error_exits_2():
    res = CliRunner().invoke(cli, ["parity-check", "NoSuchForCausalLM"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and "is not a checkpoint folder" in res.stderr
    assert "Traceback" not in res.output


def test_cli_without_model_checks_every_registered_model():
    """The README's main job: every registered architecture's tiny config, one table, exit 0."""
    from engine.models.registry import supported_architectures

    res = CliRunner().invoke(cli, ["parity-check", "--device", "cpu", "--max-new-tokens", "4",
                                   "--json"])
    d = json.loads(res.stdout)
    failed = {r["model"]: (r["load"], r["failure"], r["localization"])
              for r in d["reports"] if not r["passed"]}
    assert res.exit_code == 0 and d["passed"], (failed, d["errors"])
    assert sorted(r["model"] for r in d["reports"]) == supported_architectures()
    assert all(len(r["runs"]) == 2 for r in d["reports"])  # batched and chunked prefill


def test_cli_summary_table(monkeypatch):
    from engine.models import registry

    monkeypatch.setattr(registry, "supported_architectures", lambda: ["LlamaForCausalLM"])
    res = CliRunner().invoke(cli, ["parity-check", "--device", "cpu", "--no-chunked",
                                   "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "LlamaForCausalLM" in res.stdout and "1/1 models pass" in res.stdout
