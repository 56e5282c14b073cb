"""Submits per second over HTTP, and latency percentiles, at N concurrent clients on SQLite or PostgreSQL.

The server is `python -m scheduler.service` on declared GPUs, with one job holding every GPU, so submissions
queue up behind it as on a saturated cluster (no process is started per submission).

Two loads: as fast as the clients can go (wrk: each client sends its next submission when the last is
answered, so latency is mostly waiting in line), or a fixed rate spread over the clients (hey -q: what a
client sees when the service is asked for N submits/s).

    python benchmarks/service_submit.py --db sqlite --connections 200 --duration 20
    python benchmarks/service_submit.py --db postgresql --rate 1000   # PostgreSQL from scripts/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
BODY = '{"name": "bench", "queue": "default", "gpus": 1, "command": ["true"]}'
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '""" + BODY + """'
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def database(kind: str, data: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{data / 'corral.db'}"
    admin = subprocess.run([str(ROOT / "scripts" / "postgres")], check=True, capture_output=True, text=True)
    url = admin.stdout.strip()
    name = f"corral_bench_{os.getpid()}"
    with sa.create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


def parse_ms(text: str) -> float:
    value, unit = float(re.match(r"([\d.]+)", text).group(1)), re.sub(r"[\d.]", "", text)  # type: ignore[union-attr]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--duration", type=int, default=20, help="seconds of load")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--rate", type=int, default=0, help="submits/s offered in all (hey); 0: as fast as possible")
    args = ap.parse_args()
    tool = "hey" if args.rate else "wrk"
    if not shutil.which(tool):
        sys.exit(f"needs {tool} (apt-get install {tool})")
    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    port = free_port()
    env = {**os.environ, "CORRAL_DATA_DIR": str(data), "CORRAL_PORT": str(port), "CORRAL_GPUS": "8",
           "CORRAL_DATABASE_URL": database(args.db, data)}
    server = subprocess.Popen([sys.executable, "-m", "scheduler.service"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        token = (data / "admin-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        httpx.post(f"{base}/v1/jobs", headers=auth, json={
            "name": "blocker", "queue": "default", "gpus": 8, "command": ["sleep", "3600"]}).raise_for_status()
        if args.rate:
            cmd = ["hey", "-z", f"{args.duration}s", "-c", str(args.connections),
                   "-q", f"{args.rate / args.connections:g}", "-m", "POST", "-T", "application/json",
                   "-H", f"Authorization: Bearer {token}", "-d", BODY, f"{base}/v1/jobs"]
        else:
            script = data / "submit.lua"
            script.write_text(LUA % token)
            cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.duration}s",
                   "--latency", "-s", str(script), f"{base}/v1/jobs"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        jobs = httpx.get(f"{base}/v1/jobs", headers=auth, params={"limit": 1}).json()["jobs"][0]["id"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["pkill", "-f", "sleep 3600"], check=False)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if args.rate:
        lat = {p: float(v) * 1000 for p, v in re.findall(r"^\s+(50|99)%+ in ([\d.]+) secs", out, re.M)}
        codes = re.findall(r"\[(\d+)\]\s+(\d+) responses", out)
        errors = sum(int(n) for c, n in codes if not c.startswith("2"))
    else:
        lat = {p: parse_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
        found = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = int(found.group(1)) if found else 0
    result = {"db": args.db, "tool": tool, "connections": args.connections, "offered_per_s": args.rate or None,
              "duration_s": args.duration, "submits_per_s": rps, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
              "non_2xx": errors, "jobs_in_db": jobs - 1}
    print(out)
    print(json.dumps(result))
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
