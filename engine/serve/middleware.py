"""The guard in front of every route, on the raw ASGI scope: the header limit, the API key, then
the body limit.

Auth is decided on the request path exactly as the router sees it and as it came over the wire:
only `/health` (both `scope["path"]` and `raw_path`) is open, so neither a Host header nor a
percent-encoded or dotted path can move a route out of auth. The key is compared in constant
time (SHA-256 of both sides, `hmac.compare_digest`). Headers over their limit are a 431 and a
body over its limit a 413 before any route sees them (uvicorn's h11 bounds what it buffers).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from engine.serve.protocol import error_body

_DRAIN_BYTES = 64 << 20  # read (and drop) this much of an oversized body before the 413


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 max_header_bytes: int) -> None:
        self.app, self.max_body, self.max_header = app, max_body_bytes, max_header_bytes
        self.key_digest = (hashlib.sha256(api_key.encode()).digest()
                           if api_key is not None else None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) \
            + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
        if header_bytes > self.max_header:
            await send_json(send, 431, error_body(
                431, f"the request line and headers have more than {self.max_header} bytes, "
                "this server's limit (aphro serve --max-header-bytes)",
                code="headers_too_large"))
            return
        if self.key_digest is not None and not _is_health(scope) and not self._authorized(scope):
            await send_json(send, 401, error_body(
                401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_body:
                chunks.append(body)
            more = message.get("more_body", False)
            if size > self.max_body + _DRAIN_BYTES:
                break
        if size > self.max_body:
            await send_json(send, 413, error_body(
                413, f"the request body has more than {self.max_body} bytes, this server's "
                "limit (aphro serve --max-request-bytes)", code="request_too_large"))
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        return scheme.lower() == b"bearer" and hmac.compare_digest(digest, self.key_digest)


def _is_health(scope) -> bool:
    raw = scope.get("raw_path")
    return scope.get("path") == "/health" and (raw is None or raw == b"/health") \
        and not scope.get("root_path")


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect

    return replay


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
