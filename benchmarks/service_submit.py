"""Submits per second over HTTP, and latency percentiles, at N concurrent clients (wrk) on SQLite or PostgreSQL.

The server is `python -m scheduler.service` on declared GPUs, with one job holding every GPU, so submissions
queue up behind it as on a saturated cluster (no process is started per submission).

    python benchmarks/service_submit.py --db sqlite --connections 200 --duration 20
    python benchmarks/service_submit.py --db postgresql   # uses scripts/postgres
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
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '{"name": "bench", "queue": "default", "gpus": 1, "command": ["true"]}'
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
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("needs wrk (apt-get install wrk)")
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
        script = data / "submit.lua"
        script.write_text(LUA % token)
        out = subprocess.run(["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.duration}s",
                              "--latency", "-s", str(script), f"{base}/v1/jobs"],
                             check=True, capture_output=True, text=True).stdout
        jobs = httpx.get(f"{base}/v1/jobs", headers=auth, params={"limit": 1}).json()["jobs"][0]["id"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["pkill", "-f", "sleep 3600"], check=False)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: parse_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {"db": args.db, "connections": args.connections, "duration_s": args.duration,
              "submits_per_s": rps, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
              "non_2xx": int(errors.group(1)) if errors else 0, "jobs_in_db": jobs - 1}
    print(out)
    print(json.dumps(result))
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
