"""The small-M linear (kernels/gemv_triton.py) against its torch reference and against the FP8
scheme's reference math: fresh random inputs, odd N and K, M in {1, 3, 16}, every weight dtype,
with and without scales and bias; the in-kernel FP8 quantization bit for bit.

Without CUDA the kernel runs on Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest);
the `cuda`-marked tests add the Llama-3-8B decode shapes on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from engine.layers.quantization.fp8 import fp8_matmul, quantize_fp8_per_channel
from kernels.gemv_ref import GEMV_KERNEL_ROWS, GEMV_MAX_TOKENS, gemv_ref
from kernels.gemv_triton import GemvConfig, gemv_config, gemv_triton
from kernels.quant_ref import FP8_DTYPE, per_token_quant_fp8_ref
from kernels.triton_common import interpreting

HAS_CUDA = torch.cuda.is_available() and not interpreting()
DEV = "cuda" if HAS_CUDA else "cpu"
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# one output ulp: the interpreter truncates float32 -> bf16 / fp16 stores (the GPU rounds),
# and the two sum in different orders
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
E4M3 = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
E4M3 = E4M3[~E4M3.isnan()].unique()  # every finite e4m3 value, sorted
SMALL = GemvConfig(block_n=16, block_k=32, num_warps=2, num_stages=2)  # several N and K steps
# three programs per N slice over K (the last adds the others' partials): K split unevenly
SPLIT = GemvConfig(block_n=16, block_k=32, num_warps=2, num_stages=2, split_k=3)


def weight_of(dtype: torch.dtype, n: int, k: int) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    return (torch.randn(n, k, device=DEV) * 0.5).to(dtype)


def assert_close_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Elementwise within one output ulp of the reference (plus float32 noise near zero)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    err = (got.double() - ref.double()).abs()
    bound = ULP[ref.dtype] * ref.double().abs() + 1e-5 * ref.double().abs().max()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def activations(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different sizes, a zero row, negative zeros, an outlier."""
    x = torch.randn(m, k, device=DEV) * torch.logspace(-3, 2, m, device=DEV)[:, None]
    if m > 1:
        x[1] = 0.0
        x[1, ::3] = -0.0
    x[0, k // 2] = 300.0
    return x.to(dtype)


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k", [(37, 71), (50, 130)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_kind", ["same", "int8", "fp8"])
def test_gemv_triton_equals_reference(m, n, k, x_dtype, w_kind):
    w_dtype = {"same": x_dtype, "int8": torch.int8, "fp8": FP8_DTYPE}[w_kind]
    x = torch.randn(m, k, device=DEV).to(x_dtype)
    w = weight_of(w_dtype, n, k)
    scale = torch.rand(n, device=DEV) * 0.05 + 1e-3
    bias = torch.randn(n, device=DEV).to(x_dtype)
    for kwargs in ({}, {"weight_scale": scale}, {"weight_scale": scale, "bias": bias}):
        for config in (None, SMALL, SPLIT):
            got = gemv_triton(x, w, config=config, **kwargs)
            assert_close_ulp(got, gemv_ref(x, w, **kwargs))


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("n,k", [(37, 71), (17, 600)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_gemv_fp8_quantized_input_equals_the_fp8_reference(m, n, k, x_dtype, static):
    """The FP8 scheme's numbers: x quantized per token (or with the static scale), the e4m3
    values multiplied in float32, scaled by x_scale * w_scale (fp8_matmul's reference)."""
    x = activations(m, k, x_dtype)
    wq, w_scale = quantize_fp8_per_channel(torch.randn(n, k, device=DEV))
    input_scale = torch.tensor([0.02], device=DEV) if static else None
    xq, x_scale = per_token_quant_fp8_ref(x, input_scale)
    ref = fp8_matmul(xq, x_scale, wq, w_scale, x_dtype, scaled_mm=False)
    for config in (None, SMALL, SPLIT):
        got = gemv_triton(x, wq, w_scale, quantize_input=True, input_scale=input_scale,
                          config=config)
        assert_close_ulp(got, ref)


@pytest.mark.parametrize("arch,shared_memory", [(90, 232448), (89, 101376)])
def test_the_launches_fit_the_shared_memory_of_each_gpu(arch, shared_memory):
    """gemv_config's launches, compiled for an H100 / H200 (227 KB of shared memory a
    program) and an L4 (99 KB), ask for no more than the GPU has: the rows with the most
    shared memory (the narrow-N row's 1 KB steps, 4 stages; the 4096-row ones) with float32
    and bf16 activations, for each weight kind. Run 8's OutOfResources (the narrow row with float32 x: 327,680 bytes
    against the H200's 232,448) is the first case; the compile reports what a launch would."""
    from hopper_compile import compile_launches

    ints = dict.fromkeys(["M", "N", "K", "K_SPLIT", "stride_xm", "stride_wn", "stride_ym"],
                         "i32")
    base = {"AMAX_K": 512, "SPLIT_K": 1, "ONE_ROW": False, "HAS_SCALE": True,
            "HAS_BIAS": False, "STATIC": False, "ROUND": False, "FP8_MAX": 448.0,
            "MIN_SCALE": 1e-12, "DOT_ROWS": 16}
    kinds = [(FP8_DTYPE, "*fp8e4nv"), (torch.int8, "*i8"), (torch.bfloat16, "*bf16")]
    for w_dtype, w_ty in kinds:
        for x_dtype, x_ty in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
            if w_dtype == torch.bfloat16 and x_dtype == torch.float32:
                continue
            launches = []
            # 64 dot rows: the 16-bit weights the engine gives the kernel at 33-64 rows (on
            # Hopper only)
            row_counts = (16, 64) if w_dtype == torch.bfloat16 and arch == 90 else (16,)
            for (n, k), rows in itertools.product(((600, 4096), (4096, 4096)), row_counts):
                c = gemv_config(n, k, w_dtype, x_dtype.itemsize, shared_memory, rows)
                launches.append({"constexprs": {
                    **base, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "DOT_ROWS": rows,
                    "AMAX_K": 8192 // rows, "QUANT": w_dtype == FP8_DTYPE,
                    "UPCAST": x_dtype == torch.float32},
                    "num_warps": c.num_warps, "num_stages": c.num_stages})
            sig = {"x_ptr": x_ty, "w_ptr": w_ty, "ws_ptr": "*fp32", "b_ptr": x_ty,
                   "xs_ptr": "*fp32", "y_ptr": x_ty, "part_ptr": "*fp32", "count_ptr": "*i32",
                   **ints}
            asked = compile_launches("kernels.gemv_triton", "_gemv_kernel", sig, launches, arch)
            assert max(asked) <= shared_memory, (w_dtype, x_dtype, asked)


@pytest.mark.parametrize("split", [2, 4, 7])
def test_split_k_calls_in_a_row_each_equal_the_reference(split):
    """The split-K programs count themselves in on shared counters that the last one resets:
    calls in a row at other shapes and splits (each leaves the counters for the next) all give
    the reference, and a split larger than K's steps falls back to fewer programs."""
    from kernels.gemv_triton import split_buffers

    for m, n, k in [(1, 40, 300), (5, 33, 1000), (16, 70, 130), (2, 40, 40)]:
        x = torch.randn(m, k, device=DEV)
        w = weight_of(torch.int8, n, k)
        scale = torch.rand(n, device=DEV) + 0.1
        config = GemvConfig(16, 32, 2, 2, split)
        for _ in range(2):
            assert_close_ulp(gemv_triton(x, w, scale, config=config), gemv_ref(x, w, scale))
    assert int(split_buffers(torch.device(DEV), 1, 1)[1].abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("static", [False, True])
def test_gemv_fp8_quantization_is_the_reference_bit_for_bit(m, static):
    """With an identity e4m3 weight each output is one product q * x_scale, so any e4m3 value
    the kernel rounds differently from per_token_quant_fp8_ref shows. Half the entries sit
    within a float32 ulp or two of a rounding tie of the e4m3 grid, where an inexact x / scale
    picks the wrong neighbour."""
    k = 257
    x = activations(m, k, torch.float32)
    input_scale = torch.tensor([0.05], device=DEV) if static else None  # clamps the big rows
    scale = input_scale if static else per_token_quant_fp8_ref(x)[1]  # [m, 1] or [1]
    grid = E4M3[(E4M3 > 0) & (E4M3 <= 448)].to(DEV)
    ties = (grid[1:] + grid[:-1]) / 2  # halfway between neighbours
    t = ties[torch.randint(0, len(ties), (m, 128), device=DEV)]
    nudge = 1 + torch.randint(-2, 3, (m, 128), device=DEV) * 2.0 ** -23
    sign = torch.randint(0, 2, (m, 128), device=DEV) * 2.0 - 1
    x[:, 3:131] = sign * t * nudge * scale  # below 448 * scale: the row scales stay
    eye = torch.eye(k, device=DEV).to(FP8_DTYPE)
    xq, x_scale = per_token_quant_fp8_ref(x, input_scale)
    got = gemv_triton(x, eye, quantize_input=True, input_scale=input_scale)
    assert torch.equal(got, xq.float() * x_scale)


def test_gemv_strided_rows_and_empty():
    wide = torch.randn(4, 100, device=DEV)
    x = wide[:, 10:74]  # stride(0) = 100
    w = weight_of(torch.int8, 40, 64)
    s = torch.rand(40, device=DEV)
    assert_close_ulp(gemv_triton(x, w, s), gemv_ref(x, w, s))
    assert gemv_triton(x[:0], w, s).shape == (0, 40)
    with pytest.raises(AssertionError):
        gemv_triton(torch.randn(GEMV_KERNEL_ROWS + 1, 64, device=DEV), w, s)


def test_gemv_config_table():
    """Every weight kind and row count gets a launch within the row's bytes per step, never
    more columns than K needs, the pipelined tiles within the shared-memory budget, and a split
    no larger than K's steps."""
    from kernels.gemv_triton import DOT_ROWS, GEMV_TABLES, SMEM_BUDGET, weight_kind

    for w_dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8, FP8_DTYPE):
        rows = GEMV_TABLES[weight_kind(w_dtype)]
        assert rows[-1][:2] == (0, 0), "each table ends with a row for every shape"
        wb = torch.empty((), dtype=w_dtype).element_size()
        for n in (1, 1024, 4096, 6144, 28672, 128256):
            for k in (40, 4096, 14336):
                for xb in (2, 4):
                    c = gemv_config(n, k, w_dtype, xb)
                    row = next(r for r in rows if n >= r[0] and k >= r[1])
                    assert c.block_n == row[2] and c.block_k * wb <= row[3]
                    assert c.block_k <= max(16, 2 * k)
                    assert c.block_k == 16 or c.num_stages * c.block_k * (
                        c.block_n * wb + DOT_ROWS * xb) <= SMEM_BUDGET
                    assert 1 <= c.split_k <= -(-k // c.block_k)
    # Llama-3-8B's shapes take the rows the sweeps chose (docs/PERF.md, runs 7b and 9b)
    assert gemv_config(4096, 14336, FP8_DTYPE) == GemvConfig(64, 512, 4, 4, 2)
    assert gemv_config(4096, 14336, torch.int8) == GemvConfig(64, 512, 4, 3, 4)
    assert gemv_config(6144, 4096, torch.int8) == GemvConfig(32, 512, 4, 3, 2)
    assert gemv_config(4096, 4096, torch.bfloat16) == GemvConfig(32, 512, 4, 4, 1)
    # a GPU with less shared memory a program (an L4's 99 KB) gets launches that fit it
    for w_dtype in (torch.bfloat16, torch.int8, FP8_DTYPE):
        c = gemv_config(600, 4096, w_dtype, 4, shared_memory=101376)
        wb = w_dtype.itemsize
        assert c.num_stages * c.block_k * (c.block_n * wb + DOT_ROWS * 4) <= 101376 - 27 * 1024
    # 1-byte weights take twice the columns of 2-byte ones per step where the rows agree
    assert gemv_config(28672, 4096, FP8_DTYPE).block_k == 2 * gemv_config(
        28672, 4096, torch.bfloat16).block_k
    assert gemv_config(4096, 40, torch.int8).block_k == 64
    assert gemv_config(4096, 40, FP8_DTYPE).split_k == 1  # one step of K: nothing to split
    # float32 activations halve the narrow row's steps (4 x (16 KB + 64 KB) would not fit)
    assert gemv_config(600, 4096, FP8_DTYPE, 4).block_k < gemv_config(600, 4096, FP8_DTYPE).block_k


def test_bench_gemv_runs_every_variant():
    """`aphro bench gemv --json`: one row per variant and token count beside the copy row."""
    import json

    from click.testing import CliRunner

    from aphro_cli.main import cli

    result = CliRunner().invoke(cli, ["bench", "gemv", "--device", DEV, "--json",
                                      "--tokens", "1,3"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    variants = {"cublas bf16", "gemv bf16", "gemv int8", "tiled int8 (old)"}
    assert rows[0]["shape"] == "copy (d2d)"
    for m in (1, 3):
        assert variants <= {r["variant"] for r in rows if r["m"] == m}
    assert all(r["us"] > 0 and r["tb_s"] > 0 for r in rows[1:])


# ---------------------------------------------------------------------------------------------
# the Llama-3-8B decode shapes (GPU only)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("m", [1, 2, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gemv_real_shapes(m, n, k):
    """The compiled kernel at the decode shapes. The GPU sums K in another order than the
    reference (and FP8 MMA accumulates with fewer bits than float32: ~2e-3 relative measured),
    so the bound is relative to each row's largest output; an indexing or scaling bug is off by
    O(1) of it. One bf16 ulp is up to 2^-7 = 0.0078 of a row's largest output."""
    x = activations(m, k, torch.bfloat16)
    for w_dtype in (torch.bfloat16, torch.int8):
        w = weight_of(w_dtype, n, k)
        s = torch.rand(n, device=DEV) * 0.01 + 1e-4
        assert_close_rows(gemv_triton(x, w, s), gemv_ref(x, w, s), 2.0 ** -7)
    wq, w_scale = quantize_fp8_per_channel(torch.randn(n, k, device=DEV))
    xq, x_scale = per_token_quant_fp8_ref(x)
    ref = fp8_matmul(xq, x_scale, wq, w_scale, torch.bfloat16, scaled_mm=False)
    assert_close_rows(gemv_triton(x, wq, w_scale, quantize_input=True), ref, 2e-2)


def assert_close_rows(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (got.double() - ref.double()).abs()
    row_max = ref.double().abs().amax(dim=1, keepdim=True)
    worst = (err / row_max.clamp_min(1e-30)).max().item()
    assert worst <= rel, f"max error {worst:.3g} of the row's largest output (bound {rel})"


@pytest.mark.cuda
@cuda
def test_split_k_inside_a_cuda_graph():
    """The engine captures decode in CUDA graphs: a graph of split-K calls (the table's row for
    Llama's down projection, FP8 with in-kernel quantization) replayed on new inputs gives the
    reference each time and leaves every counter at zero."""
    from kernels.gemv_triton import split_buffers

    n, k = 4096, 14336
    assert gemv_config(n, k, FP8_DTYPE).split_k > 1, "the test is of a row that splits K"
    wq, w_scale = quantize_fp8_per_channel(torch.randn(n, k, device=DEV))
    x = activations(1, k, torch.bfloat16)
    gemv_triton(x, wq, w_scale, quantize_input=True)  # compiles, makes the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_triton(x, wq, w_scale, quantize_input=True)
    for _ in range(3):
        x.copy_(activations(1, k, torch.bfloat16))
        graph.replay()
        xq, x_scale = per_token_quant_fp8_ref(x)
        ref = fp8_matmul(xq, x_scale, wq, w_scale, torch.bfloat16, scaled_mm=False)
        assert_close_rows(y, ref, 2e-2)
    torch.cuda.synchronize()
    assert int(split_buffers(x.device, 1, 1)[1].abs().sum()) == 0


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32, 33, 64])
def test_unquantized_linear_on_cuda_equals_f_linear(m, monkeypatch):
    """The unquantized method gives decode-sized bf16 batches of a narrow weight to the small-M
    kernel, and the rest to cuBLAS (counted: the kernel is called exactly when the weight has
    fewer than CUBLAS_MIN_ROWS_16BIT rows, on a Hopper GPU, and m <= GEMV_MAX_TOKENS, or m is
    33 to 64 and the weight's K at least 3 times its N): x @ W^T + b as F.linear computes it in
    float32, within the bf16 rounding of a row's largest output, on both sides of each
    limit."""
    from types import SimpleNamespace

    import engine.layers.linear_method as lm
    from kernels.gemv_ref import CUBLAS_MIN_ROWS_16BIT

    calls = []
    kernel = lm.gemv
    monkeypatch.setattr(lm, "gemv", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    hopper = torch.cuda.get_device_capability()[0] == 9
    for n, k in ((4096, 4096), (4096, 14336), (CUBLAS_MIN_ROWS_16BIT, 1024)):
        layer = SimpleNamespace(weight=weight_of(torch.bfloat16, n, k) / k ** 0.5)
        x = activations(m, k, torch.bfloat16)
        bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        calls.clear()
        got = lm.UnquantizedLinearMethod().apply(layer, x, bias)
        sized = m <= GEMV_MAX_TOKENS or (32 < m <= 64 and k >= 3 * n)
        assert len(calls) == int(hopper and sized and n < CUBLAS_MIN_ROWS_16BIT)
        ref = torch.nn.functional.linear(x.float(), layer.weight.float(), bias.float())
        assert_close_rows(got, ref.to(torch.bfloat16), 2.0 ** -7)


def test_every_linear_layer_moves_with_to_and_computes_x_wt_plus_b():
    """nn.Module.to() works on each TP linear layer (a RowParallelLinear method named `_apply`
    once shadowed nn.Module._apply, so `.to()` raised TypeError): the parameters change dtype,
    and the forward is x @ W^T + b in float64 with the layer's own weight."""
    from engine.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )

    layers = [ReplicatedLinear(24, 10), ColumnParallelLinear(24, 10),
              MergedColumnParallelLinear(24, [10, 6]), QKVParallelLinear(24, 4, 4, 2),
              RowParallelLinear(24, 10)]
    x = torch.randn(3, 24, dtype=torch.float64)
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_()
        moved = layer.to(torch.float64)
        assert moved is layer and all(p.dtype == torch.float64 for p in layer.parameters())
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        ref = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_row_parallel_linear_takes_a_gated_activation_as_older_explicit_files_pass_it():
    """RowParallelLinear(x, act=silu), as explicit files written by the template of 2026-12-01
    call the down projection: F.linear of silu(gate) * up (the torch reference), float32."""
    from engine.layers.activation import get_gated_act
    from engine.layers.linear import RowParallelLinear
    from kernels.elementwise_ref import silu_and_mul_ref

    layer = RowParallelLinear(37, 19, bias=True)
    for p in layer.parameters():
        p.data.normal_()
    x = torch.randn(5, 74)
    ref = torch.nn.functional.linear(silu_and_mul_ref(x), layer.weight, layer.bias)
    torch.testing.assert_close(layer(x, act=get_gated_act("silu")), ref)
