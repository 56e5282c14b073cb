"""Crash safety: kill -9 the server during a burst of submissions and completions, restart it, and check that
no job was lost, duplicated or run twice, and that no GPU was ever held by two processes at once."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration  # corral serve, killed with SIGKILL

JOBS = 36
# Each job records when its process held which GPUs; SIGTERM (preemption) ends it cleanly after recording.
JOB = """
import json, os, signal, sys, time
path = os.path.join({marks!r}, f"{{os.environ['CORRAL_JOB_ID']}}-{{os.environ['CORRAL_ATTEMPT']}}-{{os.getpid()}}")
def mark(what):
    with open(path, "a") as f:
        f.write(json.dumps({{"at": time.time(), "what": what,
                             "gpus": os.environ["CUDA_VISIBLE_DEVICES"]}}) + "\\n")
def stop(*_):
    mark("end")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
mark("start")
time.sleep({seconds})
mark("end")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, data: Path, port: int):
        self.data, self.port, self.proc = data, port, None  # type: ignore[var-annotated]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(self.data),
            "CORRAL_PORT": str(self.port),
            "CORRAL_GPUS": "4",
            "CORRAL_DEMO": "1",
            "CORRAL_TICK_S": "0.05",
            "CORRAL_GRACE_S": "2",
        }
        env.pop("CORRAL_DATABASE_URL", None)
        with open(self.data / "server.log", "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.service"], env=env, stdout=subprocess.DEVNULL, stderr=log
            )
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail("server did not become ready: " + (self.data / "server.log").read_text()[-2000:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = Server(tmp_path / "data", free_port())
    s.data.mkdir()
    yield s
    s.stop()


def submit_all(server: Server, marks: Path, done: list[dict[str, Any]]) -> None:
    """Submit every job with its idempotency key, retrying through the crash (a lost answer is retried)."""
    rng = random.Random(7)
    queues = ["nlp", "vision", "ranking", "ranking", "ads"]
    for i in range(JOBS):
        body = {
            "name": f"burst-{i}",
            "queue": queues[i % len(queues)],
            "gpus": rng.choice([1, 1, 2]),
            "command": [sys.executable, "-c", JOB.format(marks=str(marks), seconds=rng.uniform(0.3, 3.0))],
            "idempotency_key": f"burst-{i}",
        }
        end = time.monotonic() + 60
        while True:
            try:
                token = (server.data / "admin-token").read_text().strip()
                r = httpx.post(
                    f"{server.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=5
                )
                r.raise_for_status()
                done.append(r.json())
                break
            except (httpx.HTTPError, OSError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)


def test_kill_9_during_a_burst_loses_nothing(server: Server, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    server.start()
    answers: list[dict[str, Any]] = []
    burst = threading.Thread(target=submit_all, args=(server, marks, answers))
    burst.start()
    while len(answers) < JOBS // 2:  # mid-burst, with jobs running, starting and exiting
        time.sleep(0.01)
    time.sleep(0.3)
    server.kill9()
    time.sleep(0.5)  # jobs keep running (and some end) while nobody watches
    server.start()
    burst.join(timeout=90)
    assert not burst.is_alive()

    token = (server.data / "admin-token").read_text().strip()
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    end = time.monotonic() + 90
    while True:
        jobs = api.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]
        if all(j["state"] in ("completed", "failed", "cancelled") for j in jobs) or time.monotonic() > end:
            break
        time.sleep(0.2)

    # No job lost or duplicated: one job per idempotency key, and every one completed.
    assert sorted(j["idempotency_key"] for j in jobs) == sorted(f"burst-{i}" for i in range(JOBS))
    assert {j["state"] for j in jobs} == {"completed"}, [(j["id"], j["state"], j["reason"]) for j in jobs]

    # No attempt started twice, and no GPU held by two processes at the same time.
    runs: dict[tuple[str, str], list[str]] = {}
    held: dict[str, list[tuple[float, float, str]]] = {}
    for f in marks.iterdir():
        job_id, attempt, pid = f.name.split("-")
        runs.setdefault((job_id, attempt), []).append(pid)
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        start = next(x for x in lines if x["what"] == "start")
        stop = next(x for x in lines if x["what"] == "end")
        for g in start["gpus"].split(","):
            held.setdefault(g, []).append((start["at"], stop["at"], f.name))
    assert all(len(pids) == 1 for pids in runs.values()), runs
    assert {j for j, _ in runs} == {str(j["id"]) for j in jobs}
    for g, spans in held.items():
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            assert start_b >= end_a, f"GPU {g} held by {a} and {b} at once"
    events = api.get(f"/v1/jobs/{jobs[0]['id']}/events").json()["events"]
    assert events[0]["kind"] == "submitted"
