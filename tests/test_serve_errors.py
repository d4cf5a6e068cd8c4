"""Every error a client can cause gets its status and OpenAI's error JSON, and the next good
request is answered: bad fields, context overflow, empty prompts, unknown token ids, caps,
auth (also against crafted paths and Host headers), unknown models and routes, size limits."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest
from serve_server import WAIT_S, running_server

from engine.serve.serving import ServerLimits

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerLimits(max_n=4, max_stop=2, max_body_bytes=4096, max_header_bytes=4096)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir, api_key=KEY, chat_template=None, limits=LIMITS,
                        max_logprobs=5, max_model_len=64) as s:
        yield s


def good(server) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=WAIT_S,
                   json={"prompt": "hello", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def check_error(r: httpx.Response, status: int, *words: str, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


COMPLETION_ERRORS = [  # (body, status, words in the message, param)
    ({"prompt": "hi", "temperature": -1}, 400, ["temperature"], "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, 400, ["temperature"], "temperature"),
    ({"prompt": "hi", "top_p": 2}, 400, ["top_p"], "top_p"),
    ({"prompt": [7] * 60, "max_tokens": 10}, 400, ["64", "60", "10"], "max_tokens"),
    ({"prompt": [7] * 64, "max_tokens": 1}, 400, ["64"], "max_tokens"),
    ({"prompt": [7] * 64, "max_tokens": None}, 400, ["64", "no room"], "prompt"),  # not "-0 more"
    ({"prompt": ""}, 400, ["empty"], "prompt"),
    ({"prompt": []}, 400, ["empty"], "prompt"),
    ({"prompt": [[5, 6], []]}, 400, ["empty"], "prompt"),
    ({"prompt": [5, 999999]}, 400, ["999999", "vocabulary"], "prompt"),
    ({"prompt": [5, -1]}, 400, ["vocabulary"], "prompt"),
    ({"prompt": [5, "x"]}, 400, ["prompt"], "prompt"),
    ({"prompt": "hi", "logprobs": 6}, 400, ["logprobs=6", "max_logprobs=5"], "logprobs"),
    ({"prompt": "hi", "logprobs": 6, "echo": True}, 400, ["max_logprobs=5"], "logprobs"),
    ({"prompt": "hi", "n": 5}, 400, ["n=5", "4"], "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c"]}, 400, ["stop", "2"], "stop"),
    ({"prompt": "hi", "stop_token_ids": [1, 2, 3]}, 400, ["stop_token_ids"], "stop_token_ids"),
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, 400, ["min_tokens"], "min_tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, ["gpt-4", "tiny"], "model"),
    ({}, 400, ["prompt"], "prompt"),
]


@pytest.mark.parametrize("body,status,words,param", COMPLETION_ERRORS)
def test_completion_errors_then_a_good_request(server, body, status, words, param):
    r = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, json=body,
                   timeout=WAIT_S)
    check_error(r, status, *words, param=param)
    good(server)


def test_other_errors_then_a_good_request(server):
    base = server.base_url
    post = lambda path, **kw: httpx.post(base + path, timeout=WAIT_S, **kw)
    check_error(post("/v1/completions", headers={**AUTH, "content-type": "application/json"},
                     content=b"{not json"), 400, "JSON")
    good(server)
    check_error(post("/v1/completions", headers=AUTH, data={"prompt": "hi"}), 400,
                "JSON object")  # a form, not JSON
    check_error(post("/v1/completions", headers=AUTH, json=["hi"]), 400, "JSON object")
    good(server)
    check_error(post("/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "hi"}]}), 400, "chat template",
        "--chat-template")
    good(server)
    check_error(post("/v1/chat/completions", headers=AUTH, json={"messages": []}), 400,
                "messages", param="messages")
    good(server)
    check_error(post("/v1/completions", headers=AUTH, json={"prompt": "x" * 5000}), 413,
                "4096")
    good(server)
    check_error(httpx.get(base + "/v1/models", headers={**AUTH, "x-pad": "p" * 5000},
                          timeout=WAIT_S), 431, "4096")
    good(server)
    check_error(httpx.get(base + "/v1/nothing", headers=AUTH, timeout=WAIT_S), 404)
    err = check_error(httpx.get(base + "/v1/completions", headers=AUTH, timeout=WAIT_S), 405)
    assert err["type"] == "invalid_request_error"  # the client's mistake, not the server's
    good(server)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    good(server)


def raw_status(server, request: bytes) -> int:
    host, port = server.server.address
    with socket.create_connection((host, port), timeout=WAIT_S) as c:
        c.sendall(request)
        return int(c.recv(100).split(b" ")[1])


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/tokenizer_info", "/version",
                                  "/v1/nothing"])
def test_every_route_but_health_needs_the_key(server, path):
    assert httpx.get(server.base_url + path, timeout=WAIT_S).status_code == 401
    r = httpx.get(server.base_url + path, headers={"Authorization": "Bearer wrong"},
                  timeout=WAIT_S)
    check_error(r, 401, "API key")
    assert httpx.get(server.base_url + path, headers=AUTH, timeout=WAIT_S).status_code \
        in (200, 404)


def test_health_is_open_and_crafted_paths_or_hosts_do_not_open_anything(server):
    assert httpx.get(server.base_url + "/health", timeout=WAIT_S).status_code == 200
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        assert httpx.post(server.base_url + path, json={}, timeout=WAIT_S).status_code == 401
    crafted = [b"GET /%68ealth HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET /health/../v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET //v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET /v1/%6dodels HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET http://x/health/../v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1/health\r\n\r\n",
               b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Forwarded-Prefix: /health\r\n\r\n"]
    for request in crafted:
        assert raw_status(server, request) == 401, request
    assert raw_status(server, b"GET /health?to=/v1/models HTTP/1.1\r\nHost: x\r\n\r\n") == 200
