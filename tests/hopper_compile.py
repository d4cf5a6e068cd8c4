"""Compile Triton kernels for NVIDIA GPUs on a machine without one: triton.compile for a
target architecture needs only the compiler (and the ptxas that triton ships), not a device.
The interpreter that runs the kernels on the CPU in the other tests executes their Python, not
the compiler, so a kernel can pass there and still fail to compile for the GPU, or ask for more
shared memory than the GPU has (which only its launch would report).

Runs in a fresh process without TRITON_INTERPRET (the compiler cannot take interpreted
kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
for launch in spec["launches"]:
    const = launch["constexprs"]
    src = ASTSource(fn=kernel, signature={**spec["signature"], **dict.fromkeys(const, "constexpr")},
                    constexprs=const)
    options = {k: launch[k] for k in ("num_warps", "num_stages") if k in launch}
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=options)
    print("compiled", len(compiled.asm["cubin"]), compiled.metadata.shared)
"""


def compile_launches(module: str, kernel: str, signature: dict[str, str],
                     launches: list[dict], arch: int = 90) -> list[int]:
    """Compiles module.kernel for sm_<arch> once per launch ({"constexprs": ..., and optional
    "num_warps", "num_stages"}); returns the shared memory each asks for, in bytes. Fails the
    test with the compiler's message if any does not compile; skips it where this triton has
    no ptxas."""
    import triton

    if not list(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*")):
        pytest.skip("this triton has no ptxas")
    spec = {"module": module, "kernel": kernel, "signature": signature, "launches": launches,
            "arch": arch}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(spec)], check=False,
                          env={**os.environ, "TRITON_INTERPRET": "0"},
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("compiled")]
    assert len(rows) == len(launches) and all(int(r[1]) > 0 for r in rows)
    return [int(r[2]) for r in rows]


def compile_for_hopper(module: str, kernel: str, signature: dict[str, str],
                       variants: list[dict], num_warps: int = 4) -> None:
    """compile_launches for sm_90, one launch of `num_warps` per constexpr variant."""
    compile_launches(module, kernel, signature,
                     [{"constexprs": v, "num_warps": num_warps} for v in variants])
