"""The FastAPI app: OpenAI's routes, the tokenizer routes lm-eval uses, /health and /metrics.

Every error leaves as OpenAI's error JSON: invalid fields are a 400 naming the field (never
pydantic's raw 422), unknown routes a 404, failures inside the server a 500; the server keeps
answering.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from engine.serve.chat import special_tokens_of
from engine.serve.chat_completions import create_chat_completion, render_prompt
from engine.serve.completions import create_completion
from engine.serve.middleware import GuardMiddleware
from engine.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from engine.serve.serving import Serving
from engine.serve.sse import ClientGone
from engine.serve.streams import EngineLoopError


def build_app(serving: Serving) -> FastAPI:
    app = FastAPI(title="aphro", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not serving.llm.is_running:
            raise APIError(503, f"the engine has stopped ({serving.llm.error or 'closed'})")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": serving.created, "owned_by": "aphro",
             "root": serving.model_path, "parent": None,
             "max_model_len": serving.max_model_len}
            for name in serving.options.served_model_names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await create_completion(serving, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(serving, req, raw)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = serving.llm.metrics.render(serving.llm.stats, {"model_name": serving.model_name})
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if req.messages is not None:
            _, ids = render_prompt(serving, req)
        else:
            ids = serving.encode(req.prompt, req.add_special_tokens)
        out = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = serving.tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        serving.check_model(req.model)
        return {"prompt": serving.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        serving.need_tokenizer()
        tok = serving.tokenizer
        info = {"tokenizer_class": type(tok).__name__, "model_max_length": serving.max_model_len,
                "vocab_size": serving.vocab_size,
                "chat_template": serving.chat_template.source if serving.chat_template else None}
        info.update(special_tokens_of(tok))
        return info

    @app.get("/version")
    async def version() -> dict:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            return {"version": package_version("aphro")}
        except PackageNotFoundError:
            return {"version": "unknown"}

    app.add_middleware(GuardMiddleware, api_key=serving.options.api_key,
                       max_body_bytes=serving.limits.max_body_bytes,
                       max_header_bytes=serving.limits.max_header_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        message = {404: "no such route (see GET /v1/models, POST /v1/completions, "
                        "POST /v1/chat/completions)",
                   405: "this route does not take that method"}.get(e.status_code,
                                                                    str(e.detail))
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening

    @app.exception_handler(EngineLoopError)
    async def engine_failed(_: Request, e: EngineLoopError) -> Response:
        return JSONResponse(error_body(500, str(e)), status_code=500)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"),
                            status_code=500)


_UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists "
                           "of token ids",
                 "stop": "a string or a list of strings",
                 "content": "a string or a list of content parts"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one sentence naming the fields, and the first field."""
    problems: dict[str, str] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('msg')}", None
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") in (
                "model_attributes_type", "dict_type", "missing"):
            return "the body must be a JSON object (Content-Type: application/json)", None
        loc = [p for p in err.get("loc", ()) if p != "body"]
        names = [str(p) for p in loc]
        union = next((u for u in _UNION_FIELDS if u in names), None)
        if union is not None:
            at = ".".join(names[:names.index(union) + 1])
            problems.setdefault(at, f"{at}: must be {_UNION_FIELDS[union]}")
        else:
            at = ".".join(names)
            problems.setdefault(at, f"{at}: {err.get('msg')}" if at else str(err.get("msg")))
        if len(problems) >= 5:
            break
    first = next(iter(problems), None)
    param = first.split(".")[0] if first else None
    return "invalid request: " + ("; ".join(problems.values()) or "the body is invalid"), param
