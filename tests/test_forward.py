"""A follower forwards to the leader (scheduler/service/core/forward.py): the request as the client wrote it, the answer
streamed back, bounded bodies, and 503 (not 500) while nobody can say who leads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scheduler.service.core.forward import ToLeader


class Chunks(httpx.AsyncByteStream):
    """The leader's answer in two pieces, as a followed log arrives."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"chunk1"
        yield b"chunk2"


def follower(leader: str | None | Exception, seen: list[httpx.Request], max_body: int = 100) -> TestClient:
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"local": True}

    def where() -> str | None:
        if isinstance(leader, Exception):
            raise leader
        return leader

    def leader_answers(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(201, stream=Chunks(), headers={"X-From": "leader"})

    wrapped = ToLeader(app, lambda: False, where, "http://me:8265", max_body=max_body)
    wrapped.client = httpx.AsyncClient(transport=httpx.MockTransport(leader_answers))
    return TestClient(wrapped)


def test_a_follower_forwards_what_the_client_sent_and_answers_health_itself() -> None:
    seen: list[httpx.Request] = []
    c = follower("http://leader:8265", seen)
    r = c.post("/v1/jobs/a%2Fb?x=%C3%A9", content=b'{"a": 1}', headers={"Authorization": "Bearer t"})
    assert r.status_code == 201 and r.content == b"chunk1chunk2" and r.headers["x-from"] == "leader"
    (req,) = seen
    assert req.url.raw_path == b"/v1/jobs/a%2Fb?x=%C3%A9" and req.content == b'{"a": 1}'
    assert req.headers["authorization"] == "Bearer t" and req.url.host == "leader"
    assert c.get("/readyz").json() == {"local": True} and len(seen) == 1


def test_bounded_bodies_and_no_leader_known() -> None:
    seen: list[httpx.Request] = []
    assert follower("http://leader:8265", seen, max_body=10).post("/v1/jobs", content=b"x" * 11).status_code == 413
    assert follower(None, seen).get("/v1/jobs").status_code == 503
    assert follower("http://me:8265", seen).get("/v1/jobs").status_code == 503  # ourselves: not a leader to ask
    assert follower(OSError("database away"), seen).get("/v1/jobs").status_code == 503
    assert seen == []
