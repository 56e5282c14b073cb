"""A bounded load on loopback: 200 concurrent clients for 60 s, mixing submissions with the reads people make.

The server is `python -m scheduler.service` on declared GPUs with one job holding every GPU (submissions
queue behind it). vegeta sends requests evenly spaced at a fixed total rate, with at most --clients in
flight, as a team member (submit, list, get, explain, events) and a platform admin (queues, pools, usage).
Reports, over the whole run and per kind of request: count, error rate (non-2xx and transport errors) and
latency percentiles.

    python benchmarks/load_mixed.py --db sqlite --rate 400 --duration 60
    python benchmarks/load_mixed.py --db postgresql --rate 400 --duration 60   # PostgreSQL from scripts/postgres
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import subprocess
from collections import defaultdict
from typing import Any

import httpx
from bench_server import Server, block_every_gpu, running_server, vegeta

SUBMIT = {"name": "load", "queue": "default", "gpus": 1, "command": ["true"]}
# kind -> (share of requests, method, path; {id} is a seeded job, who sends it)
MIX: dict[str, tuple[float, str, str, str]] = {
    "submit": (0.25, "POST", "/v1/jobs", "member"),
    "list": (0.20, "GET", "/v1/jobs?limit=50", "member"),
    "get": (0.15, "GET", "/v1/jobs/{id}", "member"),
    "explain": (0.10, "GET", "/v1/jobs/{id}/explain", "member"),
    "events": (0.05, "GET", "/v1/jobs/{id}/events", "member"),
    "queues": (0.10, "GET", "/v1/queues", "admin"),
    "pools": (0.10, "GET", "/v1/pools", "admin"),
    "usage": (0.05, "GET", "/v1/usage", "admin"),
}


def targets(server: Server, member: str, ids: list[int], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """n requests drawn from MIX, shuffled once; vegeta sends them round and round."""
    kinds = rng.choices(list(MIX), weights=[m[0] for m in MIX.values()], k=n)
    out = []
    for kind in kinds:
        _, method, path, who = MIX[kind]
        token = member if who == "member" else server.token
        t: dict[str, Any] = {
            "method": method,
            "url": server.base + path.replace("{id}", str(rng.choice(ids))),
            "header": {"Authorization": [f"Bearer {token}"]},
        }
        if method == "POST":
            t["body"] = base64.b64encode(json.dumps(SUBMIT).encode()).decode()
            t["header"]["Content-Type"] = ["application/json"]
        out.append(t)
    return out


def kind_of(method: str, url: str) -> str:
    path = "/v1/" + url.split("/v1/", 1)[1].split("?")[0]
    parts = path.strip("/").split("/")
    if method == "POST":
        return "submit"
    if parts[1] == "jobs":
        return {2: "list", 3: "get"}.get(len(parts), parts[-1])
    return parts[1]


def summary(latencies_ms: list[float], errors: int) -> dict[str, Any]:
    q = statistics.quantiles(latencies_ms, n=1000, method="inclusive") if len(latencies_ms) > 1 else latencies_ms * 999
    return {
        "requests": len(latencies_ms),
        "errors": errors,
        "error_rate": round(errors / max(1, len(latencies_ms)), 5),
        "p50_ms": round(q[499], 1),
        "p90_ms": round(q[899], 1),
        "p99_ms": round(q[989], 1),
        "max_ms": round(max(latencies_ms), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--clients", type=int, default=200, help="most requests in flight (vegeta workers)")
    ap.add_argument("--rate", type=int, default=400, help="requests/s offered in all")
    ap.add_argument("--duration", type=int, default=60, help="seconds of load")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with running_server(args.db) as server:
        block_every_gpu(server)
        member = httpx.post(
            f"{server.base}/v1/tokens", headers=server.auth, json={"user": "ada", "role": "member", "scope": "default"}
        ).json()["token"]
        ids = [
            httpx.post(f"{server.base}/v1/jobs", headers={"Authorization": f"Bearer {member}"}, json=SUBMIT).json()[
                "id"
            ]
            for _ in range(50)
        ]
        lines = "\n".join(json.dumps(t) for t in targets(server, member, ids, 2000, rng))
        attack = subprocess.run(
            [
                vegeta(),
                "attack",
                "-format",
                "json",
                "-rate",
                f"{args.rate}/s",
                "-duration",
                f"{args.duration}s",
                "-workers",
                str(args.clients),
                "-max-workers",
                str(args.clients),
                "-max-connections",
                str(args.clients),
                "-timeout",
                "30s",
            ],
            input=(lines + "\n").encode(),
            check=True,
            capture_output=True,
        )
        encoded = subprocess.run(
            [vegeta(), "encode", "-to", "json"], input=attack.stdout, check=True, capture_output=True
        ).stdout.decode()
    by_kind: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    codes: dict[int, int] = defaultdict(int)
    for line in encoded.splitlines():
        r = json.loads(line)
        kind = kind_of(r["method"], r["url"])
        by_kind[kind].append(r["latency"] / 1e6)
        codes[r["code"]] += 1
        if not 200 <= r["code"] < 300 or r["error"]:
            errors[kind] += 1
    every = [x for v in by_kind.values() for x in v]
    result = {
        "db": args.db,
        "clients": args.clients,
        "offered_per_s": args.rate,
        "duration_s": args.duration,
        "achieved_per_s": round(len(every) / args.duration, 1),
        "status_codes": dict(sorted(codes.items())),
        "all": summary(every, sum(errors.values())),
        "by_kind": {k: summary(v, errors[k]) for k, v in sorted(by_kind.items())},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
