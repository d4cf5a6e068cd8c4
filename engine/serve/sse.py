"""Server-sent events and client disconnects.

Framing is exactly `data: {json}\\n\\n` per event and `data: [DONE]\\n\\n` at the end. Both kinds of
response abort their engine requests when the client goes away: a streaming one when Starlette
stops it (it listens for `http.disconnect` while streaming), a plain one through
`unless_disconnected`, which watches the connection while the work runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from engine.serve.streams import RequestStream

DONE = "data: [DONE]\n\n"
T = TypeVar("T")


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: dict) -> str:
    return "data: " + _dumps(obj) + "\n\n"


class ChunkEvents:
    """The SSE events of one response's chunks: the fields every chunk repeats (`head`) are
    serialized once, then each chunk's one choice alone, giving exactly
    `sse({**head, "choices": [choice]} + ({"usage": None} if with_usage))`."""

    def __init__(self, head: dict, with_usage: bool) -> None:
        whole = _dumps({**head, "choices": [None]})  # ...,"choices":[null]}
        self.prefix = "data: " + whole[:-len("null]}")]
        self.suffix = "]" + (',"usage":null' if with_usage else "") + "}\n\n"

    def event(self, choice: dict) -> str:
        return self.prefix + _dumps(choice) + self.suffix


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


class SSEResponse(StreamingResponse):
    """A text/event-stream response that aborts its engine requests however it ends."""

    def __init__(self, chunks: AsyncIterator[str], stream: RequestStream,
                 headers: dict[str, str]) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", **headers})
        self.engine_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine_stream.abort()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; cancels it and raises ClientGone if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()
