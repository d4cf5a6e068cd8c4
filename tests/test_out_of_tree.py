"""An out-of-tree model: a user's own package, made in a temporary folder, holding an explicit
model file and declaring it in the `aphro.models` entry-point group, is installed (editable,
with pip, into a virtual environment of its own that sees this one's packages), and with no
edit to this repository the registry lists it, the engine loads and generates with it, and
parity-check passes on it; uninstalled, it is gone from the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from engine.spec.explicit import render_explicit
from engine.spec.explicit.code import Names
from engine.spec.loader import load_spec
from engine.validate.tiny import SPECS_DIR

REPO = Path(__file__).resolve().parent.parent
ARCH = "OotLlamaForCausalLM"
PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "aphro-test-oot-model"
version = "0.1"

[project.entry-points."aphro.models"]
{ARCH} = "oot_model.model:{ARCH}"

[tool.setuptools]
packages = ["oot_model"]
"""

# what the user does with the installed package, in the environment that has it
SCRIPT = f"""
import json, sys
from engine import LLM, SamplingParams
from engine.models.registry import resolve, supported_architectures
from engine.validate.parity import run_parity
from engine.validate.tiny import model_folder

out = {{"listed": "{ARCH}" in supported_architectures()}}
if out["listed"]:
    out["target"] = resolve("{ARCH}")
    report = run_parity("{ARCH}", device="cpu", dtype="float32", chunked_prefill=False,
                        max_new_tokens=4)
    out["parity"] = report.passed
    out["checked_class"] = report.architecture
    with model_folder("{ARCH}") as path, LLM(str(path), device="cpu", num_kv_blocks=40) as llm:
        out["text"] = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4))[
            0].outputs[0].text
        out["class"] = type(llm.engine.executor.model).__module__
print(json.dumps(out))
"""


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    # this environment's pip installs into the new one (which has no pip of its own)
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args],
                          capture_output=True, text=True, check=False, timeout=300)


def test_installed_package_is_found_loaded_checked_and_generated_with(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "oot_model").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "oot_model" / "__init__.py").write_text('"""A model of my own for aphro."""\n')
    spec = load_spec(SPECS_DIR / "llama.toml")
    names = Names("OotLlama", ARCH, "oot_llama", "llama", "llama")
    (pkg / "oot_model" / "model.py").write_text(render_explicit(spec, names))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's engine, not an installed one

    def user_run() -> dict:
        res = subprocess.run([str(python), "-c", SCRIPT], capture_output=True, text=True,
                             cwd=tmp_path, env=env, check=False, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    installed = _pip(python, "install", "--no-deps", "--no-build-isolation", "-e", str(pkg))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    try:
        out = user_run()
        assert out["listed"] and out["target"] == f"oot_model.model:{ARCH}"
        assert out["parity"] and out["checked_class"] == ARCH
        assert out["class"] == "oot_model.model" and out["text"]
        models = subprocess.run([str(python), "-m", "aphro_cli.main", "models", "--json"],
                                capture_output=True, text=True, cwd=tmp_path, env=env,
                                check=False, timeout=300)
        listed = {m["architecture"]: m for m in json.loads(models.stdout)["models"]}
        assert (listed[ARCH]["target"], listed[ARCH]["source"]) == (
            f"oot_model.model:{ARCH}", "plugin entry point")
    finally:
        removed = _pip(python, "uninstall", "-y", "aphro-test-oot-model")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert user_run() == {"listed": False}
