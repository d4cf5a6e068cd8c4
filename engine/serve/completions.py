"""POST /v1/completions: prompts (a string, strings, token ids, lists of token ids) in,
OpenAI's text_completion objects out, whole or streamed.

Choice `index` is prompt_index * n + sample_index, and choices are sorted by it. With `echo`
the prompt's text leads each choice, and with `logprobs` too, its tokens lead `logprobs`
(the first with a null logprob): this is the scoring request lm-eval's local-completions sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.core.outputs import RequestOutput
from engine.serve.protocol import APIError, CompletionRequest, error_body
from engine.serve.serving import Serving, usage
from engine.serve.sse import DONE, ChunkEvents, SSEResponse, sse, unless_disconnected
from engine.serve.streams import Collected, EngineLoopError, EngineRequest, RequestStream


async def create_completion(serving: Serving, req: CompletionRequest,
                            raw: Request) -> Response:
    serving.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (leave it out, or equal to n)", "best_of")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "the prompt is empty", "prompt")
    if len(prompts) > serving.limits.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts in one request: at most "
                       f"{serving.limits.max_prompts}", "prompt")
    rid = serving.request_id(raw.headers)
    prompt_logprobs = req.logprobs if req.echo else None
    requests = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty", "prompt")
            ids, text = serving.encode(prompt), prompt
        else:
            ids, text = prompt, None
        max_tokens = serving.check_prompt(ids, req.max_tokens)
        params = serving.sampling_params(req, max_tokens, req.logprobs, prompt_logprobs)
        requests.append(EngineRequest(rid if len(prompts) == 1 else f"{rid}-{i}", ids, params,
                                      text))
    view = _View(serving, req, rid, requests)
    stream = await serving.start(requests)
    headers = {"x-request-id": rid}
    if req.stream:
        return SSEResponse(view.chunks(stream), stream, headers)
    try:
        final = await unless_disconnected(raw, _collect(stream))
    finally:
        stream.abort()
    return JSONResponse(view.body(final), headers=headers)


async def _collect(stream: RequestStream) -> dict[str, RequestOutput]:
    final: dict[str, Collected] = {}
    async for outs in stream:
        for out in outs:
            final.setdefault(out.request_id, Collected()).add(out)
    return {rid: c.result() for rid, c in final.items()}


class _View:
    """One request's outputs in OpenAI's shape."""

    def __init__(self, serving: Serving, req: CompletionRequest, rid: str,
                 requests: list[EngineRequest]) -> None:
        self.serving, self.req, self.requests = serving, req, requests
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.head = {"id": f"cmpl-{rid}", "object": "text_completion",
                     "created": serving.created, "model": serving.model_name}

    def prompt_text(self, i: int) -> str:
        r = self.requests[i]
        if r.prompt is None:
            r.prompt = self.serving.text(r.prompt_token_ids)
        return r.prompt

    def logprobs(self, i: int, prompt_logprobs: list | None, c, echo: bool,
                 offset: int) -> dict | None:
        """`logprobs` for c's tokens (led by the prompt's with echo)."""
        if self.req.logprobs is None:
            return None
        ids, entries = [], []
        if echo:
            prompt = self.requests[i].prompt_token_ids
            ids += prompt
            entries += prompt_logprobs or [None] * len(prompt)
        ids += c.token_ids
        entries += c.logprobs or []
        return self.serving.completion_logprobs(ids, entries, offset)

    def body(self, final: dict[str, RequestOutput]) -> dict:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, r in enumerate(self.requests):
            out = final[r.request_id]
            prompt_tokens += len(r.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                prefix = self.prompt_text(i) if self.req.echo else ""
                choices.append({"index": i * self.req.n + c.index, "text": prefix + c.text,
                                "logprobs": self.logprobs(i, out.prompt_logprobs, c,
                                                          self.req.echo, 0),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        choices.sort(key=lambda ch: ch["index"])
        return {**self.head, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    async def chunks(self, stream: RequestStream) -> AsyncIterator[str]:
        req, n = self.req, self.req.n
        started: set[int] = set()
        offsets: dict[int, int] = {}
        prompt_logprobs: dict[int, list] = {}  # they come with a request's first output
        with_usage = req.include_usage
        events = ChunkEvents(self.head, with_usage)
        completion_tokens = 0
        try:
            async for outs in stream:
                for out in outs:  # deltas: only the sequences that moved
                    i = self.index[out.request_id]
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[i] = out.prompt_logprobs
                    for c in out.outputs:
                        idx = i * n + c.index
                        echo = req.echo and idx not in started
                        started.add(idx)
                        completion_tokens += len(c.token_ids)
                        # a chunk for new tokens even when their text is held back (a partial
                        # character), as vLLM sends it: clients time tokens by chunks
                        if not (c.text or c.token_ids or c.finish_reason or echo):
                            continue
                        text = (self.prompt_text(i) + c.text) if echo else c.text
                        lp = self.logprobs(i, prompt_logprobs.get(i), c, echo,
                                           offsets.get(idx, 0))
                        choice = {"index": idx, "text": text, "logprobs": lp,
                                  "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}
                        yield events.event(choice)
                        if lp and lp["tokens"]:
                            offsets[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if with_usage:
                prompt_tokens = sum(len(r.prompt_token_ids) for r in self.requests)
                yield sse({**self.head, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
        except EngineLoopError as e:
            yield sse(error_body(500, str(e)))
        yield DONE
