"""Every Triton kernel against its torch reference, on fresh random inputs.

Without CUDA the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1, small shapes);
with CUDA they run compiled, and the `cuda`-marked tests add the real sizes. Outputs are filled
with NaN before each run, so an element the kernel fails to write fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
pytest.importorskip("triton")

from kernels.attention_ref import paged_attention_ref, reshape_and_cache_ref
from kernels.attention_triton import (
    paged_attention_triton,
    reshape_and_cache_triton,
)
from kernels.decode_attention import (
    choose_num_splits,
    paged_decode_attention_triton,
    split_counters,
    split_min_tokens,
)
from kernels.elementwise_ref import (
    gelu_and_mul_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)
from kernels.elementwise_triton import (
    gelu_and_mul_triton,
    rms_norm_triton,
    rotary_triton,
    silu_and_mul_triton,
)
from kernels.prefill_attention import paged_prefill_attention_triton
from kernels.triton_common import interpreting

HAS_CUDA = torch.cuda.is_available() and not interpreting()
DEV = "cuda" if HAS_CUDA else "cpu"
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}
# Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even), so
# elementwise results may differ from the reference by one bf16 ulp (2^-8 relative) on the CPU.
EW_TOL = 4e-3 if HAS_CUDA else 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN) or NaN output elements"
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-12)).item()


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


# ---------------------------------------------------------------------------------------------
# paged attention inputs


def paged_inputs(ctx_lens: list[int], q_lens: list[int], heads: int, kv_heads: int,
                 head_dim: int, block_size: int, dtype: torch.dtype, alibi: bool = False):
    """A random paged cache for the given sequences. The reference reads a clean cache; the
    kernel's copy has NaN in every slot past each context and in unused blocks, and its block
    tables point past-the-end entries at a NaN block: reading any of them shows in the output."""
    num_seqs = len(ctx_lens)
    max_blocks = max(-(-c // block_size) for c in ctx_lens)
    num_blocks = num_seqs * max_blocks + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_ref = torch.randn(shape, dtype=dtype, device=DEV)
    v_ref = torch.randn(shape, dtype=dtype, device=DEV)
    perm = torch.randperm(num_seqs * max_blocks, device=DEV)
    bt_ref = perm.view(num_seqs, max_blocks).int()
    k_tri, v_tri, bt_tri = k_ref.clone(), v_ref.clone(), bt_ref.clone()
    k_tri[-2:] = float("nan")
    v_tri[-2:] = float("nan")
    for s, c in enumerate(ctx_lens):
        used = -(-c // block_size)
        bt_tri[s, used:] = num_blocks - 1
        if c % block_size:
            k_tri[bt_ref[s, used - 1], c % block_size:] = float("nan")
            v_tri[bt_ref[s, used - 1], c % block_size:] = float("nan")
    qsl = torch.zeros(num_seqs + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    query = torch.randn(int(qsl[-1]), heads, head_dim, dtype=dtype, device=DEV)
    slopes = torch.rand(heads, device=DEV) * 0.5 if alibi else None
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    return {"query": query, "k_ref": k_ref, "v_ref": v_ref, "k_tri": k_tri, "v_tri": v_tri,
            "bt_ref": bt_ref, "bt_tri": bt_tri, "ctx": ctx, "qsl": qsl.to(DEV), "slopes": slopes}


def attention_ref(d: dict, q_lens: list[int], ctx_lens: list[int], window, cap) -> torch.Tensor:
    head_dim = d["query"].shape[-1]
    return paged_attention_ref(d["query"], d["k_ref"], d["v_ref"], d["bt_ref"], d["ctx"],
                               d["qsl"], max(q_lens), max(ctx_lens), head_dim ** -0.5,
                               d["slopes"], window, cap)


# ---------------------------------------------------------------------------------------------
# decode

# (heads, kv_heads, head_dim, block_size, dtype, alibi, window, soft_cap, num_splits)
DECODE_CASES = [
    (4, 4, 64, 16, torch.float16, False, None, None, 1),  # MHA
    (8, 2, 80, 32, torch.bfloat16, True, None, None, 1),  # GQA, padded head, ALiBi
    (8, 1, 96, 16, torch.float16, False, 40, None, 1),  # MQA, padded head, window
    (4, 2, 128, 32, torch.bfloat16, True, 50, 20.0, 1),  # everything at once
    (2, 1, 256, 16, torch.bfloat16, False, None, 10.0, 1),  # d=256, soft-cap
    (4, 1, 64, 16, torch.float16, False, None, None, 3),  # split-K
    (8, 2, 128, 32, torch.bfloat16, True, 70, None, 4),  # split-K + window + ALiBi
    (4, 4, 80, 16, torch.float16, False, None, 30.0, 7),  # more splits than some ctx has tiles
    (32, 1, 64, 32, torch.float16, True, None, None, 2),  # group of 32 heads in one tile
    (4, 2, 64, 16, torch.float16, False, None, None, 64),  # the most splits: most are idle
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}b{c[3]}"
                         f"{'-alibi' if c[5] else ''}{'-win' if c[6] else ''}"
                         f"{'-cap' if c[7] else ''}-s{c[8]}")
def test_decode_attention(case):
    heads, kv_heads, head_dim, bs, dtype, alibi, window, cap, splits = case
    ctx_lens = [1, bs, bs + 1, 3 * bs - 1, 150]  # partial / exactly-full last blocks
    q_lens = [1] * len(ctx_lens)
    d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype, alibi)
    ref = attention_ref(d, q_lens, ctx_lens, window, cap)
    out = nan_like(d["query"])
    paged_decode_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"], d["ctx"],
                                  head_dim ** -0.5, d["slopes"], window, cap,
                                  num_splits=splits, out=out)
    assert rel_err(out, ref) < TOL[dtype]


def test_split_decode_calls_in_a_row_leave_the_counters_at_zero():
    """The splits of a (sequence, KV head) count themselves in on a shared counter that the
    last one resets: calls in a row at other batch sizes and split counts (each leaving the
    counters to the next) all equal the reference, and the counters end at zero."""
    for ctx_lens, splits in (([150, 3, 70], 3), ([40, 200], 5), ([1, 100, 33, 64], 2)):
        assert_split_decode_twice_equals_the_reference(ctx_lens, num_splits=splits)
    assert int(split_counters(torch.device(DEV), 1).abs().sum()) == 0


def assert_split_decode_twice_equals_the_reference(ctx_lens: list[int], **kwargs) -> None:
    """Two split decode calls in a row (each leaving the counters to the next) into a poisoned
    output, each within float16 tolerance of the reference; kwargs: the split arguments."""
    q_lens = [1] * len(ctx_lens)
    d = paged_inputs(ctx_lens, q_lens, 8, 2, 64, 16, torch.float16, False)
    ref = attention_ref(d, q_lens, ctx_lens, None, None)
    for _ in range(2):
        out = nan_like(d["query"])
        paged_decode_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"],
                                      d["ctx"], 64 ** -0.5, out=out, **kwargs)
        assert rel_err(out, ref) < TOL[torch.float16]


def test_a_sequence_splits_only_as_far_as_its_context_fills_splits():
    """With a minimum split length a sequence uses fewer splits than the grid has (a short
    context in a graph captured for long ones): 1000 keys over 8 of the 16 splits, 300 over
    3, 100 and 1 over one. The grid's other programs return at once; if one counted itself in
    or left a partial the output (poisoned) or the counters would show it."""
    assert_split_decode_twice_equals_the_reference([1000, 100, 1, 300], num_splits=16,
                                                   min_split_tokens=128)
    assert int(split_counters(torch.device(DEV), 1).abs().sum()) == 0


@pytest.mark.cuda
@cuda
def test_split_decode_inside_a_cuda_graph():
    """Decode runs in captured CUDA graphs: a graph of a split decode call replayed on new
    queries gives the reference each time and leaves the counters at zero."""
    ctx_lens = [3000, 1, 700]
    q_lens = [1] * len(ctx_lens)
    d = paged_inputs(ctx_lens, q_lens, 32, 8, 128, 16, torch.bfloat16, False)
    out = torch.empty_like(d["query"])

    def call():
        paged_decode_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"],
                                      d["ctx"], 128 ** -0.5, max_context_len=4096, out=out)

    call()  # compiles, makes the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        d["query"].copy_(torch.randn_like(d["query"]))
        graph.replay()
        assert rel_err(out, attention_ref(d, q_lens, ctx_lens, None, None)) < TOL[torch.bfloat16]
    torch.cuda.synchronize()
    assert int(split_counters(torch.device(DEV), 1).abs().sum()) == 0


def test_choose_num_splits():
    """The split counts that were best in the run-11c sweep (docs/PERF.md, one H200, 8 KV
    heads), or within 10 % of the best."""
    assert choose_num_splits(64, 8, 4096, 132) == 1  # 512 programs fill 132 SMs
    assert choose_num_splits(1, 8, 256, 132) == 4  # one tile of 64 keys each
    assert choose_num_splits(1, 8, 4096, 132) == 32
    assert choose_num_splits(4, 8, 1024, 132) == 9  # best 8: 13.2 us
    assert choose_num_splits(16, 8, 8192, 132) == 8  # a split per 1024 keys
    assert choose_num_splits(1, 8, 40, 132) == 1  # less than a tile
    assert choose_num_splits(1, 1, 10**6, 132) == 32
    # a sequence's splits take >= 1 tile at batch 1, 8 at batch 16 (256 keys: unsplit)
    assert split_min_tokens(1, 8) == 64
    assert split_min_tokens(16, 8) == 512


# ---------------------------------------------------------------------------------------------
# prefill (varlen, chunked prefill, prefix-cache hits)

# (heads, kv_heads, head_dim, block_size, dtype, alibi, window, soft_cap, q_lens, ctx_lens)
PREFILL_CASES = [
    (4, 4, 64, 16, torch.float16, False, None, None, [5, 40, 17], [5, 40, 17]),  # varlen MHA
    (8, 2, 80, 32, torch.bfloat16, True, None, None, [20, 33], [52, 90]),  # chunked, ALiBi
    (4, 1, 96, 16, torch.float16, False, 24, None, [48, 9], [48, 61]),  # MQA, window
    (4, 2, 128, 32, torch.bfloat16, True, 20, 15.0, [37], [80]),  # everything
    (2, 1, 256, 16, torch.bfloat16, False, None, 10.0, [33, 1], [33, 47]),  # d=256
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}b{c[3]}"
                         f"{'-alibi' if c[5] else ''}{'-win' if c[6] else ''}"
                         f"{'-cap' if c[7] else ''}")
def test_prefill_attention(case):
    heads, kv_heads, head_dim, bs, dtype, alibi, window, cap, q_lens, ctx_lens = case
    d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype, alibi)
    ref = attention_ref(d, q_lens, ctx_lens, window, cap)
    out = nan_like(d["query"])
    paged_prefill_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"], d["ctx"],
                                   d["qsl"], max(q_lens), head_dim ** -0.5, d["slopes"],
                                   window, cap, out=out)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("config", [{"block_m": 32, "block_n": 16}, {"block_m": 64, "block_n": 32},
                                    {"block_m": 16, "block_n": 64}], ids=str)
def test_prefill_attention_tiles(config):
    """Other tile shapes than the default, over a chunk that starts mid-block."""
    q_lens, ctx_lens, window = [70, 3], [101, 40], 45
    d = paged_inputs(ctx_lens, q_lens, 4, 2, 64, 16, torch.float16, alibi=True)
    ref = attention_ref(d, q_lens, ctx_lens, window, None)
    out = nan_like(d["query"])
    paged_prefill_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"], d["ctx"],
                                   d["qsl"], max(q_lens), 64 ** -0.5, d["slopes"], window,
                                   None, out=out, config=config)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_attention_step_mixed_batch():
    """One engine step: write the batch's new keys/values, then attend, prefills
    (a fresh prompt and a chunk after a prefix-cache hit) first and decodes after."""
    heads, kv_heads, head_dim, bs, dtype = 4, 2, 64, 16, torch.float16
    q_lens, ctx_lens = [12, 10, 1, 1, 1], [12, 40, 7, 33, 16]
    d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype)
    # the batch's new keys/values: positions ctx - q_len .. ctx - 1 of each sequence
    slots = []
    for s, (q, c) in enumerate(zip(q_lens, ctx_lens)):
        for pos in range(c - q, c):
            slots.append(int(d["bt_ref"][s, pos // bs]) * bs + pos % bs)
    slots = torch.tensor(slots, device=DEV)
    padded = torch.cat([slots, torch.tensor([-1], device=DEV)])  # a padding token
    new_k = torch.randn(len(padded), kv_heads, head_dim, dtype=dtype, device=DEV)
    new_v = torch.randn_like(new_k)
    reshape_and_cache_ref(new_k, new_v, d["k_ref"], d["v_ref"], padded)
    reshape_and_cache_triton(new_k, new_v, d["k_tri"], d["v_tri"], padded)
    ref = attention_ref(d, q_lens, ctx_lens, None, None)
    out = paged_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"], d["ctx"],
                                 d["qsl"], max(q_lens), max(ctx_lens), 2, sum(q_lens[:2]),
                                 head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


def test_reshape_and_cache():
    kv_heads, head_dim, bs, num_blocks = 3, 80, 16, 6
    cache_shape = (num_blocks, bs, kv_heads, head_dim)
    kc = torch.full(cache_shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.randperm(num_blocks * bs, device=DEV)[:21]
    slots[[3, 10]] = -1
    kv = torch.randn(21, 2, kv_heads, head_dim, dtype=torch.bfloat16, device=DEV)
    key, value = kv[:, 0], kv[:, 1]  # strided views, as sliced from a fused qkv
    reshape_and_cache_triton(key, value, kc, vc, slots)
    reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(kc.nan_to_num(7.0), kc_ref.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc_ref.nan_to_num(7.0))


def test_reshape_and_cache_fp8():
    """Into an FP8 (e4m3) cache: each value clamped to +-448 and rounded to nearest even,
    as torch's own conversion of the clamped value (the cache has no scale: it is 1)."""
    kv_heads, head_dim, bs, num_blocks = 2, 64, 16, 4
    kc = torch.full((num_blocks, bs, kv_heads, head_dim), float("nan"), device=DEV).to(
        torch.float8_e4m3fn)
    vc = kc.clone()
    slots = torch.randperm(num_blocks * bs, device=DEV)[:19]
    slots[5] = -1
    key = torch.randn(19, kv_heads, head_dim, dtype=torch.bfloat16, device=DEV) * 3
    key[0, 0, :4] = torch.tensor([600.0, -1000.0, 447.0, 1e-3])  # past the range, tiny
    value = torch.randn_like(key) * 100
    reshape_and_cache_triton(key, value, kc, vc, slots)
    ok = slots >= 0
    s = slots[ok]
    for cache, x in ((kc, key), (vc, value)):
        want = x[ok].float().clamp(-448, 448).to(torch.float8_e4m3fn)
        got = cache[s // bs, s % bs]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert kc[s // bs, s % bs][0, 0, :2].float().tolist() == [448.0, -448.0]
    unwritten = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEV)
    unwritten[s] = False
    assert kc.view(-1, kv_heads, head_dim)[unwritten].float().isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
def test_attention_reads_an_fp8_cache(kind, dtype):
    """The kernels widen an FP8 cache's keys and values (to fp16 for a 16-bit query, to
    float32 for a float32 one): the same attention as the reference's over the same FP8
    cache, within the query dtype's tolerance."""
    heads, kv_heads, head_dim, bs = 8, 2, 64, 16
    q_lens, ctx_lens = {"decode": ([1, 1, 1], [1, 17, 150]),
                        "prefill": ([20, 33], [52, 90]),
                        "mixed": ([12, 10, 1, 1], [12, 40, 7, 33])}[kind]
    d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype)
    for key in ("k_ref", "v_ref", "k_tri", "v_tri"):
        d[key] = (d[key] * 4).to(torch.float8_e4m3fn)
    ref = attention_ref(d, q_lens, ctx_lens, None, None)
    num_prefills = sum(1 for q in q_lens if q > 1)
    out = paged_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"], d["ctx"],
                                 d["qsl"], max(q_lens), max(ctx_lens), num_prefills,
                                 sum(q_lens[:num_prefills]), head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


# ---------------------------------------------------------------------------------------------
# elementwise


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset,wdtype", [(0.0, torch.bfloat16), (1.0, torch.bfloat16),
                                           (0.0, torch.float32)])
def test_rms_norm(residual, offset, wdtype, tokens=7, hidden=96):
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=DEV)
    res = torch.randn_like(x) if residual else None
    w = (torch.rand(hidden, device=DEV) + 0.5).to(wdtype)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, res, offset)
    out, res_out = nan_like(ref), (nan_like(x) if residual else None)
    got, got_res = rms_norm_triton(x, w, 1e-6, res, offset, out=out, residual_out=res_out)
    assert got.dtype == ref.dtype and got.data_ptr() == out.data_ptr()
    assert rel_err(got, ref) < EW_TOL
    if residual:
        torch.testing.assert_close(got_res, ref_res, rtol=2 ** -7, atol=0)
    else:
        assert got_res is None


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial rotary
def test_rotary(is_neox, rotary_dim, tokens=5, heads=3, kv_heads=1, head_dim=64):
    cache = torch.randn(50, rotary_dim, device=DEV)  # any cos/sin values test the math
    pos = torch.randint(0, 50, (tokens,), device=DEV)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16,
                      device=DEV)
    q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    ref_q, ref_k = rotary_ref(pos, q, k, cache, head_dim, is_neox)
    out = (nan_like(ref_q), nan_like(ref_k))
    got_q, got_k = rotary_triton(pos, q, k, cache, head_dim, is_neox, out=out)
    assert rel_err(got_q, ref_q) < EW_TOL and rel_err(got_k, ref_k) < EW_TOL
    q2, k2 = q.clone(), k.clone()
    in_q, _ = rotary_triton(pos, q2, k2, cache, head_dim, is_neox, inplace=True)
    assert in_q.data_ptr() == q2.data_ptr()
    assert rel_err(q2, ref_q) < EW_TOL and rel_err(k2, ref_k) < EW_TOL


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial rotary
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_rotary_and_cache(is_neox, rotary_dim, cache_dtype, tokens=21, heads=6, kv_heads=2,
                          head_dim=64, bs=16, num_blocks=4):
    """The fused kernel gives the rotary kernel's query and writes exactly what the rotary
    then reshape_and_cache kernels write (the rotated key rounded to bf16 before the cache's
    dtype, the value as it is), skipping padding slots; and both match the torch references
    (the rotated key within a bf16 ulp, the value exactly)."""
    from kernels.elementwise_triton import rotary_and_cache_triton

    cache = torch.randn(50, rotary_dim, device=DEV) * 2  # any cos/sin values test the math
    pos = torch.randint(0, 50, (tokens,), device=DEV)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16,
                      device=DEV) * 100  # past e4m3's +-448 once rotated, for the FP8 cache
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    slots = torch.randperm(num_blocks * bs, device=DEV)[:tokens]
    slots[[2, 9]] = -1
    shape = (num_blocks, bs, kv_heads, head_dim)
    kv_fused = torch.full((2, *shape), float("nan"), device=DEV).to(cache_dtype)
    kv_two, kv_ref = kv_fused.clone(), kv_fused.clone()
    got_q = rotary_and_cache_triton(pos, q, k, v, cache, head_dim, is_neox, kv_fused[0],
                                    kv_fused[1], slots)
    two_q, two_k = rotary_triton(pos, q, k, cache, head_dim, is_neox)
    heads_of = (tokens, kv_heads, head_dim)
    reshape_and_cache_triton(two_k.view(heads_of), v.view(heads_of), kv_two[0], kv_two[1], slots)
    bits = torch.uint8 if cache_dtype == torch.float8_e4m3fn else torch.int16
    assert torch.equal(got_q, two_q)
    assert torch.equal(kv_fused.view(bits), kv_two.view(bits))

    ref_q, ref_k = rotary_ref(pos, q, k, cache, head_dim, is_neox)
    reshape_and_cache_ref(ref_k.view(heads_of), v.view(heads_of), kv_ref[0], kv_ref[1], slots)
    assert rel_err(got_q, ref_q) < EW_TOL
    ok = slots >= 0
    s = slots[ok]
    for i in (0, 1):
        got, want = kv_fused[i][s // bs, s % bs].float(), kv_ref[i][s // bs, s % bs].float()
        if i == 1:
            assert torch.equal(got, want)
        else:  # one ulp of the rotated bf16 key (or of its e4m3 value)
            step = 2.0 ** -3 if cache_dtype == torch.float8_e4m3fn else 2.0 ** -7
            assert bool(((got - want).abs() <= step * want.abs() + 1e-6).all())
    unwritten = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEV)
    unwritten[s] = False
    assert kv_fused[0].view(-1, kv_heads, head_dim)[unwritten].float().isnan().all()


@pytest.mark.parametrize("layout", ["slots strided apart", "blocks strided apart"])
def test_rotary_and_cache_into_caches_of_other_layouts(layout, tokens=9, kv_heads=2,
                                                       head_dim=32, bs=16, num_blocks=3):
    """Caches that are views of a bigger tensor: slots a fixed stride apart take the fused
    kernel, blocks apart from their slots the two kernels; both write what the rotary then
    reshape_and_cache references write."""
    from kernels.elementwise_triton import rotary_and_cache_triton

    cache = torch.randn(40, head_dim, device=DEV)
    pos = torch.randint(0, 40, (tokens,), device=DEV)
    q = torch.randn(tokens, 4 * head_dim, dtype=torch.float16, device=DEV)
    k = torch.randn(tokens, kv_heads * head_dim, dtype=torch.float16, device=DEV)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * bs, device=DEV)[:tokens]
    if layout == "slots strided apart":  # [blocks, block, 2 (k | v), heads, dim]
        big = torch.zeros(num_blocks, bs, 2, kv_heads, head_dim, dtype=torch.float16,
                          device=DEV)
        kc, vc = big[:, :, 0], big[:, :, 1]
    else:  # [blocks, 2 (k | v), block, heads, dim]
        big = torch.zeros(num_blocks, 2, bs, kv_heads, head_dim, dtype=torch.float16,
                          device=DEV)
        kc, vc = big[:, 0], big[:, 1]
    kc_ref, vc_ref = torch.zeros_like(kc), torch.zeros_like(vc)
    got_q = rotary_and_cache_triton(pos, q, k, v, cache, head_dim, True, kc, vc, slots)
    ref_q, ref_k = rotary_ref(pos, q, k, cache, head_dim, True)
    heads = (tokens, kv_heads, head_dim)
    reshape_and_cache_ref(ref_k.view(heads), v.view(heads), kc_ref, vc_ref, slots)
    assert rel_err(got_q, ref_q) < EW_TOL
    assert rel_err(kc, kc_ref) < EW_TOL and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("cache_ty", ["*bf16", "*fp8e4nv"])
def test_rotary_and_cache_compiles_for_hopper(cache_ty):
    """The fused rotary + cache-write kernel compiles to sm_90 cubins (tests/hopper_compile.py:
    no GPU needed) at Llama's head shapes: neox with the full rotary, gptj with a partial one,
    bf16 and FP8 caches."""
    from hopper_compile import compile_for_hopper

    sig = dict.fromkeys(["pos_ptr", "slot_ptr"], "*i64")
    sig |= dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "qo_ptr"], "*bf16")
    sig |= {"kc_ptr": cache_ty, "vc_ptr": cache_ty, "cache_ptr": "*fp32"}
    sig |= dict.fromkeys(["num_tokens", "num_q_heads", "num_k_heads", "stride_qt", "stride_kt",
                          "stride_vt", "stride_qot", "stride_kcs", "stride_vcs", "stride_c"],
                         "i32")
    base = {"HEAD_DIM": 128, "BLOCK_T": 1, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_D": 128,
            "FP8": cache_ty == "*fp8e4nv", "FP8_MAX": 448.0, "ROUND": False}
    variants = [{**base, "HALF": rot // 2, "BLOCK_HALF": rot // 2,
                 "BLOCK_REST": max(128 - rot, 1), "NEOX": neox, "COPY_REST": rot < 128}
                for neox, rot in ((True, 128), (False, 64))]
    compile_for_hopper("kernels.elementwise_triton", "_rotary_cache_kernel", sig, variants)


@pytest.mark.parametrize("kind", ["silu", "gelu-none", "gelu-tanh"])
def test_act_and_mul(kind, shape=(3, 4, 2 * 48), dtype=torch.bfloat16):
    x = torch.randn(shape, dtype=dtype, device=DEV) * 3
    if kind == "silu":
        ref = silu_and_mul_ref(x)
        got = silu_and_mul_triton(x, out=nan_like(ref))
    else:
        approx = kind.split("-")[1]
        ref = gelu_and_mul_ref(x, approx)
        got = gelu_and_mul_triton(x, approx, out=nan_like(ref))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < EW_TOL


# ---------------------------------------------------------------------------------------------
# real sizes (GPU only)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,bs", [
    (32, 8, 128, 16), (32, 32, 64, 32), (32, 1, 128, 16), (16, 4, 80, 16), (16, 2, 96, 32),
    (8, 8, 256, 16), (16, 4, 256, 32)])
def test_decode_attention_real(heads, kv_heads, head_dim, bs):
    dtype = torch.bfloat16
    for num_seqs, max_ctx in [(64, 4096), (3, 20000)]:  # one split / automatic split-K
        ctx_lens = torch.randint(1, max_ctx + 1, (num_seqs,)).tolist()
        ctx_lens[0] = max_ctx
        q_lens = [1] * num_seqs
        d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype,
                         alibi=head_dim == 80)
        window = 1000 if head_dim == 96 else None
        cap = 30.0 if head_dim == 256 else None
        ref = attention_ref(d, q_lens, ctx_lens, window, cap)
        out = nan_like(d["query"])
        paged_decode_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"],
                                      d["ctx"], head_dim ** -0.5, d["slopes"], window, cap,
                                      max_context_len=max_ctx, out=out)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,bs,alibi,window,cap", [
    (32, 8, 128, 16, False, None, None), (32, 32, 64, 32, True, None, None),
    (16, 1, 80, 16, False, 512, None), (16, 4, 96, 32, False, None, 30.0),
    (8, 2, 256, 16, True, 700, 50.0)])
def test_prefill_attention_real(heads, kv_heads, head_dim, bs, alibi, window, cap):
    dtype = torch.bfloat16
    for q_lens, ctx_lens in [([4096], [4096]), ([700, 1500, 1], [2000, 1500, 3333])]:
        d = paged_inputs(ctx_lens, q_lens, heads, kv_heads, head_dim, bs, dtype, alibi)
        ref = attention_ref(d, q_lens, ctx_lens, window, cap)
        out = nan_like(d["query"])
        paged_prefill_attention_triton(d["query"], d["k_tri"], d["v_tri"], d["bt_tri"],
                                       d["ctx"], d["qsl"], max(q_lens), head_dim ** -0.5,
                                       d["slopes"], window, cap, out=out)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.cuda
@cuda
def test_elementwise_real():
    test_rms_norm(True, 1.0, torch.bfloat16, tokens=4096, hidden=4096)
    test_rms_norm(False, 0.0, torch.bfloat16, tokens=300, hidden=8192)
    test_rotary(True, 128, tokens=4096, heads=32, kv_heads=8, head_dim=128)
    test_rotary(False, 64, tokens=1000, heads=32, kv_heads=8, head_dim=128)
    test_act_and_mul("silu", shape=(4096, 2 * 14336))
    test_act_and_mul("gelu-tanh", shape=(1000, 2 * 11008))


def test_attention_calls_a_rotary_of_its_own_forward():
    """PagedAttention(..., rotary=) rotates in its cache-write kernel only for the stock
    RotaryEmbedding; a subclass with a forward of its own (an out-of-tree model's) is called as
    it is, and the output is the same as calling it first and the attention without it."""
    from engine.layers.attention import PagedAttention
    from engine.layers.attention_metadata import AttentionMetadata
    from engine.layers.rotary import RotaryEmbedding

    class Shifted(RotaryEmbedding):  # the stock rotation, three positions on
        def forward(self, positions, query, key, long_rope=None):
            return super().forward(positions + 3, query, key, long_rope)

    tokens, heads, kv_heads, head_dim, bs = 5, 4, 2, 16, 16
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    q = torch.randn(tokens, heads * head_dim)
    k, v = torch.randn(2, tokens, kv_heads * head_dim)
    positions = torch.arange(tokens)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        context_lens=torch.tensor([tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32),
        seq_start_loc=torch.tensor([0, tokens], dtype=torch.int32), max_query_len=tokens,
        max_context_len=tokens, num_prefills=1, num_prefill_tokens=tokens, num_decode_tokens=0)
    attn = PagedAttention(heads, head_dim, head_dim ** -0.5, kv_heads)
    for rotary in (RotaryEmbedding(head_dim, head_dim, 64, rope),
                   Shifted(head_dim, head_dim, 64, rope)):
        outs = []
        for fused in (True, False):
            kv = torch.zeros(2, 1, bs, kv_heads, head_dim)
            if fused:
                outs.append(attn(q, k, v, kv, meta, rotary=rotary, positions=positions))
            else:
                rq, rk = rotary(positions, q, k)
                outs.append(attn(rq, rk, v, kv, meta))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_split_decode_compiles_for_hopper():
    """The decode kernel with its early return for idle splits and the one-load-per-head
    combine compiles to sm_90 cubins (tests/hopper_compile.py: no GPU needed), for Llama's
    group of 4 heads at 64 splits and a group of 32 (MQA) at 2."""
    from hopper_compile import compile_for_hopper

    sig = dict.fromkeys(["q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"], "*bf16")
    sig |= {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "alibi_ptr": "*fp32",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "count_ptr": "*i32",
            "qk_scale": "fp32", "cap_in": "fp32", "cap_out": "fp32"}
    sig |= dict.fromkeys(["window", "stride_qt", "stride_qh", "stride_ot", "stride_oh",
                          "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt",
                          "stride_vh", "stride_bt", "num_heads", "num_splits", "min_tiles"],
                         "i32")
    base = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_H": 16, "BLOCK_N": 64, "PAGE": 16,
            "USE_ALIBI": False, "USE_WINDOW": False, "USE_SOFTCAP": False, "UPCAST": False,
            "KV_FP8": False}
    variants = [{**base, "GROUP": group, "BLOCK_H": max(16, group), "SPLIT": splits > 1,
                 "BLOCK_S": max(2, splits)}
                for group, splits in ((4, 64), (32, 2))]
    compile_for_hopper("kernels.decode_attention", "_decode_kernel", sig, variants)
