"""The engine on a GPU: same greedy tokens as on CPU (float32), CUDA graphs equal eager, with
asynchronous scheduling on and off, and bf16 close to HF. Skipped without CUDA (run through the
device tool)."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.cuda
PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "a b c d e f g",
           "paged attention keeps the cache in blocks of sixteen tokens"]


def _tokens(llm: LLM, n: int = 24) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_cuda_float32_matches_cpu_and_graphs_match_eager(which, request):
    ckpt = str(request.getfixturevalue("tiny_llama_dir" if which == "untied"
                                       else "tiny_llama_tied_dir"))
    cpu = _tokens(LLM(ckpt, device="cpu", num_kv_blocks=32))
    eager = _tokens(LLM(ckpt, device="cuda", dtype="float32", num_kv_blocks=32,
                        enforce_eager=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that falls back to eager fails here
        graphs = LLM(ckpt, device="cuda", dtype="float32", num_kv_blocks=32,
                     async_scheduling=True)
    assert graphs.engine.executor.graphs is not None
    assert eager == cpu
    assert _tokens(graphs) == cpu
    in_sync = LLM(ckpt, device="cuda", dtype="float32", num_kv_blocks=32,
                  async_scheduling=False)
    assert _tokens(in_sync) == cpu


def test_cuda_bf16_close_to_hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=64)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).cuda()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                logprobs=5))
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0].float(), -1)
        p = len(out.prompt_token_ids)
        for step, tok in enumerate(out.outputs[0].token_ids):
            ref_row = ref[p - 1 + step]
            # vLLM's rule: our greedy token is within HF's top-5 ...
            assert tok in ref_row.topk(5).indices.tolist()
            # ... and its log-prob is close to HF's
            assert abs(out.outputs[0].logprobs[step][tok] - ref_row[tok].item()) < 0.1


def test_cuda_fp8_kv_cache_matches_cpu(tiny_llama_dir):
    """--kv-cache-dtype fp8 on the GPU (Triton write, decode and prefill kernels, CUDA graphs)
    gives the CPU reference's greedy tokens at float32: both round keys and values the same way."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 conversions need compute capability >= 8.9")
    ckpt = str(tiny_llama_dir)
    cpu = _tokens(LLM(ckpt, device="cpu", num_kv_blocks=32, kv_cache_dtype="fp8"))
    gpu = LLM(ckpt, device="cuda", dtype="float32", num_kv_blocks=32, kv_cache_dtype="fp8")
    assert gpu.engine.executor.graphs is not None
    assert {c.dtype for c in gpu.engine.executor.kv_caches} == {torch.float8_e4m3fn}
    assert _tokens(gpu) == cpu


def _causal_reference(q, k, v, lens, scale):
    """float32 causal softmax attention per sequence, the GQA groups expanded by hand."""
    out, start, group = [], 0, q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        s = (qs @ ks.transpose(1, 2)) * scale  # [H, n, n]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
        out.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lens", [(300, 128, 517), (256,) * 4, (4097,)],
                         ids=["unequal-padded", "equal", "one-padded"])
def test_dense_prefill_attention_matches_a_float32_reference(lens):
    from kernels.dense_prefill import dense_prefill_attention, dense_prefill_usable

    torch.manual_seed(0)
    t = sum(lens)
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert dense_prefill_usable(q, 8, lens), "cuDNN attention does not run on this GPU"
    got = dense_prefill_attention(q, k, v, lens, 128 ** -0.5)
    ref = _causal_reference(q, k, v, lens, 128 ** -0.5)
    assert got.shape == q.shape
    assert (got.float() - ref).abs().max().item() < 2e-2


def test_cuda_dense_prefill_close_to_hf_and_to_the_paged_path(tiny_llama_dir, monkeypatch):
    # prompts of 200 tokens from position 0 take cuDNN's attention; the same engine with the
    # path off (the paged kernel) gives the same greedy tokens, and both are close to HF
    from transformers import AutoModelForCausalLM

    import kernels.dense_prefill as dp
    from engine.layers import attention

    calls = []

    def spy(*args):
        calls.append(args[3])
        return dp.dense_prefill_attention(*args)
    prompts = [[5 + (11 * i + 7 * j) % 500 for j in range(200)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=128)
    monkeypatch.setattr(attention, "dense_prefill_attention", spy)  # (after the start-up)
    dense = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert calls == [(200, 200, 200)] * 2  # two layers, one step (each padded to 224)
    monkeypatch.setattr(dp, "DEVICES", ())
    paged = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert len(calls) == 2
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).cuda()
    for a, b in zip(dense, paged):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        ids = torch.tensor([a.prompt_token_ids + a.outputs[0].token_ids], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0].float(), -1)
        for step, tok in enumerate(a.outputs[0].token_ids):
            row = ref[len(a.prompt_token_ids) - 1 + step]
            assert tok in row.topk(5).indices.tolist()
            assert abs(a.outputs[0].logprobs[step][tok] - row[tok].item()) < 0.1
