"""POST /v1/chat/completions: messages rendered by the chat template, then tokenized without
adding special tokens (the template writes them), OpenAI's chat.completion objects out, whole
or streamed (a role delta first, then content deltas, then the finish reason)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.core.outputs import RequestOutput
from engine.errors import AphroError
from engine.serve.protocol import APIError, ChatCompletionRequest, TextPart, error_body
from engine.serve.serving import Serving, bad_request, usage
from engine.serve.sse import DONE, ChunkEvents, SSEResponse, sse, unless_disconnected
from engine.serve.streams import Collected, EngineLoopError, EngineRequest, RequestStream


def render_prompt(serving: Serving, req) -> tuple[str, list[int]]:
    """The chat template applied to req.messages: (text, token ids)."""
    if serving.chat_template is None:
        raise APIError(400, "this model has no chat template (none in its tokenizer_config.json"
                       " or chat_template.jinja): start the server with --chat-template FILE, "
                       "or send the prompt to /v1/completions", "messages",
                       "chat_template_missing")
    for m in req.messages:
        if isinstance(m.content, list) and not all(isinstance(p, TextPart) for p in m.content):
            raise APIError(400, "only text content parts are supported", "messages")
    try:
        text = serving.chat_template.render(
            [m.template_dict() for m in req.messages], req.add_generation_prompt,
            getattr(req, "tools", None), **(getattr(req, "chat_template_kwargs", None) or {}))
    except AphroError as e:
        raise bad_request(e) from None
    return text, serving.encode(text, add_special_tokens=False)


async def create_chat_completion(serving: Serving, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    serving.check_model(req.model)
    text, ids = render_prompt(serving, req)
    max_tokens = serving.check_prompt(ids, req.max_new_tokens, "messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(req, max_tokens, top, None)
    rid = serving.request_id(raw.headers)
    request = EngineRequest(rid, ids, params, text)
    view = _View(serving, req, rid, request)
    stream = await serving.start([request])
    headers = {"x-request-id": rid}
    if req.stream:
        return SSEResponse(view.chunks(stream), stream, headers)
    try:
        final = await unless_disconnected(raw, _last(stream))
    finally:
        stream.abort()
    return JSONResponse(view.body(final), headers=headers)


async def _last(stream: RequestStream) -> RequestOutput:
    total = Collected()
    async for outs in stream:
        total.add(outs[-1])
    return total.result()


class _View:
    def __init__(self, serving: Serving, req: ChatCompletionRequest, rid: str,
                 request: EngineRequest) -> None:
        self.serving, self.req, self.request = serving, req, request
        self.head = {"id": f"chatcmpl-{rid}", "created": serving.created,
                     "model": serving.model_name}
        self.events = ChunkEvents({**self.head, "object": "chat.completion.chunk"},
                                  req.include_usage)

    def logprobs(self, c) -> dict | None:
        if not self.req.logprobs:
            return None
        return {"content": self.serving.chat_logprobs(c.token_ids, c.logprobs or [],
                                                      self.req.top_logprobs or 0)}

    def body(self, out: RequestOutput) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}
                   for c in sorted(out.outputs, key=lambda c: c.index)]
        return {**self.head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(out.prompt_token_ids),
                               sum(len(c.token_ids) for c in out.outputs))}

    def _chunk(self, index: int, delta: dict, logprobs=None, finish=None, stop=None) -> str:
        return self.events.event({"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish, "stop_reason": stop})

    async def chunks(self, stream: RequestStream) -> AsyncIterator[str]:
        n = self.req.n
        sent_tokens = [0] * n
        for i in range(n):
            yield self._chunk(i, {"role": "assistant", "content": ""})
        try:
            async for outs in stream:
                for c in outs[-1].outputs:  # deltas: only the sequences that moved
                    i = c.index
                    sent_tokens[i] += len(c.token_ids)
                    if not (c.text or (self.req.logprobs and c.token_ids) or c.finish_reason):
                        continue
                    yield self._chunk(i, {"content": c.text} if c.text else {},
                                      self.logprobs(c), c.finish_reason, c.stop_reason)
            if self.req.include_usage:
                yield sse({**self.head, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage(len(self.request.prompt_token_ids),
                                          sum(sent_tokens))})
        except EngineLoopError as e:
            yield sse(error_body(500, str(e)))
        yield DONE
