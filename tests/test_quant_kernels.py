"""The quantization kernels against their torch references, and the references against the
math they stand for: per-token FP8 activation quantization (bit for bit) and the weight-only
INT8 matmul that dequantizes on the fly. Fresh random inputs, several shapes, odd sizes.

Without CUDA the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest);
the `cuda`-marked tests add real sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.quant_ref import FP8_MAX, int8_weight_matmul_ref, per_token_quant_fp8_ref
from kernels.quant_triton import int8_weight_matmul_triton, per_token_quant_fp8_triton
from kernels.triton_common import interpreting

HAS_CUDA = torch.cuda.is_available() and not interpreting()
DEV = "cuda" if HAS_CUDA else "cpu"
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# the interpreter truncates float32 -> bf16 / fp16 stores (the GPU rounds): one output ulp
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[~E4M3.isnan()].unique()  # every finite e4m3 value, sorted


def activations(tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different sizes (1e-4 .. 1e2), a zero row, negative zeros, an outlier."""
    x = torch.randn(tokens, hidden, device=DEV)
    x *= torch.logspace(-4, 2, tokens, device=DEV)[:, None]
    x[0] = 0.0
    x[0, ::3] = -0.0
    if tokens > 2:
        x[2, hidden // 2] = 300.0
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 37), (33, 300), (5, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_quant_fp8_triton_equals_reference(tokens, hidden, dtype):
    x = activations(tokens, hidden, dtype)
    q, s = per_token_quant_fp8_triton(x)
    q_ref, s_ref = per_token_quant_fp8_ref(x)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)
    static = torch.tensor([0.05], device=DEV)  # clamps the larger rows at +-448
    q, s = per_token_quant_fp8_triton(x, static)
    q_ref, s_ref = per_token_quant_fp8_ref(x, static)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)
    assert s.shape == (tokens, 1) and bool((s == 0.05).all())


@pytest.mark.parametrize("tokens,hidden", [(3, 50), (16, 129)])
def test_per_token_quant_fp8_reference_is_nearest_e4m3(tokens, hidden):
    """Each quantized value is the e4m3 value nearest x / scale (no other is closer), and
    each row's largest |x| maps to 448."""
    x = activations(tokens, hidden, torch.float32)
    q, s = per_token_quant_fp8_ref(x)
    v = (x / s).clamp(-FP8_MAX, FP8_MAX).flatten().cpu()
    grid = E4M3.to(v)
    nearest = (v[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.equal((v - q.float().flatten().cpu()).abs(), nearest)
    big = x.abs().amax(1) > 0
    assert torch.equal(q.float().abs().amax(1)[big], torch.full_like(s[big, 0], FP8_MAX))


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (5, 37, 71), (20, 130, 200), (70, 17, 33),
                                   (3, 64, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weight_matmul_triton_equals_reference(m, n, k, dtype):
    x = torch.randn(m, k, device=DEV).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 0.02 + 1e-4
    ref = int8_weight_matmul_ref(x, w, s)
    got = int8_weight_matmul_triton(x, w, s)
    assert got.dtype == dtype and got.shape == (m, n)
    rel = (got.double() - ref.double()).norm() / ref.double().norm()
    assert rel < OUT_TOL[dtype]


def test_int8_weight_matmul_reference_is_the_dequantized_matmul():
    x = torch.randn(9, 77, dtype=torch.float64)
    w = torch.randint(-127, 128, (31, 77), dtype=torch.int8)
    s = torch.rand(31) * 0.02
    expected = x @ (w.double() * s.double()[:, None]).t()
    got = int8_weight_matmul_ref(x.float(), w, s)
    assert (got.double() - expected).abs().max() < 1e-5 * expected.abs().max()


def test_int8_weight_matmul_strided_input_rows():
    """x may be a row slice of a wider tensor (stride(0) > in)."""
    wide = torch.randn(6, 100, device=DEV)
    x = wide[:, 10:74]
    w = torch.randint(-127, 128, (40, 64), dtype=torch.int8, device=DEV)
    s = torch.rand(40, device=DEV)
    ref = int8_weight_matmul_ref(x, w, s)
    # float32 sums of +-127-sized terms in another order: ~1e-4 apart where they cancel to
    # near zero, so the bound is relative to the largest output (a stride bug is off by O(1))
    torch.testing.assert_close(int8_weight_matmul_triton(x, w, s), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# real sizes (GPU only)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("tokens,hidden", [(1, 4096), (4096, 4096), (300, 14336)])
def test_per_token_quant_fp8_real(tokens, hidden):
    x = activations(tokens, hidden, torch.bfloat16)
    q, s = per_token_quant_fp8_triton(x)
    q_ref, s_ref = per_token_quant_fp8_ref(x)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 14336), (16, 28672, 4096),
                                   (256, 4096, 4096), (1000, 6144, 4096)])
def test_int8_weight_matmul_real(m, n, k):
    test_int8_weight_matmul_triton_equals_reference(m, n, k, torch.bfloat16)
