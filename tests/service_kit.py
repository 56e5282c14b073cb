"""Test kit for the service: database URLs (SQLite, and PostgreSQL when a server is configured), a scripted
executor, a settable clock, and a service with API clients per role."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from scheduler.backends.base import Exit, GPUInfo, Handle, Launch
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import build_core, create_token
from scheduler.service.core.loop import Core
from scheduler.service.store.db import migrate
from tests.factories import service_settings

PG_ENV = "CORRAL_TEST_POSTGRES_URL"  # a server's admin URL, e.g. postgresql+psycopg://postgres@127.0.0.1:55432/postgres


def database_url(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, empty database of `kind`; PostgreSQL gets a database of its own, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'corral.db'}"
        return
    admin_url = os.environ.get(PG_ENV)
    if not admin_url:
        if os.environ.get("CORRAL_REQUIRE_POSTGRES"):
            pytest.fail(f"{PG_ENV} is not set, but CORRAL_REQUIRE_POSTGRES asks for PostgreSQL tests")
        pytest.skip(f"no PostgreSQL server: set {PG_ENV} (scripts/test starts one)")
    name = f"corral_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@dataclass
class ScriptedExecutor:
    """An executor whose processes exist only in a dict: tests end them when they like."""

    launched: list[Launch] = field(default_factory=list)
    live: dict[tuple[str, int], Launch] = field(default_factory=dict)
    stopping: dict[tuple[str, int], float] = field(default_factory=dict)  # -> SIGKILL deadline
    ended: list[Exit] = field(default_factory=list)
    terminated: list[tuple[str, int]] = field(default_factory=list)
    exits_on_term: bool = True  # a polite job exits at SIGTERM; else it waits for SIGKILL
    outputs: Path | None = None  # root of the attempts' output directories (make_service puts it in tmp)

    def launch(self, launch: Launch) -> Handle:
        self.launched.append(launch)
        self.live[(launch.job_id, launch.attempt)] = launch
        return Handle(launch.job_id, launch.attempt, 10_000 + len(self.launched), 1.0)

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        self.terminated.append((job_id, attempt))
        if (job_id, attempt) in self.live:
            self.stopping[(job_id, attempt)] = now + grace_s

    def exit(self, job_id: int | str, code: int, attempt: int | None = None) -> None:
        key = next(k for k in self.live if k[0] == str(job_id) and (attempt is None or k[1] == attempt))
        del self.live[key]
        self.stopping.pop(key, None)
        self.ended.append(Exit(key[0], key[1], code))

    def poll(self, now: float) -> list[Exit]:
        for key, deadline in list(self.stopping.items()):
            if self.exits_on_term or now >= deadline:
                self.exit(key[0], -15 if self.exits_on_term else -9, key[1])
        out, self.ended = self.ended, []
        return out

    def adopt(self, handle: Handle) -> Exit | None:
        if (handle.job_id, handle.attempt) in self.live:
            return None
        return Exit(handle.job_id, handle.attempt, None, "vanished while Corral was down")

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        return f"/nonexistent/{job_id}/{attempt}/stdout", f"/nonexistent/{job_id}/{attempt}/stderr"

    def alive(self, job_id: str, attempt: int) -> bool:
        return (job_id, attempt) in self.live

    def output_dir(self, job_id: str, attempt: int) -> Path:
        """KeepsOutputs: tests write a job's outputs (artifact, metrics.json) here as its process would."""
        assert self.outputs is not None, "give the ScriptedExecutor an outputs directory"
        return self.outputs / job_id / str(attempt) / "output"


def gpus(n: int, model: str = "virtual") -> list[GPUInfo]:
    return [GPUInfo(i, model) for i in range(n)]


DEMO_TREE: dict[str, Any] = {
    "queues": [
        {"name": "research", "quota": {"local": 4}},
        {"name": "product", "quota": {"local": 4}},
        {"name": "nlp", "parent": "research", "quota": {"local": 2}},
        {"name": "vision", "parent": "research", "quota": {"local": 2}},
        {"name": "ranking", "parent": "product", "quota": {"local": 4}},
    ]
}


@dataclass
class Service:
    """A service on 8 GPUs with the demo tree and a client per role; `tick()` runs one scheduling cycle."""

    core: Core
    clock: Clock
    executor: Any
    admin: TestClient
    clients: dict[str, TestClient]

    def tick(self) -> None:
        self.core.tick()

    def client(self, user: str, role: Role, scope: str | None = None) -> TestClient:
        key = f"{user}/{role}/{scope}"
        if key not in self.clients:
            c = TestClient(self.admin.app)
            c.headers["Authorization"] = f"Bearer {create_token(self.core, user, role, scope)}"
            self.clients[key] = c
        return self.clients[key]


@functools.cache
def migrated_sqlite() -> Path:
    """A SQLite database migrated to the newest schema, once per test process: copying it takes 17 ms where
    migrating a new one takes 500 (measured), and most in-process service tests start from one."""
    path = Path(tempfile.mkdtemp(prefix="corral-schema-")) / "corral.db"
    migrate(f"sqlite:///{path}")
    return path


def make_service(url: str, tmp: Path, executor: Any = None, n_gpus: int = 8, **settings: Any) -> Service:
    file = url.removeprefix("sqlite:///")
    if file != url and not Path(file).exists():  # a new SQLite database: start from the migrated copy
        shutil.copy(migrated_sqlite(), file)
    clock = Clock()
    executor = executor if executor is not None else ScriptedExecutor()
    if isinstance(executor, ScriptedExecutor) and executor.outputs is None:
        executor.outputs = tmp / "outputs"
    s = service_settings(tmp, url, grace_s=30, **settings)
    core = build_core(s, executor, gpus(n_gpus), clock)
    app = create_app(core, run_loop=False)
    admin = TestClient(app)
    admin.headers["Authorization"] = f"Bearer {create_token(core, 'root', Role.PLATFORM_ADMIN)}"
    r = admin.post("/v1/queues/apply", json={"document": DEMO_TREE, "comment": "test tree"})
    assert r.status_code == 200, r.text
    return Service(core, clock, executor, admin, {})
