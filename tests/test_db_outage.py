"""PostgreSQL stops under Corral and comes back: the API answers 503, scheduling pauses, nothing is lost, and
everything resumes without restarting Corral."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.service_kit import PG_ENV, Service, make_service
from tests.test_crash import free_port

pytestmark = pytest.mark.integration  # a PostgreSQL server of its own

ROOT = Path(__file__).resolve().parent.parent


def pg_ctl(port: int, action: str) -> None:
    home = f"/tmp/corral-pg-{port}"
    binary = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    cmd = [str(binary), "-D", f"{home}/data", "-w", "-m", "fast", "-l", f"{home}/log", action]
    if action == "start":  # the same options scripts/postgres started it with
        cmd += ["-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"]
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root (scripts/postgres made it the postgres user's)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def own_postgres() -> Iterator[tuple[str, int]]:
    """A PostgreSQL server of this test's own, so stopping it disturbs no other test."""
    if not os.environ.get(PG_ENV) and not os.environ.get("CORRAL_REQUIRE_POSTGRES"):
        pytest.skip(f"no PostgreSQL for tests: set {PG_ENV} (scripts/test does)")
    port = free_port()
    out = subprocess.run(
        [str(ROOT / "scripts" / "postgres")],
        env={**os.environ, "CORRAL_PG_PORT": str(port)},
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        yield out.stdout.strip(), port
    finally:
        pg_ctl(port, "stop")
        shutil.rmtree(f"/tmp/corral-pg-{port}", ignore_errors=True)


def test_database_outage_pauses_and_recovers(own_postgres: tuple[str, int], tmp_path: Path) -> None:
    url, port = own_postgres
    svc: Service = make_service(url, tmp_path)
    job = {"queue": "nlp", "gpus": 1, "command": ["train"]}
    first, second = (svc.admin.post("/v1/jobs", json=job).json()["id"] for _ in range(2))
    svc.tick()
    svc.executor.exit(first, 0)  # it ends while the database is away: its exit must not be lost

    pg_ctl(port, "stop")
    r = svc.admin.post("/v1/jobs", json=job)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable" and r.headers["Retry-After"] == "5"
    ready = svc.admin.get("/readyz")
    assert ready.status_code == 503 and ready.json()["why"].startswith("database")
    with pytest.raises(sa.exc.OperationalError):  # the loop catches this, waits and tries again
        svc.tick()
    assert svc.admin.post(f"/v1/jobs/{second}/cancel").status_code == 503

    pg_ctl(port, "start")
    svc.tick()
    got = {j["id"]: j["state"] for j in svc.admin.get("/v1/jobs").json()["jobs"]}
    assert got == {first: "completed", second: "running"}  # the exit was kept; the refused cancel changed nothing
    third = svc.admin.post("/v1/jobs", json=job)
    assert third.status_code == 201
    svc.tick()
    # The engine holds exactly the live jobs (the completed one lives on in the database only).
    assert sorted(svc.core.engine.jobs) == sorted(f"job-{j}" for j in (second, third.json()["id"]))
