"""Compile Triton kernels to sm_90 cubins on a machine without a GPU: triton.compile for a
Hopper target needs only the compiler (and the ptxas that triton ships), not a device. The
interpreter that runs the kernels on the CPU in the other tests executes their Python, not the
compiler, so a kernel can pass there and still fail to compile for the GPU.

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
for const in spec["variants"]:
    src = ASTSource(fn=kernel, signature={**spec["signature"], **dict.fromkeys(const, "constexpr")},
                    constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec["num_warps"]})
    print("cubin", len(compiled.asm["cubin"]))
"""


def compile_for_hopper(module: str, kernel: str, signature: dict[str, str],
                       variants: list[dict], num_warps: int = 4) -> None:
    """Compiles module.kernel once per constexpr variant; fails the test with the compiler's
    message if any does not compile, skips it where this triton has no ptxas."""
    import triton

    if not list(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*")):
        pytest.skip("this triton has no ptxas")
    spec = {"module": module, "kernel": kernel, "signature": signature, "variants": variants,
            "num_warps": num_warps}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(spec)], check=False,
                          env={**os.environ, "TRITON_INTERPRET": "0"},
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = [int(line.split()[1]) for line in done.stdout.splitlines()
             if line.startswith("cubin")]
    assert len(sizes) == len(variants) and all(s > 0 for s in sizes)
