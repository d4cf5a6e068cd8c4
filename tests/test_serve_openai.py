"""`aphro serve` through real clients: the official `openai` package, httpx, and requests shaped
as lm-eval's local-completions sends them. References: the offline engine (LLM.generate) for
greedy text, HF transformers for chat templates, tokenization and prompt log-probabilities."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch
from serve_server import ENGINE_DEFAULTS, running_server
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.checkpoint.files import load_tokenizer
from engine.serve.chat import SIMPLE_CHAT_TEMPLATE

PROMPTS = ["hello", "the quick brown fox", "a paged attention engine keeps",
           "why do leaves turn red"]
NEW = 6


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **ENGINE_DEFAULTS) as llm:
        yield llm


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_completions_equal_offline_generate_whole_and_streamed(client, offline):
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy())]
    for prompt, want in zip(PROMPTS, expected):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == NEW and r.usage.prompt_tokens > 0
        chunks = list(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
    batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=NEW,
                                      temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == list(range(2 * len(PROMPTS)))
    assert [c.text for c in batch.choices] == [t for t in expected for _ in range(2)]
    assert batch.usage.completion_tokens == 2 * NEW * len(PROMPTS)


def test_chat_completions_render_the_template_as_transformers_does(client, offline,
                                                                   tokenizer):
    messages = [{"role": "system", "content": "Keep your answers short."},
                {"role": "user", "content": "Why do leaves turn red?"}]
    text = tokenizer.apply_chat_template(messages, chat_template=SIMPLE_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    want = offline.generate(prompt_token_ids=[ids], sampling_params=greedy())[0].outputs[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(ids)
    lp = r.choices[0].logprobs.content
    assert len(lp) == NEW and all(len(t.top_logprobs) == 3 for t in lp)
    for t in lp:  # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's LocalCompletionsAPI.parse_logprobs, for one choice."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(tok == max(top.values()) for tok, top in zip(lps, tops))


def test_lm_eval_scoring_requests_return_hf_prompt_logprobs(server, hf, tokenizer):
    ctx = tokenizer.encode("The quick brown fox jumps over")
    with torch.no_grad():  # a continuation HF itself would pick greedily, and a random one
        greedy_cont = hf.generate(torch.tensor([ctx]), max_new_tokens=5, do_sample=False)[0]
    prompts = [greedy_cont.tolist(), ctx + tokenizer.encode(" the lazy dog",
                                                            add_special_tokens=False)]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then 1 generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert lp["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert lp["text_offset"] == sorted(lp["text_offset"])
        for i in range(1, len(ids)):  # the greedy flag lm-eval derives from top_logprobs
            top = lp["top_logprobs"][i]
            assert (lp["token_logprobs"][i] == max(top.values())) == \
                (ref[i - 1].argmax().item() == ids[i])
        total, is_greedy = lm_eval_parse(choice, len(ctx))
        assert total == pytest.approx(sum(want[len(ctx) - 1:]), abs=1e-3)
        assert is_greedy == (ids is prompts[0])


def test_tokenizer_routes_agree_with_hf_and_satisfy_lm_eval(server, tokenizer):
    base = server.base_url
    info = httpx.get(f"{base}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"]
    text = "Hello world! This is a tiny model"
    r = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False},
                   timeout=30).json()
    assert r["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert r["count"] == len(r["tokens"])
    eos = httpx.post(f"{base}/tokenize", json={"prompt": info["eos_token"],
                                               "add_special_tokens": False}, timeout=30).json()
    assert eos["tokens"] == [tokenizer.eos_token_id]
    back = httpx.post(f"{base}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])


def test_models_request_id_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
    before = server.metrics()
    r = httpx.post(f"{server.base_url}/v1/completions", headers={"x-request-id": "my-req-7"},
                   json={"prompt": [5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True},
                   timeout=60)
    assert r.headers["x-request-id"] == "my-req-7" and r.json()["id"] == "cmpl-my-req-7"
    after = server.metrics()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["aphro:prompt_tokens_total"] == 4
    assert delta["aphro:generation_tokens_total"] == 3
    assert delta["aphro:request_success_total{finished_reason=length}"] == 1
    assert delta["aphro:time_to_first_token_seconds_count"] == 1
    assert delta["aphro:e2e_request_latency_seconds_count"] == 1
    assert delta["aphro:inter_token_latency_seconds_count"] == 2
    assert delta["aphro:request_queue_time_seconds_count"] == 1
    assert delta["aphro:prefix_cache_queries_total"] == 4
    assert after["aphro:num_requests_running"] == 0 == after["aphro:num_requests_waiting"]
    assert after["aphro:kv_cache_usage_perc"] == 0
    for name in ("aphro:num_preemptions_total", "aphro:prefix_cache_hits_total"):
        assert name in after


def test_sse_framing_is_exact(server):
    body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert re.fullmatch(r"(data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n", raw), raw
    events = [json.loads(e[len("data: "):]) for e in raw.split("\n\n")[:-2]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    assert all(e["usage"] is None for e in events[:-1])
