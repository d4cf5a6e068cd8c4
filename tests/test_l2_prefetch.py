"""The L2 prefetch of each layer's out projection during decode attention
(engine.layers.attention.plan_l2_prefetch, kernels/l2_prefetch.py): what is planned for which
layer, that the kernel compiles to prefetch instructions for sm_90, and on CUDA that a step
with it gives the tokens a step without it gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.layers.attention import PagedAttention, plan_l2_prefetch
from engine.layers.linear import RowParallelLinear
from engine.runner.model_runner import build_model


def tiny_model(model_dir, **options):
    model, _ = build_model(EngineConfig.create(str(model_dir), device="cpu", **options),
                           torch.device("cpu"))
    return model


def attention_blocks(model):
    """(PagedAttention, its out projection) of every layer, found by hand: the block that
    holds the attention also holds o_proj."""
    return [(m.attn, m.o_proj) for m in model.modules() if hasattr(m, "attn")
            and isinstance(m.attn, PagedAttention)]


def test_each_layer_prefetches_its_own_out_projection(tiny_llama_dir):
    model = tiny_model(tiny_llama_dir)
    blocks = attention_blocks(model)
    assert len(blocks) == model.num_layers >= 2
    assert plan_l2_prefetch(model, l2_bytes=2**30, fraction=0.7) == model.num_layers
    for attn, o_proj in blocks:
        assert len(attn.l2_prefetch) == 1 and attn.l2_prefetch[0] is o_proj.weight


def test_a_budget_below_the_weight_takes_a_prefix_of_whole_rows(tiny_llama_dir):
    model = tiny_model(tiny_llama_dir)
    attn, o_proj = attention_blocks(model)[0]
    w = o_proj.weight
    row_bytes = w.shape[1] * w.element_size()
    budget = 5 * row_bytes + row_bytes // 2  # five and a half rows
    plan_l2_prefetch(model, l2_bytes=budget, fraction=1.0)
    (part,) = attn.l2_prefetch
    assert part.shape == (5, w.shape[1]) and part.data_ptr() == w.data_ptr()
    # nothing fits: nothing planned, and an earlier plan is cleared
    assert plan_l2_prefetch(model, l2_bytes=2**30, fraction=0.0) == 0
    assert all(not a.l2_prefetch for a, _ in attention_blocks(model))


def test_fp8_weights_and_their_scales_largest_first(tiny_llama_dir):
    model = tiny_model(tiny_llama_dir, quantization="fp8")
    attn, o_proj = attention_blocks(model)[0]
    plan_l2_prefetch(model, l2_bytes=2**30, fraction=0.7)
    assert attn.l2_prefetch[0] is o_proj.weight
    assert o_proj.weight.dtype == torch.float8_e4m3fn
    assert any(t is o_proj.weight_scale for t in attn.l2_prefetch)


def test_a_block_with_two_row_parallel_layers_is_left_without():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = PagedAttention(2, 8, 1.0)
            self.a = RowParallelLinear(16, 16, bias=False)
            self.b = RowParallelLinear(16, 16, bias=False)

    block = TwoOut()
    assert plan_l2_prefetch(block, l2_bytes=2**30, fraction=1.0) == 0 and block.attn.l2_prefetch == []


def test_prefetch_kernel_compiles_to_l2_prefetches_for_hopper():
    """The inline prefetch survives compilation (the result of the asm is unused; it must not
    be dropped): 1024 lines a step over 4 warps are 8 prefetches a thread."""
    from hopper_compile import compile_launches

    sig = {"ptr": "*u8", "num_lines": "i32"}
    counts = compile_launches(
        "kernels.l2_prefetch", "_prefetch_kernel", sig,
        [{"constexprs": {"LINES": 1024, "LINE": 128, "EVICT_LAST": ev}, "num_warps": 4}
         for ev in (False, True)], ptx_count="prefetch.global.L2")
    assert counts == [8, 8]


@pytest.mark.cuda
def test_greedy_tokens_with_and_without_the_prefetch_cuda(tiny_llama_dir):
    """On CUDA, decode graphs captured with the prefetch branch give the tokens of graphs
    captured without it, and of the CPU (the prefetch writes nothing)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from engine import LLM, SamplingParams
    from engine.runner.cuda_graphs import CUDAGraphs
    from engine.runner.model_runner import l2_cache_bytes

    prompts = ["hello", "the quick brown fox jumps over the lazy dog", "a b c d e f g"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    cpu = tokens(LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=32))
    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="float32", num_kv_blocks=32)
    runner = llm.engine.executor
    found = []
    for fraction in (0.7, 0.0):
        planned = plan_l2_prefetch(runner.model, l2_cache_bytes(runner.device), fraction)
        assert planned == (runner.model.num_layers if fraction else 0)
        runner.graphs.reset()
        runner.graphs = CUDAGraphs(runner, runner.config.scheduler.max_num_seqs)
        found.append(tokens(llm))
    assert found[0] == found[1] == cpu
