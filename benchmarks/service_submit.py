"""Submits per second over HTTP, and latency percentiles, at N concurrent clients on SQLite or PostgreSQL.

The server is `python -m scheduler.service` on declared GPUs, with one job holding every GPU, so submissions
queue up behind it as on a saturated cluster (no process is started per submission).

Two loads: as fast as the clients can go (wrk: each client sends its next submission when the last is
answered, so latency is mostly waiting in line), or a fixed rate (vegeta: submissions evenly spaced in time,
at most N in flight; what a client sees when the service is asked for that many submits/s).

    python benchmarks/service_submit.py --db sqlite --connections 200 --duration 20
    python benchmarks/service_submit.py --db postgresql --rate 1000   # PostgreSQL from scripts/postgres
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys

import httpx
from bench_server import block_every_gpu, running_server, vegeta

BODY = '{"name": "bench", "queue": "default", "gpus": 1, "command": ["true"]}'
LUA = (
    """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '"""
    + BODY
    + """'
"""
)


def parse_ms(text: str) -> float:
    value, unit = float(re.match(r"([\d.]+)", text).group(1)), re.sub(r"[\d.]", "", text)  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--duration", type=int, default=20, help="seconds of load")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--rate", type=int, default=0, help="submits/s offered in all (vegeta); 0: as fast as possible")
    args = ap.parse_args()
    if not args.rate and not shutil.which("wrk"):
        sys.exit("needs wrk (apt-get install wrk)")
    with running_server(args.db) as server:
        block_every_gpu(server)
        if args.rate:
            target = json.dumps(
                {
                    "method": "POST",
                    "url": f"{server.base}/v1/jobs",
                    "body": _b64(BODY),
                    "header": {"Authorization": [f"Bearer {server.token}"], "Content-Type": ["application/json"]},
                }
            )
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
                    str(args.connections),
                    "-max-workers",
                    str(args.connections),
                    "-max-connections",
                    str(args.connections),
                ],
                input=(target + "\n").encode(),
                capture_output=True,
            )
            if attack.returncode:
                sys.exit(attack.stderr.decode())
            out = subprocess.run(
                [vegeta(), "report", "-type", "json"], input=attack.stdout, check=True, capture_output=True
            ).stdout.decode()
        else:
            script = server.data / "submit.lua"
            script.write_text(LUA % server.token)
            out = subprocess.run(
                [
                    "wrk",
                    "-t",
                    str(args.threads),
                    "-c",
                    str(args.connections),
                    "-d",
                    f"{args.duration}s",
                    "--latency",
                    "-s",
                    str(script),
                    f"{server.base}/v1/jobs",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        jobs = httpx.get(f"{server.base}/v1/jobs", headers=server.auth, params={"limit": 1}).json()["jobs"][0]["id"]
    if args.rate:
        rep = json.loads(out)
        rps, errors = rep["throughput"], rep["requests"] - rep["status_codes"].get("201", 0)
        lat = {"50": rep["latencies"]["50th"] / 1e6, "99": rep["latencies"]["99th"] / 1e6}
    else:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        lat = {p: parse_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
        found = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = int(found.group(1)) if found else 0
    result = {
        "db": args.db,
        "tool": "vegeta" if args.rate else "wrk",
        "connections": args.connections,
        "offered_per_s": args.rate or None,
        "duration_s": args.duration,
        "submits_per_s": round(rps, 1),
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non_2xx": errors,
        "jobs_in_db": jobs - 1,
    }
    print(out)
    print(json.dumps(result))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


if __name__ == "__main__":
    main()
