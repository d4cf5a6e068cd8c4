"""Asynchronous scheduling (step N+1 prepared while step N runs, tokens applied one step late)
gives exactly what synchronous scheduling gives: tokens, text, finish and stop reasons,
logprobs, under stop strings, stop ids, max_tokens, min_tokens, seeded sampling, n > 1,
penalties, preemption and abort; no KV block is leaked."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "a",
           "tensor parallel layers own their shard of every weight", "rain fell on the bridge"]


def finished_outputs(eng, max_steps: int = 200) -> dict:
    """Step `eng` until every request has finished (at most max_steps steps); the finished
    RequestOutputs by request id."""
    done = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert not eng.has_unfinished_requests(), f"unfinished after {max_steps} steps"
    return done


def params_for(llm: LLM) -> list[SamplingParams]:
    # a stop string and a stop id that greedy decoding of these prompts actually meets
    ref = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text, ids = ref[0].outputs[0].text, ref[1].outputs[0].token_ids
    stop = text[len(text) // 2: len(text) // 2 + 2] or text[:1]
    return [
        SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[5]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1),
        SamplingParams(temperature=0.9, top_k=20, seed=7, n=2, max_tokens=9, min_tokens=4),
        SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3,
                       frequency_penalty=0.5, ignore_eos=True),
    ]


def run(tiny_llama_dir, async_scheduling: bool, **kwargs):
    with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=kwargs.pop("blocks", 64),
             async_scheduling=async_scheduling, **kwargs) as llm:
        outs = llm.generate(PROMPTS, params_for(llm))
        llm.engine.check_invariants()
        assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks
        return [(o.prompt_logprobs, [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                                      c.logprobs) for c in o.outputs]) for o in outs]


def same_logprobs(a, b) -> bool:
    """Lists of {token: logprob} (or None) with the same tokens and values within 1e-5: the two
    modes batch differently (a step launched before a stop is known carries the stopped
    sequence), and a float32 matmul's rounding depends on the batch."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x is y if x is None or y is None else
        (x.keys() == y.keys() and all(abs(x[t] - y[t]) <= 1e-5 for t in x))
        for x, y in zip(a, b))


def assert_same(got, ref):
    assert len(got) == len(ref)
    for (g_prompt, g_outs), (r_prompt, r_outs) in zip(got, ref):
        assert same_logprobs(g_prompt, r_prompt)
        assert [o[:4] for o in g_outs] == [o[:4] for o in r_outs]  # tokens, text, reasons
        assert all(same_logprobs(g[4], r[4]) for g, r in zip(g_outs, r_outs))


def test_async_equals_sync(tiny_llama_dir):
    sync = run(tiny_llama_dir, False)
    assert_same(run(tiny_llama_dir, True), sync)
    reasons = {c[2] for _, cs in sync for c in cs}
    assert reasons >= {"stop", "length"}  # both kinds of ending are exercised


def test_async_equals_sync_under_preemption(tiny_llama_dir):
    small = {"blocks": 9, "block_size": 16, "max_model_len": 128}
    sync = run(tiny_llama_dir, False, **small)
    assert_same(run(tiny_llama_dir, True, **small), sync)


@pytest.mark.parametrize("after_steps", [1, 3])
def test_abort_while_a_step_is_in_flight(tiny_llama_dir, after_steps):
    results = {}
    for mode in (False, True):
        with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=64,
                 async_scheduling=mode) as llm:
            eng = llm.engine
            params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
            ids = [eng.add_request(p, params) for p in PROMPTS]
            for _ in range(after_steps):
                eng.step()
            eng.abort_request(ids[1])
            eng.abort_request(ids[3])
            done = {rid: out.outputs[0].token_ids
                    for rid, out in finished_outputs(eng, 100).items()}
            assert not eng.has_unfinished_requests()
            eng.check_invariants()
            assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
            results[mode] = done
    assert results[True] == results[False]
    assert set(results[True]) == {"0", "2", "4"}


def test_async_ends_at_max_model_len_where_sync_does(tiny_llama_dir):
    # no max_tokens: the context limit ends each sequence, at exactly max_model_len tokens
    # (asynchronous scheduling counts a token still on the device in len(seq), and once
    # stopped one token early)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    got = {}
    for async_scheduling in (False, True):
        with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=64, max_model_len=40,
                 async_scheduling=async_scheduling) as llm:
            outs = llm.generate(prompt_token_ids=[[5, 9, 33, 71, 4, 200, 7, 8, 9], [11, 12]],
                                sampling_params=params)
            got[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                                     for o in outs]
    assert [len(t) for t, _ in got[False]] == [40 - 9, 40 - 2]
    assert got[True] == got[False]


def test_a_preempted_sequence_whose_last_token_is_pending_stops_there(tiny_llama_dir):
    """A (3 KV blocks of 8 tokens) decodes; B (9-token prompt, max_tokens=1) is admitted into
    the last two blocks. With async scheduling, the step after B's prefill launches while B's
    only token is still on the device, and A's 9th token needs a block: B, the latest arrival,
    is preempted with its last token pending. That token ends B (it once went unchecked, and B
    recomputed and sampled a second one)."""
    results = {}
    for mode in (False, True):
        with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=3, block_size=8,
                 max_model_len=24, async_scheduling=mode) as llm:
            eng = llm.engine
            eng.add_request(None, SamplingParams(temperature=0, max_tokens=19, ignore_eos=True),
                            prompt_token_ids=[5, 6, 7, 8], request_id="A")
            for _ in range(4):
                eng.step()
            eng.add_request(None, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                            prompt_token_ids=list(range(10, 19)), request_id="B")
            done = {rid: (out.outputs[0].token_ids, out.outputs[0].finish_reason,
                          out.metrics["num_preemptions"])
                    for rid, out in finished_outputs(eng, 100).items()}
            eng.check_invariants()
            assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
            results[mode] = done
    assert results[True]["B"][2] == 1  # the case under test happened
    assert {k: (len(t), r) for k, (t, r, _) in results[True].items()} == {
        "A": (19, "length"), "B": (1, "length")}
    assert {k: v[:2] for k, v in results[True].items()} == {
        k: v[:2] for k, v in results[False].items()}


def test_penalties_overlap_and_count_the_token_on_the_device(tiny_llama_dir):
    """Penalised requests no longer make every step synchronous: the step in flight stays in
    flight, and the token it sampled (still on the device when the next step is built) counts
    in the next step's penalties, so the tokens are the synchronous ones. Strong penalties on
    a model that repeats itself greedily: missing the newest token changes the next one."""
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw) for kw in (
        {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0},
        {})]
    got = {}
    for mode in (False, True):
        with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=64,
                 async_scheduling=mode) as llm:
            eng = llm.engine
            for i, p in enumerate(params):
                eng.add_request("a", p, request_id=str(i))  # greedy: 224 224 31 31 232 232 ...
            eng.step()
            eng.step()
            assert (eng._inflight is not None) == mode  # overlapping, penalties and all
            got[mode] = {rid: out.outputs[0].token_ids
                         for rid, out in finished_outputs(eng, 100).items()}
    assert got[True] == got[False]
    plain = got[False]["3"]
    assert len(set(plain)) < len(plain) and all(got[False][k] != plain for k in "012")
