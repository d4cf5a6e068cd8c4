"""The new-model path as a user walks it: every "next:" hint followed literally, in a project
folder outside the checkout and inside the checkout, for a spec and for an explicit file, ends
in a passing parity-check. The names a new model gets (model_type, architecture) are ones
transformers knows, or the user is told what to do; a wrong family or architecture name gets a
"did you mean"."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
from click.testing import CliRunner

from aphro_cli.main import cli
from engine.spec.loader import load_spec
from engine.spec.project import REPO

FAST = ["--max-new-tokens", "4", "--no-chunked"]  # appended only where a test says so


@pytest.fixture(autouse=True)
def fresh_project_imports(monkeypatch):
    """Each test's project is imported afresh (a CLI command is a fresh process): the registry
    puts the project folder on sys.path and imports aphro_models from it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def follow(result, monkeypatch) -> list[str]:
    """The command of the last "next:" hint, as a user would type it: `cd DIR &&` changes
    directory, `aphro` is the CLI."""
    hint = [line for line in result.output.splitlines() if line.startswith("next:")][-1]
    command = re.sub(r"^next: (edit it, then run )?", "", hint)
    if command.startswith("cd "):
        folder, _, command = command[3:].partition(" && ")
        monkeypatch.chdir(folder)
    words = shlex.split(command)
    assert words[0] == "aphro", hint
    return words[1:]


def walk(monkeypatch, *first: str) -> list:
    """Run `first`, then every hint it leads to, until a parity-check; return the results."""
    results = [run(*first)]
    while True:
        assert results[-1].exit_code == 0, results[-1].output
        command = follow(results[-1], monkeypatch)
        results.append(run(*command))
        if command[0] == "parity-check":
            return results


def test_spec_walk_in_a_project_ends_in_a_passing_parity_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = walk(monkeypatch, "new-model", "mymodel", "--like", "llama")
    assert results[-1].exit_code == 0, results[-1].output
    assert "PASS" in results[-1].stdout and "MymodelForCausalLM" in results[-1].stdout
    # written into the project, and said so; nothing into the checkout
    assert "in the project in" in flat(results[0])
    assert (tmp_path / "model_specs" / "mymodel.toml").is_file()
    assert (tmp_path / "aphro_models" / "mymodel.py").is_file()
    assert not (REPO / "model_specs" / "mymodel.toml").exists()
    assert not (REPO / "engine" / "models" / "mymodel.py").exists()
    # the copy names a model_type transformers knows, and says why it is the family's
    spec = load_spec(tmp_path / "model_specs" / "mymodel.toml")
    assert spec.model.model_type == "llama"
    assert spec.model.architectures == ("MymodelForCausalLM",)
    assert "transformers knows no model type 'mymodel'" in flat(results[0])
    assert "[model] model_type" in flat(results[0])
    # and it runs: generate takes the architecture name too (a tiny random checkpoint)
    res = run("generate", "MymodelForCausalLM", "-p", "Hello", "--max-tokens", "3", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["tokens"] == 3


def test_explicit_walk_in_a_project_ends_in_a_passing_parity_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = walk(monkeypatch, "new-model", "mine", "--like", "phi3", "--explicit")
    assert results[-1].exit_code == 0, results[-1].output
    assert "PASS" in results[-1].stdout
    text = (tmp_path / "aphro_models" / "mine.py").read_text()
    assert "class MineForCausalLM(nn.Module):" in text and "def load_weights" in text
    # the model type note names where an explicit model keeps it (it has no spec)
    assert "hf_model_type" in flat(results[0]) and "[model]" not in flat(results[0])
    assert "hf_model_type = " in text
    assert 150 <= len(text.splitlines()) <= 260
    listed = json.loads(run("models", "--json").stdout)["models"]
    mine = [m for m in listed if m["architecture"] == "MineForCausalLM"]
    assert [(m["target"], m["source"]) for m in mine] == [
        ("aphro_models.mine:MineForCausalLM", "project")]


def test_out_writes_into_another_project_and_the_hints_say_how(tmp_path, monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    monkeypatch.chdir(here)
    results = walk(monkeypatch, "new-model", "other", "--like", "qwen2", "--out", str(there))
    assert results[-1].exit_code == 0, results[-1].output
    assert (there / "model_specs" / "other.toml").is_file()
    assert (there / "aphro_models" / "other.py").is_file()
    assert not list(here.iterdir())
    assert "cd " in results[1].output  # the parity-check runs in the project


@pytest.fixture
def in_checkout(monkeypatch):
    """Run in the checkout; remove what the test writes there and restore the registry."""
    registry = REPO / "engine" / "models" / "_generated.py"
    before = registry.read_text()
    made = [REPO / "model_specs" / "walkmodel.toml", REPO / "engine" / "models" / "walkmodel.py"]
    assert not any(p.exists() for p in made)
    monkeypatch.chdir(REPO)
    yield
    for p in made:
        p.unlink(missing_ok=True)
    registry.write_text(before)


def test_spec_walk_in_the_checkout_ends_in_a_passing_parity_check(in_checkout, monkeypatch):
    results = walk(monkeypatch, "new-model", "walkmodel", "--like", "llama")
    assert results[-1].exit_code == 0, results[-1].output
    assert "in this checkout" in flat(results[0])
    assert "engine/models/walkmodel.py" in results[1].output


def test_like_an_hf_model_type_takes_transformers_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("new-model", "stablelm", "--like", "qwen2")
    assert res.exit_code == 0, res.output
    spec = load_spec(tmp_path / "model_specs" / "stablelm.toml")
    assert spec.model.model_type == "stablelm"
    assert spec.model.architectures == ("StableLmForCausalLM",)  # not StablelmForCausalLM


def test_names_transformers_does_not_know_are_refused_with_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("new-model", "x", "--like", "llama", "--model-type", "lama")
    assert res.exit_code == 2 and "no model type 'lama'" in flat(res) and "'llama'" in flat(res)
    res = run("new-model", "x", "--like", "llama", "--arch", "StablelmForCausalLM")
    assert res.exit_code == 2 and "transformers spells it StableLmForCausalLM" in flat(res)
    res = run("new-model", "x", "--like", "lama")
    assert res.exit_code == 2
    assert "did you mean 'llama'?" in flat(res) and "families: bloom, cohere" in flat(res)
    assert not (tmp_path / "model_specs").exists()


def test_an_unknown_architecture_gets_a_did_you_mean():
    res = run("parity-check", "StablelmForCausalLM")
    assert res.exit_code == 2
    assert "Did you mean StableLmForCausalLM (transformers' name, model_type stablelm)" in \
        flat(res)
    res = run("parity-check", "Qwen2ForCausalLm")
    assert res.exit_code == 2 and "Did you mean Qwen2ForCausalLM" in flat(res)


def test_a_spec_with_an_unknown_model_type_is_a_spec_error(tmp_path, monkeypatch):
    """The original walk ended in exit 3 and ~300 lines of model types."""
    monkeypatch.chdir(tmp_path)
    assert run("new-model", "mymodel", "--like", "llama").exit_code == 0
    path = tmp_path / "model_specs" / "mymodel.toml"
    path.write_text(path.read_text().replace('model_type = "llama"', 'model_type = "mymodel"'))
    res = run("parity-check", "mymodel")
    assert res.exit_code == 2, res.output
    assert "model.model_type: transformers has no model type 'mymodel'" in flat(res)
    assert len(res.output.splitlines()) < 6


def test_a_project_spec_registers_by_name_and_serves_from_anywhere(tmp_path, monkeypatch):
    """`aphro register NAME` finds the project's model_specs/NAME.toml (the spec the walk
    wrote), registers the project's generated module, and the registered model then runs from
    another directory (the record's project is put on sys.path): no import error."""
    monkeypatch.setenv("APHRO_REGISTRY", str(tmp_path / "registry.json"))
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    walk(monkeypatch, "new-model", "foo", "--like", "qwen2")
    res = run("register", "foo", *FAST)
    assert res.exit_code == 0, res.output
    records = json.loads((tmp_path / "registry.json").read_text())
    assert json.dumps(records).count("aphro_models.foo:FooForCausalLM") >= 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]  # a fresh process there
    sys.path[:] = [p for p in sys.path if p != str(project)]
    res = run("generate", "FooForCausalLM", "-p", "Hello", "--max-tokens", "3", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["tokens"] == 3
    res = run("models", "FooForCausalLM")
    assert res.exit_code == 0 and "stale" not in res.output, res.output
    # the project moved away: a one-line error that says what to do, not an import traceback
    project.rename(tmp_path / "moved")
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p != str(project)]
    res = run("generate", "FooForCausalLM", "-p", "Hello", "--max-tokens", "3")
    assert res.exit_code == 2, res.output
    assert "a project's model" in flat(res) and "aphro_models/" in flat(res)


def test_parity_check_warns_when_the_spec_changed_and_its_hint_regenerates(tmp_path,
                                                                           monkeypatch):
    """The spec edited without regenerating: parity-check still checks the generated module as
    it is, and says so with the command to regenerate; that command, followed literally, makes
    the module current (no warning), and the edit then takes effect."""
    monkeypatch.chdir(tmp_path)
    walk(monkeypatch, "new-model", "mymodel", "--like", "llama")
    spec = tmp_path / "model_specs" / "mymodel.toml"
    spec.write_text(spec.read_text().replace('rope_style = "neox"', 'rope_style = "gptj"'))
    res = run("parity-check", "mymodel", *FAST)
    warning = [line for line in flat(res).split("warning: ")[1:]]
    assert warning and "out of date" in warning[0] and "has changed" in warning[0], res.output
    hint = re.search(r"Regenerate it: (aphro new-model \S+)", flat(res)).group(1)
    assert run(*shlex.split(hint)[1:]).exit_code == 0
    for name in [m for m in sys.modules if m.split(".")[0] == "aphro_models"]:
        del sys.modules[name]  # the next command is a fresh process
    res = run("parity-check", "mymodel", *FAST)
    assert "warning:" not in res.output
    assert res.exit_code == 1 and "FAIL" in res.stdout  # gptj rotary on a neox checkpoint


def test_a_project_spec_named_like_an_in_tree_one_is_its_own(tmp_path, monkeypatch):
    """A project's model_specs/mistral.toml is the spec of the project's generated module, not
    the checkout's model_specs/mistral.toml: no false "out of date" warning, and the record
    vouches for the project's spec."""
    from engine.models.sources import module_source

    monkeypatch.chdir(tmp_path)
    results = walk(monkeypatch, "new-model", "mistral", "--like", "llama", *FAST[:0])
    assert results[-1].exit_code == 0, results[-1].output
    assert "warning:" not in results[-1].output
    _, spec = module_source("aphro_models.mistral:MistralForCausalLM")
    assert spec == (tmp_path / "model_specs" / "mistral.toml").resolve()
