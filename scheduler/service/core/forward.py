"""Followers forward: with several instances on one database, every request but health and metrics goes to the leader
(its address is in the leadership row), so clients and the Kubernetes Service may reach any replica."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx

LOCAL = ("/healthz", "/readyz", "/metrics")  # each instance answers these itself
HOP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}
CACHE_S = 1.0  # how long the leader's address read from the database is used


class ToLeader:
    """ASGI middleware: while this instance does not lead, proxy the request to the leader's API."""

    def __init__(
        self,
        app: Any,
        leads: Callable[[], bool],
        leader_url: Callable[[], str | None],
        own_url: str,
        max_body: int = 8 << 20,
        connect_s: float = 5.0,
    ) -> None:
        self.app, self.leads, self.leader_url, self.own_url, self.max_body = app, leads, leader_url, own_url, max_body
        # No read timeout: a followed log is one long answer; the leader's own limits apply to it.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(connect_s, read=None))
        self._cached: tuple[float, str | None] = (-CACHE_S, None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in LOCAL or self.leads():
            await self.app(scope, receive, send)
            return
        try:
            leader = await self.leader()
        except Exception as e:  # the database away: nobody can say who leads
            await _answer(send, 503, {"error": {"code": "unavailable", "message": f"no leader known ({e})"}})
            return
        if leader is None:
            await _answer(
                send,
                503,
                {"error": {"code": "unavailable", "message": ("no leader has taken over yet; retry in a few seconds")}},
            )
            return
        body = bytearray()
        while True:  # bounded as the API bounds it: a follower must not hold more than the leader would take
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                await _answer(
                    send, 413, {"error": {"code": "too_large", "message": (f"the body is over {self.max_body} bytes")}}
                )
                return
            if not msg.get("more_body"):
                break
        path = scope.get("raw_path") or scope["path"].encode()  # as the client wrote it (%-escapes kept)
        url = leader.rstrip("/").encode() + path + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP]
        try:
            r = await self.client.send(
                self.client.build_request(scope["method"], url.decode("latin-1"), headers=headers, content=bytes(body)),
                stream=True,
            )
        except httpx.HTTPError as e:
            await _answer(send, 503, {"error": {"code": "unavailable", "message": f"the leader did not answer ({e})"}})
            return
        try:  # streamed both ways: a followed log goes on as long as the leader sends it
            out = [(k, v) for k, v in r.headers.raw if k.lower() not in HOP]
            await send({"type": "http.response.start", "status": r.status_code, "headers": out})
            async for chunk in r.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await r.aclose()

    async def leader(self) -> str | None:
        """The leader's address (another instance's), read at most once a CACHE_S."""
        at, url = self._cached
        if time.monotonic() - at >= CACHE_S:
            url = await anyio.to_thread.run_sync(self.leader_url)  # a database read: off the event loop
            if url is not None and url.rstrip("/") == self.own_url.rstrip("/"):
                url = None  # our own, from before a restart, or ours while we take over: not a leader to ask
            self._cached = (time.monotonic(), url)
        return url


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
