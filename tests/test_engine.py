"""The engine against HF transformers on a tiny random GQA Llama (float32, CPU): greedy tokens
and per-step log-probabilities, plain, with chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.errors import RequestError

PROMPTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "once upon a time there was a small engine that could",
    "paged attention keeps the cache in blocks",
    "why",
    "tensor parallel layers own their shard of every weight and load it themselves",
    "one two three four five six seven eight nine ten eleven twelve",
]
NEW_TOKENS = 32
VOCAB = 512  # tiny_llama_config's


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_reference(hf_model, tiny_llama_dir):
    """Per prompt: HF greedy continuation and its log-softmax at every generated step."""
    from engine.checkpoint.files import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    refs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            gen = hf_model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)
            logits = hf_model(gen).logits[0, ids.shape[1] - 1: -1]
            refs.append((gen[0, ids.shape[1]:].tolist(), torch.log_softmax(logits, -1)))
    return refs


def greedy(logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                          logprobs=logprobs)


def assert_matches_hf(outputs, hf_reference, check_logprobs: bool = True) -> None:
    for out, (ref_ids, ref_lp) in zip(outputs, hf_reference):
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"prompt {out.prompt!r}: tokens differ from HF"
        if check_logprobs:
            ours = torch.tensor([[step[t] for t in range(VOCAB)] for step in got.logprobs])
            err = (ours - ref_lp).abs().max().item()
            assert err < 1e-4, f"prompt {out.prompt!r}: max |logprob - HF| = {err:.2e}"


def check_no_leak(llm: LLM) -> None:
    eng = llm.engine
    eng.check_invariants()
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_batched_greedy_matches_hf(tiny_llama_dir, hf_reference):
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128, max_logprobs=VOCAB)
    outputs = llm.generate(PROMPTS, greedy(logprobs=VOCAB))
    assert [o.prompt for o in outputs] == PROMPTS  # in order
    assert_matches_hf(outputs, hf_reference)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    check_no_leak(llm)


def test_chunked_prefill_matches_hf(tiny_llama_dir, hf_reference):
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128, max_logprobs=VOCAB,
              max_num_batched_tokens=8, max_model_len=128)
    outputs = llm.generate(PROMPTS, greedy(logprobs=VOCAB))
    assert_matches_hf(outputs, hf_reference)
    check_no_leak(llm)


def test_prefix_caching_reuses_blocks(tiny_llama_dir, hf_model):
    from engine.checkpoint.files import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    shared = list(range(10, 10 + 40))  # 40 tokens: two full 16-token blocks are shareable
    prompts = [shared + [100 + i, 200 + i] for i in range(4)]
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128, block_size=16)
    first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy())
    rest = llm.generate(prompt_token_ids=prompts[1:], sampling_params=greedy())
    assert first[0].metrics["num_cached_tokens"] == 0
    assert all(o.metrics["num_cached_tokens"] == 32 for o in rest)
    nocache = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128, enable_prefix_caching=False)
    ref = nocache.generate(prompt_token_ids=prompts, sampling_params=greedy())
    assert [o.outputs[0].token_ids for o in first + rest] == \
        [o.outputs[0].token_ids for o in ref]
    with torch.no_grad():  # and HF agrees
        gen = hf_model.generate(torch.tensor(prompts[1:2]), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False)
    assert gen[0, len(prompts[1]):].tolist() == rest[0].outputs[0].token_ids
    del tok
    check_no_leak(llm)


def test_preemption_gives_identical_output(tiny_llama_dir, hf_reference):
    # 8 requests of up to ~50 tokens need ~4 blocks each; 10 blocks force preemption
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=10, block_size=16, max_model_len=128,
              max_logprobs=VOCAB)
    outputs = llm.generate(PROMPTS, greedy(logprobs=VOCAB))
    assert sum(o.metrics["num_preemptions"] for o in outputs) > 0
    assert_matches_hf(outputs, hf_reference)
    check_no_leak(llm)


def test_tied_embeddings(tiny_llama_tied_dir):
    llm = LLM(str(tiny_llama_tied_dir), device="cpu", num_kv_blocks=32)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir, dtype=torch.float32)
    ids = llm.tokenizer.encode("tied weights")
    out = llm.generate(prompt_token_ids=[ids], sampling_params=greedy())[0]
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()
    check_no_leak(llm)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128)
    yield llm
    check_no_leak(llm)


def test_seed_reproducible_alone_and_in_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["the cat"], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(["a dog", "the cat", "hello there friend"],
                         [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True),
                          seeded,
                          SamplingParams(temperature=1.0, seed=7, max_tokens=5)])
    assert mixed[1].outputs[0].token_ids == alone
    again = llm.generate(["the cat"], seeded)[0].outputs[0].token_ids
    assert again == alone


def test_top_k_one_is_greedy(llm):
    g = llm.generate(PROMPTS[:3], greedy())
    k1 = llm.generate(PROMPTS[:3], SamplingParams(temperature=1.0, top_k=1,
                                                  max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in k1]


def test_max_tokens_and_stop_token_ids(llm):
    base = llm.generate(["stop here"], greedy())[0].outputs[0].token_ids
    out = llm.generate(["stop here"], SamplingParams(temperature=0, max_tokens=5,
                                                     ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base[:5] and out.finish_reason == "length"
    stop_tok = base[6]
    first = base.index(stop_tok)
    out = llm.generate(["stop here"], SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                     ignore_eos=True,
                                                     stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == base[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_stop_string_never_leaks(llm):
    full = llm.generate(["stop strings"], greedy())[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]  # a piece from the middle of the greedy text
    cut = text.index(stop)
    out = llm.generate(["stop strings"], SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                        ignore_eos=True, stop=[stop]))[0]
    o = out.outputs[0]
    assert o.text == text[:cut] and stop not in o.text
    assert o.finish_reason == "stop" and o.stop_reason == stop
    kept = llm.generate(["stop strings"], SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:cut + len(stop)]


def test_eos_min_tokens_and_ignore_eos(llm):
    base = llm.generate(["end of text"], greedy())[0].outputs[0].token_ids
    eos = base[3]  # pretend this token is the end-of-sequence token
    eng = llm.engine
    saved = eng.eos_token_ids
    eng.eos_token_ids = [eos]
    try:
        stops = llm.generate(["end of text"], SamplingParams(temperature=0, max_tokens=20))
        assert stops[0].outputs[0].token_ids == base[:base.index(eos) + 1]
        assert stops[0].outputs[0].finish_reason == "stop"
        ignored = llm.generate(["end of text"], SamplingParams(temperature=0, max_tokens=20,
                                                              ignore_eos=True))
        assert ignored[0].outputs[0].token_ids == base[:20]
        mint = llm.generate(["end of text"], SamplingParams(temperature=0, max_tokens=20,
                                                           min_tokens=10))
        toks = mint[0].outputs[0].token_ids
        assert len(toks) >= 10 and eos not in toks[:10]  # eos suppressed until min_tokens
    finally:
        eng.eos_token_ids = saved


def test_n_samples_and_abort(llm):
    outs = llm.generate(["several samples"], SamplingParams(n=3, temperature=1.0, seed=3,
                                                            max_tokens=8, ignore_eos=True))
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in outs[0].outputs)
    eng = llm.engine
    rid = eng.add_request("to be aborted", SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort_request(rid)
    assert not eng.has_unfinished_requests()
    eng.check_invariants()


def test_failed_step_aborts_its_requests_and_keeps_the_engine_usable(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=32) as llm:
        eng, real_step, calls = llm.engine, llm.engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_step()

        eng.step = failing_step
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["one prompt", "another prompt"], greedy())
        check_no_leak(llm)
        eng.step = real_step
        again = llm.generate(["one prompt"], greedy())
        assert len(again[0].outputs[0].token_ids) == NEW_TOKENS
        check_no_leak(llm)


def test_prompt_too_long_and_bad_values(tiny_llama_dir):
    from engine.errors import RequestError

    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=16, max_model_len=32)
    with pytest.raises(RequestError, match="max_model_len=32"):
        llm.generate(prompt_token_ids=[list(range(40))])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2, 10**6]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished_requests()
    check_no_leak(llm)


def test_missing_tensor_and_truncated_file(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.errors import CheckpointError

    bad = tmp_path / "missing"
    shutil.copytree(tiny_llama_dir, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight "
                       r"\(part 1 of model\.layers\.1\.mlp\.gate_up_proj\.weight\)") as err:
        LLM(str(bad), device="cpu", num_kv_blocks=16)
    report = err.value.report
    assert len(report.missing) == 1 and not report.unexpected and not report.misshaped

    cut = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(str(cut), device="cpu", num_kv_blocks=16)


def test_logprobs_above_the_cap_are_a_clear_error(tiny_llama_dir):
    """logprobs / prompt_logprobs above max_logprobs (20 by default, as vLLM) are refused by
    name, never the whole vocabulary or a raw RuntimeError; the engine then goes on."""
    with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=32) as llm:
        for name in ("logprobs", "prompt_logprobs"):
            with pytest.raises(RequestError, match=rf"{name}=1000 is more than this engine's "
                                                   "max_logprobs=20"):
                llm.generate(["hi"], SamplingParams(max_tokens=2, **{name: 1000}))
        out = llm.generate(["hi"], SamplingParams(max_tokens=2, logprobs=20, prompt_logprobs=20))
        assert len(out[0].outputs[0].logprobs[0]) in (20, 21)  # the sampled token + top 20
        assert not llm.engine.requests


@pytest.mark.parametrize("clean_up", [False, True])
def test_the_engine_decoder_gives_transformers_decode_text(tiny_llama_dir, clean_up):
    # decoder_of may call the Rust tokenizer directly: its text must be the wrapper's
    import random

    from transformers import AutoTokenizer

    from engine.core.detokenizer import decoder_of

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir), clean_up_tokenization_spaces=clean_up)
    decode = decoder_of(tok)
    rng = random.Random(clean_up)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 12))]
        for skip in (False, True):
            assert decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_streamed_text_is_one_transformers_decode_of_the_tokens(tiny_llama_dir):
    # the server's path: delta outputs of an engine that streams, against HF's own decode
    from transformers import AutoTokenizer

    from engine.config import EngineConfig
    from engine.core.llm_engine import LLMEngine

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    engine = LLMEngine(EngineConfig.create(str(tiny_llama_dir), device="cpu", num_kv_blocks=64),
                       stream_outputs=True, deltas=True)
    try:
        text, tokens = {}, {}
        for i, p in enumerate(["héllo wörld", "日本語のテキスト", "a b c", "ünïcödé 🙂"]):
            rid = engine.add_request(p, SamplingParams(temperature=1.0, seed=i, max_tokens=40,
                                                       ignore_eos=True))
            text[rid], tokens[rid] = "", []
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                for c in out.outputs:
                    text[out.request_id] += c.text
                    tokens[out.request_id] += c.token_ids
        assert not engine.has_unfinished_requests()
        for rid, ids in tokens.items():
            assert len(ids) == 40
            assert text[rid] == tok.decode(ids, skip_special_tokens=True)
    finally:
        engine.close()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_warm_up_leaves_nothing_behind_and_changes_no_output(tiny_llama_dir, prefix_caching):
    # the server's engine warms up before its first request: afterwards no request, no block
    # held, and the same greedy and seeded outputs as an engine that never warmed up
    from engine.config import EngineConfig
    from engine.core.llm_engine import LLMEngine

    def run(warm: bool) -> list:
        config = EngineConfig.create(str(tiny_llama_dir), device="cpu", num_kv_blocks=64,
                                     max_num_batched_tokens=128, max_model_len=256,
                                     enable_prefix_caching=prefix_caching)
        engine = LLMEngine(config, stream_outputs=False)
        try:
            if warm:
                engine.warm_up()
                assert not engine.has_unfinished_requests() and not engine.requests
                assert engine.stats().kv_cache_usage == 0
                engine.check_invariants()
            params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                      SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)]
            for i, p in enumerate(params):
                engine.add_request(None, p, [5 + i, 9, 33, 71, 4, 200], f"r{i}")
            outs = {}
            for _ in range(50):
                if not engine.has_unfinished_requests():
                    break
                outs.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
            return [outs["r0"], outs["r1"]]
        finally:
            engine.close()

    assert run(warm=True) == run(warm=False)


@pytest.fixture
def dense_prefill_on_cpu(monkeypatch):
    """The dense prefill path (kernels/dense_prefill.py, cuDNN on CUDA) taken on the CPU too,
    for prompts of any length, through SDPA's math backend; returns the list of the lengths each
    call served (so a test sees that the path ran)."""
    import kernels.dense_prefill as dp
    from engine.layers import attention

    calls = []

    def spy(query, key, value, lens, scale):
        calls.append(lens)
        return dp.dense_prefill_attention(query, key, value, lens, scale)

    monkeypatch.setattr(dp, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dp, "DENSE_MIN_LEN", 1)
    monkeypatch.setattr(attention, "dense_prefill_attention", spy)
    return calls


@pytest.mark.parametrize("chunk", [None, 8], ids=["whole", "chunked"])
def test_dense_prefill_matches_hf(tiny_llama_dir, hf_reference, dense_prefill_on_cpu, chunk):
    # whole: the 8 prompts of unequal lengths in one step, one dense call each; chunked: first
    # chunks dense beside decodes in the same step, later chunks from the paged cache
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128, max_logprobs=VOCAB,
              max_num_batched_tokens=chunk, max_model_len=128)
    outputs = llm.generate(PROMPTS, greedy(logprobs=VOCAB))
    assert dense_prefill_on_cpu, "the dense path never ran"
    if chunk is None:
        assert dense_prefill_on_cpu[0] == tuple(len(o.prompt_token_ids) for o in outputs)
    assert_matches_hf(outputs, hf_reference)
    check_no_leak(llm)


def test_dense_prefill_takes_at_most_its_calls_a_step(tiny_llama_dir, hf_model,
                                                      dense_prefill_on_cpu):
    # 12 prompts in one step: more than DENSE_MAX_CALLS, so the paged kernel serves them
    import kernels.dense_prefill as dp

    prompts = [[5 + (7 * i + 3 * j) % (VOCAB - 5) for j in range(20)] for i in range(12)]
    llm = LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=128)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy())
    assert len(prompts) > dp.DENSE_MAX_CALLS and not dense_prefill_on_cpu
    # (ids from 5 up: HF's generate masks a pad id it meets in the prompt)
    with torch.no_grad():
        gen = hf_model.generate(torch.tensor(prompts), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False)
    assert [o.outputs[0].token_ids for o in outputs] == gen[:, 20:].tolist()
    check_no_leak(llm)


@pytest.mark.parametrize(("n", "padded"), [(1, 1), (7, 7), (9, 10), (128, 128), (129, 160),
                                           (300, 320), (4096, 4096), (4097, 5120)])
def test_dense_prefill_lengths_pad_by_at_most_a_quarter(n, padded):
    from kernels.dense_prefill import bucket_len

    assert bucket_len(n) == padded  # the next multiple of 2^(floor(log2 n) - 2)
