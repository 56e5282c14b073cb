"""Crash trials: drive a job load (submits, completions, cancels, quota changes) and SIGKILL the server at
random instants, restarting it each time; then check that nothing was lost, duplicated or run twice, that no
GPU was held by two processes at once, that every state change was legal, and that the audit chain holds.

    python benchmarks/crash_trials.py --jobs 5000 --trials 20 --db sqlite
    python benchmarks/crash_trials.py --jobs 5000 --trials 20 --db postgresql   # scripts/postgres

Results go to RELIABILITY.md by hand, with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_server import database, free_port  # noqa: E402  (run as a script from anywhere)

# Each job marks when its process held which GPUs; SIGTERM (preemption, cancel) ends it after marking.
JOB = """
import json, os, signal, sys, time
path = os.path.join({marks!r}, f"{{os.environ['CORRAL_JOB_ID']}}-{{os.environ['CORRAL_ATTEMPT']}}-{{os.getpid()}}")
def mark(what):
    with open(path, "a") as f:
        f.write(json.dumps({{"at": time.time(), "what": what, "gpus": os.environ["CUDA_VISIBLE_DEVICES"]}}) + "\\n")
def stop(*_):
    mark("end")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
mark("start")
time.sleep({seconds})
mark("end")
"""
# Legal moves of a job's state, as its events record them.
LEGAL = {
    "submitted": {"admitted", "cancelled"},
    "admitted": {"started", "preempted", "requeued", "cancelled", "adopted", "exited", "max_runtime"},
    "started": {"exited", "preempted", "cancelled", "adopted", "max_runtime"},
    "adopted": {"exited", "preempted", "cancelled", "adopted", "max_runtime"},
    "preempted": {"admitted", "exited", "cancelled", "adopted"},
    "requeued": {"admitted", "cancelled"},
    "cancelled": {"exited", "adopted"},
    # A preempted attempt's exit may come after its job was admitted again: the next attempt then starts (it
    # waits for that exit, so no GPU is held twice), or is preempted, requeued or adopted before it does.
    "exited": {"admitted", "exited", "cancelled", "started", "preempted", "requeued", "adopted"},
    "max_runtime": {"exited", "adopted"},
}
TREES = [
    {"queues": [{"name": "a", "quota": {"local": 4}}, {"name": "b", "quota": {"local": 4}}]},
    {"queues": [{"name": "a", "quota": {"local": 6}}, {"name": "b", "quota": {"local": 2}}]},
]


class Server:
    def __init__(self, data: Path, url: str, port: int):
        self.env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(data),
            "CORRAL_PORT": str(port),
            "CORRAL_GPUS": "8",
            "CORRAL_TICK_S": "0.05",
            "CORRAL_GRACE_S": "2",
            "CORRAL_DATABASE_URL": url,
        }
        self.base = f"http://127.0.0.1:{port}"
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.data / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.service"], env=self.env, cwd=ROOT, stdout=log, stderr=log
            )
        for _ in range(600):
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit("server did not start: see " + str(self.data / "server.log"))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def call(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response | None:
    """One request, retried through crashes until the server answers (None if it never does)."""
    for _ in range(400):
        try:
            token = (server.data / "admin-token").read_text().strip()
            return httpx.request(
                method, server.base + path, json=body, timeout=10, headers={"Authorization": f"Bearer {token}"}
            )
        except (httpx.HTTPError, OSError):
            time.sleep(0.05)
    return None


def drive(
    server: Server, jobs: int, marks: Path, done: threading.Event, rng: random.Random, submitted: list[int]
) -> None:
    for i in range(jobs):
        submitted[0] = i
        body = {
            "name": f"j{i}",
            "queue": rng.choice(["a", "b"]),
            "gpus": rng.choice([1, 1, 2, 4]),
            "command": [sys.executable, "-c", JOB.format(marks=str(marks), seconds=rng.uniform(0.05, 1.5))],
            "idempotency_key": f"j{i}",
        }
        call(server, "POST", "/v1/jobs", body)
        if rng.random() < 0.03:
            call(server, "POST", f"/v1/jobs/{rng.randint(1, i + 1)}/cancel")
        if rng.random() < 0.005:
            call(server, "POST", "/v1/queues/apply", {"document": rng.choice(TREES), "comment": "trial"})
    done.set()


def check(url: str, marks: Path, jobs: int) -> list[str]:
    problems: list[str] = []
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, idempotency_key, state FROM jobs")).all()
        events = conn.execute(sa.text("SELECT job_id, kind FROM events WHERE job_id IS NOT NULL ORDER BY id")).all()
    keys = [r[1] for r in rows]
    if sorted(keys) != sorted(f"j{i}" for i in range(jobs)):
        problems.append(f"{len(rows)} jobs for {jobs} keys ({len(set(keys))} distinct)")
    for r in rows:
        if r[2] not in ("completed", "cancelled", "failed"):
            problems.append(f"job {r[0]} ended the run {r[2]}")
    last: dict[int, str] = {}
    for job, kind in events:
        if job in last and kind not in LEGAL.get(last[job], set()):
            problems.append(f"job {job}: {last[job]} -> {kind} is not a legal move")
        last[job] = kind
    runs: dict[str, int] = defaultdict(int)
    held: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for f in marks.iterdir():
        job_id, attempt, _ = f.name.split("-")
        runs[f"{job_id}-{attempt}"] += 1
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        start = next(x for x in lines if x["what"] == "start")
        end = next((x["at"] for x in lines if x["what"] == "end"), float("inf"))
        for g in start["gpus"].split(","):
            held[g].append((start["at"], end, f.name))
    problems += [f"attempt {a} started {n} times" for a, n in runs.items() if n > 1]
    for g, spans in held.items():
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                problems.append(f"GPU {g} held by {a} and {b} at once")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--trials", type=int, default=20, help="SIGKILLs, each followed by a restart")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="corral-crash-"))
    (home / "data").mkdir()
    (home / "marks").mkdir()
    url = database(args.db, home / "data")
    server = Server(home / "data", url, free_port())
    server.start()
    call(server, "POST", "/v1/queues/apply", {"document": TREES[0]})
    done = threading.Event()
    started = time.monotonic()
    submitted = [0]
    load = threading.Thread(
        target=drive,
        args=(server, args.jobs, home / "marks", done, random.Random(args.seed + 1), submitted),
        daemon=True,
    )
    load.start()
    # Kills are spread over the whole run, submissions and the processes' runs alike: progress counts jobs
    # submitted plus attempts started, 0 .. about 2 x jobs (cancelled jobs never start); each kill comes at a
    # random point of it, or after 30 s without progress.
    points = sorted(rng.sample(range(1, int(1.9 * args.jobs)), args.trials))
    for trial, point in enumerate(points):
        last, since = -1, time.monotonic()
        while (progress := submitted[0] + sum(1 for _ in (home / "marks").iterdir())) < point:
            if progress != last:
                last, since = progress, time.monotonic()
            elif time.monotonic() - since > 30:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.0))
        server.kill9()
        time.sleep(rng.uniform(0.0, 1.0))
        server.start()
        print(f"trial {trial + 1}: killed at progress {point} and restarted", flush=True)
    load.join()
    while True:  # let everything finish
        r = call(server, "GET", "/v1/jobs?state=pending&state=starting&state=running&limit=1")
        if r is not None and not r.json()["jobs"]:
            break
        time.sleep(0.5)
    audit = call(server, "GET", "/v1/models/audit?verify=true")
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait()
    problems = check(url, home / "marks", args.jobs)
    if audit is None or not audit.json()["verified"]["intact"]:
        problems.append("the audit chain is broken")
    print(
        json.dumps(
            {
                "db": args.db,
                "jobs": args.jobs,
                "trials": args.trials,
                "wall_s": round(time.monotonic() - started, 1),
                "problems": problems[:20],
                "problem_count": len(problems),
                "dir": str(home),
            }
        )
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
