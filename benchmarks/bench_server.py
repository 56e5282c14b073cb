"""A real `python -m scheduler.service` for HTTP benchmarks: its own data directory, SQLite or PostgreSQL, a token."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
VEGETA_VERSION = "v12.13.0"
VEGETA = Path.home() / ".cache" / "corral" / "tools" / f"vegeta-{VEGETA_VERSION}" / "vegeta"


@dataclass(frozen=True)
class Server:
    base: str
    token: str  # the bootstrap platform-admin token
    data: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def database(kind: str, data: Path) -> str:
    """An SQLite file in `data`, or a fresh database on the PostgreSQL of scripts/postgres."""
    if kind == "sqlite":
        return f"sqlite:///{data / 'corral.db'}"
    admin = subprocess.run([str(ROOT / "scripts" / "postgres")], check=True, capture_output=True, text=True)
    url = admin.stdout.strip()
    name = f"corral_bench_{os.getpid()}"
    with sa.create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


@contextmanager
def running_server(db: str, gpus: int = 8, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start the service on declared GPUs; stop it (and any job process it started) afterwards."""
    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    port = free_port()
    full_env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_PORT": str(port),
        "CORRAL_GPUS": str(gpus),
        "CORRAL_DATABASE_URL": database(db, data),
        **(env or {}),
    }
    server = subprocess.Popen([sys.executable, "-m", "scheduler.service"], env=full_env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield Server(base, (data / "admin-token").read_text().strip(), data)
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["pkill", "-f", "sleep 3600"], check=False)
        shutil.rmtree(data, ignore_errors=True)


def block_every_gpu(server: Server, gpus: int = 8) -> None:
    """One job holding every GPU, so later submissions queue (no process is started per submission)."""
    httpx.post(
        f"{server.base}/v1/jobs",
        headers=server.auth,
        json={"name": "blocker", "queue": "default", "gpus": gpus, "command": ["sleep", "3600"]},
    ).raise_for_status()


def vegeta() -> str:
    """The vegeta load generator (an open-loop, evenly paced attacker), built once into ~/.cache."""
    if not VEGETA.exists():
        VEGETA.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "install", f"github.com/tsenart/vegeta/v12@{VEGETA_VERSION}"],
            check=True,
            env={**os.environ, "GOBIN": str(VEGETA.parent)},
        )
    return str(VEGETA)
