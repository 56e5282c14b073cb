"""The SDK's asynchronous core: the /v1 job endpoints over one httpx.AsyncClient.

`Client` (notebooks.client) wraps it for synchronous use; async code may use it directly:

    async with AsyncCorral(resolve()) as api:
        job, created = await api.submit({"queue": "nlp", "command": "nvidia-smi"})
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx

from notebooks.config import Connection
from notebooks.errors import CorralError
from scheduler.service.api.models import JobView
from scheduler.service.core.states import FINISHED, JobState

TIMEOUT = httpx.Timeout(30.0, read=60.0)  # read is long: a scheduling cycle under load can hold the API a while
# States in which the latest attempt's process has been started (or never will).
LAUNCHED = (JobState.RUNNING, *FINISHED)


class AsyncCorral:
    """The job API. Methods answer the API's decoded JSON, or raise CorralError."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        headers = {"Authorization": f"Bearer {conn.token}"} if conn.token else {}
        self.http = httpx.AsyncClient(base_url=conn.url, headers=headers, timeout=TIMEOUT)

    async def __aenter__(self) -> AsyncCorral:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise CorralError(
                "unreachable",
                f"cannot reach the Corral API at {self.conn.url} ({e}); is it running? "
                "Start it with `corral serve`, or set CORRAL_URL",
            ) from e
        except httpx.TimeoutException as e:
            raise CorralError(
                "timeout", f"the Corral API at {self.conn.url} did not answer in time ({e.__class__.__name__})"
            ) from e
        self._check(r)
        return r

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and "message" in err:
            code, message = str(err.get("code", r.status_code)), str(err["message"])
            where, detail = err.get("where"), err.get("detail")
        else:
            code, where, detail = f"http_{r.status_code}", None, None
            message = f"HTTP {r.status_code}: {r.text.strip()[:200] or r.reason_phrase}"
        if r.status_code == 401:
            message += f" (token from {self.conn.token_source})" if self.conn.token else f"; {self.conn.token_source}"
        raise CorralError(code, message, where, status=r.status_code, detail=detail)

    async def submit(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """POST /v1/jobs: the job, and False when its idempotency key named an earlier job (HTTP 200)."""
        r = await self.request("POST", "/v1/jobs", json=body)
        return r.json(), r.status_code == 201

    async def job(self, job_id: int) -> dict[str, Any]:
        data: dict[str, Any] = (await self.request("GET", f"/v1/jobs/{job_id}")).json()
        return data

    async def jobs(
        self, queue: str | None = None, state: str | list[str] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if queue:
            params["queue"] = queue
        if state:
            params["state"] = [state] if isinstance(state, str) else list(state)
        found: list[dict[str, Any]] = (await self.request("GET", "/v1/jobs", params=params)).json()["jobs"]
        return found

    async def queues(self) -> list[dict[str, Any]]:
        """GET /v1/queues: the queues the caller may see, with their numbers."""
        found: list[dict[str, Any]] = (await self.request("GET", "/v1/queues")).json()["queues"]
        return found

    async def cancel(self, job_id: int) -> dict[str, Any]:
        data: dict[str, Any] = (await self.request("POST", f"/v1/jobs/{job_id}/cancel")).json()
        return data

    async def explain(self, job_id: int) -> dict[str, Any]:
        data: dict[str, Any] = (await self.request("GET", f"/v1/jobs/{job_id}/explain")).json()
        return data

    async def logs(self, job_id: int, stream: str = "stdout", attempt: int | None = None) -> str:
        """One attempt's output so far (default: the latest); "" for a job that has not started."""
        if attempt is None:
            attempt = JobView.model_validate(await self.job(job_id)).attempt
            if attempt < 1:
                return ""
        try:
            r = await self.request("GET", f"/v1/jobs/{job_id}/logs", params={"stream": stream, "attempt": attempt})
        except CorralError as e:
            if e.status == 404 and "no " + stream in e.message:  # the attempt never wrote (or never launched)
                return ""
            raise
        return r.text

    async def wait(self, job_id: int, timeout: float | None = None, poll: float = 2.0) -> dict[str, Any]:
        """Poll until the job is in a final state and return it. Polls start at 0.1 s and double up to `poll`:
        a short job is seen ending at once, a long one costs the API a request every `poll` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = min(0.1, poll)
        while True:
            data = await self.job(job_id)
            state = JobView.model_validate(data).state
            if state in FINISHED:
                return data
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"job {job_id} is still {state} after {timeout:g} s (it keeps running)")
            pause = delay if deadline is None else max(0.0, min(delay, deadline - loop.time()))
            await asyncio.sleep(pause)
            delay = min(delay * 2, poll)

    async def follow(self, job_id: int, stream: str = "stdout", poll: float = 1.0) -> AsyncIterator[str]:
        """The job's output as it is written, through every attempt, until the job ends. A job preempted and
        started again gets a note line between its attempts' output."""
        current, received, drained = 0, 0, False
        while True:
            view = JobView.model_validate(await self.job(job_id))
            state, latest = view.state, view.attempt
            if latest > current and (state in LAUNCHED or state == JobState.PENDING):
                # A new attempt was launched (a pending job with a newer attempt was launched and preempted
                # between two looks). "starting" is skipped: its process is not there yet, and the API's
                # follow ends at once for an attempt whose process does not run.
                if current:
                    yield f"[corral] job {job_id}: attempt {current} ended; output of attempt {latest} follows\n"
                current, received, drained = latest, 0, False
            if current and not drained:
                async for text, size in self._follow_attempt(job_id, stream, current, skip=received):
                    received += size
                    yield text
                # The API ends a follow when the process is gone. Once seen so after the look above, the
                # attempt is complete; before (the state said running), look again: the process may not have
                # been launched yet when the API answered.
                drained = state not in (JobState.RUNNING, JobState.STARTING)
            if state in FINISHED and (drained or latest == 0):
                return
            await asyncio.sleep(poll if drained else min(poll, 0.2))

    async def _follow_attempt(
        self, job_id: int, stream: str, attempt: int, skip: int
    ) -> AsyncIterator[tuple[str, int]]:
        """(text, bytes) of one attempt's follow answer, from byte `skip` on (the API always starts at 0)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        seen = 0
        params: dict[str, str | int] = {"stream": stream, "attempt": attempt, "follow": "true"}
        try:
            # No read timeout: a quiet job sends nothing for as long as it likes.
            async with self.http.stream(
                "GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=httpx.Timeout(30.0, read=None)
            ) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._check(r)
                async for chunk in r.aiter_bytes():
                    start = max(0, skip - seen)
                    seen += len(chunk)
                    part = chunk[start:]
                    if part:
                        yield decoder.decode(part), len(part)
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail, 0
        except httpx.ConnectError as e:
            raise CorralError("unreachable", f"cannot reach the Corral API at {self.conn.url} ({e})") from e
