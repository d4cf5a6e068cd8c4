"""LLMEngine(deltas=True), what the server's engine core streams: each request's delta outputs
concatenate to what LLM.generate returns for it (tokens, text, finish and stop reasons,
logprobs, prompt logprobs once), under stop strings, stop ids, n > 1 and logprobs; every output
carries something new."""

from __future__ import annotations

from test_async_scheduling import PROMPTS, params_for

from engine import LLM
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine


def test_delta_outputs_concatenate_to_the_final_outputs(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), device="cpu", num_kv_blocks=64) as llm:
        params = params_for(llm)
        want = {o.request_id: o for o in llm.generate(PROMPTS, params)}
    engine = LLMEngine(EngineConfig.create(str(tiny_llama_dir), device="cpu", num_kv_blocks=64),
                       stream_outputs=True, deltas=True)
    try:
        ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        got: dict[str, dict] = {rid: {} for rid in ids}
        prompt_lps: dict[str, list] = {rid: [] for rid in ids}
        finished = set()
        for _ in range(200):  # bounded: each request needs at most max_tokens steps
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                assert out.request_id not in finished
                assert out.outputs, "a delta output with no sequence that moved"
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id].append(out.prompt_logprobs)
                for c in out.outputs:
                    seq = got[out.request_id].setdefault(
                        c.index, {"tokens": [], "text": "", "logprobs": [], "end": None})
                    assert seq["end"] is None, "output after the sequence finished"
                    assert c.token_ids or c.text or c.finish_reason
                    seq["tokens"] += c.token_ids
                    seq["text"] += c.text
                    seq["logprobs"] += c.logprobs or []
                    if c.finish_reason is not None:
                        seq["end"] = (c.finish_reason, c.stop_reason)
                if out.finished:
                    finished.add(out.request_id)
        assert finished == set(ids)
        for rid, (want_rid, ref) in zip(ids, want.items()):
            assert len(prompt_lps[rid]) == (ref.prompt_logprobs is not None)
            if ref.prompt_logprobs is not None:
                assert prompt_lps[rid][0] == ref.prompt_logprobs
            for c in ref.outputs:
                seq = got[rid][c.index]
                assert seq["tokens"] == c.token_ids and seq["text"] == c.text
                assert seq["end"] == (c.finish_reason, c.stop_reason)
                assert seq["logprobs"] == (c.logprobs or [])
        engine.check_invariants()
    finally:
        engine.close()
