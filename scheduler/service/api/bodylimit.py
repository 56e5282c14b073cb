"""The request body limit (setting max_request_bytes), enforced before anything parses the body.

An ASGI middleware: a Content-Length over the limit is answered 413 before a byte of the body is read; a body sent
without one (chunked) is counted as it arrives and refused as soon as it passes the limit. Either way the
application never sees the request, so nothing is parsed, stored or changed. The body is buffered here (at most the
limit), then handed on: what the application reads is exactly what was counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.service.api.errors import TooLarge


class BodyLimit:
    """Refuse (413, the API's error shape) request bodies over `limit(path)` bytes."""

    def __init__(self, app: ASGIApp, limit: Callable[[str], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, f"the request body is {declared} bytes; at most {limit} (max_request_bytes)")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _refuse(send, f"the request body is over {limit} bytes (max_request_bytes); stopped reading")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server (h11) refuses it; the streamed count still applies
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then passes on what the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, message: str) -> None:
    e = TooLarge(message, "body")
    payload = json.dumps(e.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": e.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
