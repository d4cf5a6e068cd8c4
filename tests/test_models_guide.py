"""docs/MODELS.md's worked example, followed as written: StableLM (an architecture aphro does
not ship) started with `--explicit` from llama fails parity where the guide says, the guide's
diff ports it, and the port passes parity with both settings of the config flag it added, and
the sharding check at TP=2."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "MODELS.md").read_text()
SECTION = GUIDE[GUIDE.index("## Worked example"):GUIDE.index("## Reading a parity-check")]
FAST = ["--no-chunked", "--max-new-tokens", "4"]


def block(kind: str) -> str:
    return re.search(rf"```{kind}\n(.*?)```", SECTION, re.DOTALL).group(1)


def apply_diff(text: str, diff: str) -> str:
    """Apply each hunk of a unified diff by its context, not its line numbers."""
    for hunk in re.split(r"^@@.*@@\n", diff, flags=re.MULTILINE)[1:]:
        lines = hunk.splitlines()
        old = "\n".join(ln[1:] for ln in lines if ln[:1] in (" ", "-")) + "\n"
        new = "\n".join(ln[1:] for ln in lines if ln[:1] in (" ", "+")) + "\n"
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def flat(result) -> str:
    return " ".join(result.output.split())


def forget_project_modules() -> None:
    """What a new `aphro` process would see: the edited file, not the one imported before."""
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    forget_project_modules()


def test_the_worked_example_ports_stablelm(project, make_checkpoint):
    runner = CliRunner()
    commands = [shlex.split(line.split("#")[0]) for line in block("bash").splitlines()]
    assert [c[:2] for c in commands] == [["aphro", "new-model"], ["aphro", "parity-check"]]
    made = runner.invoke(cli, commands[0][1:])
    assert made.exit_code == 0, made.output
    before = runner.invoke(cli, [*commands[1][1:], *FAST])
    assert before.exit_code == 1, before.output
    assert "unused checkpoint tensor: model.layers.0.input_layernorm.bias" in before.output
    quoted = re.search(r"```\n(first divergence: .*)\n```", SECTION).group(1)
    assert quoted.split(", relative")[0] in flat(before)

    path = project / "aphro_models" / "stablelm.py"
    path.write_text(apply_diff(path.read_text(), block("diff")))
    forget_project_modules()
    after = runner.invoke(cli, [*commands[1][1:], *FAST])
    assert after.exit_code == 0, after.output

    # the flag's other setting: a checkpoint of sequential layers
    from aphro_models.stablelm import StableLmForCausalLM
    from transformers import AutoConfig

    fields = dict(StableLmForCausalLM.tiny_config, use_parallel_residual=False)
    config = AutoConfig.for_model("stablelm", architectures=["StableLmForCausalLM"], **fields)
    sequential = make_checkpoint(config, "stablelm_sequential")
    res = runner.invoke(cli, ["parity-check", str(sequential), *FAST])
    assert res.exit_code == 0, res.output

    sharded = runner.invoke(cli, [*commands[1][1:], *FAST, "--tp", "2"])
    assert sharded.exit_code == 0, sharded.output
    assert "sharding over 2 ranks" in sharded.output
