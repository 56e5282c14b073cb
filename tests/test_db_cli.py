"""`corral db upgrade / downgrade / current` (the real CLI) on a database the previous release left, with rows in
it, on SQLite and PostgreSQL; migrate_on_start off refuses a database behind head; metrics_port."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from scheduler.cli.main import app
from scheduler.service.api.metrics_server import MetricsServer
from scheduler.service.store import db
from scheduler.service.store.db import NotAtHead, current_revision, head_revision, revisions
from tests.db_upgrade_kit import database_at, lost, previous_head
from tests.k8s_kit import free_port
from tests.service_kit import make_service


def corral_db(url: str, *args: str) -> tuple[int, str]:
    env = {"CORRAL_DATABASE_URL": url, "CORRAL_CONFIG": ""}
    out = CliRunner().invoke(app, ["db", *args], env=env)
    return out.exit_code, out.output


def test_upgrade_from_the_previous_head_keeps_every_row_and_downgrade_goes_back(db_url: str) -> None:
    prev, head = previous_head(), head_revision()
    written = database_at(db_url, prev)
    assert corral_db(db_url, "current") == (0, f"{prev} (behind head {head})\n")

    code, text = corral_db(db_url, "upgrade")
    assert code == 0, text
    assert f"{prev} -> {head}" in text and "s3cret" not in text
    assert current_revision(db_url) == head
    assert lost(db_url, written) == []
    assert corral_db(db_url, "current") == (0, f"{head} (head)\n")
    code, text = corral_db(db_url, "upgrade")  # again: nothing to do
    assert code == 0 and f"already at {head}" in text

    # Back to the previous release's schema: the rows it knew are all there.
    code, text = corral_db(db_url, "downgrade", "--to", prev)
    assert code == 0, text
    assert current_revision(db_url) == prev and lost(db_url, written) == []
    # And up again, as the next upgrade would.
    assert corral_db(db_url, "upgrade", "--to", head)[0] == 0
    assert current_revision(db_url) == head and lost(db_url, written) == []


def test_downgrade_below_0006_drops_the_restart_state_columns(db_url: str) -> None:
    written = database_at(db_url, "0006")
    code, text = corral_db(db_url, "downgrade", "--to", "0005")
    assert code == 0, text
    # What 0006 added (jobs.overtaken_at, attempts.admission) is gone; every row and its other columns stay.
    trimmed = {
        t: [{k: v for k, v in r.items() if k not in ("overtaken_at", "admission")} for r in rows]
        for t, rows in written.items()
    }
    assert lost(db_url, trimmed) == []
    assert lost(db_url, written) != []


def test_0009_keeps_shares_of_gpus_and_downgrade_rounds_them_up(db_url: str) -> None:
    """GPU sharing (issue 27): after 0009 jobs.gpus and attempts.gpus hold 0.25 exactly, whole amounts read back
    as ints; back at 0008 (integers) a share counts as one GPU, never less than it held."""
    written = database_at(db_url, "0008")
    assert corral_db(db_url, "upgrade", "--to", "0009")[0] == 0
    assert lost(db_url, written) == []  # whole amounts kept
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            job_id = written["attempts"][0]["job_id"]
            conn.execute(sa.text("UPDATE jobs SET gpus = 0.25 WHERE id = :i"), {"i": job_id})
            conn.execute(sa.text("UPDATE attempts SET gpus = 0.25 WHERE job_id = :i"), {"i": job_id})
        with engine.connect() as conn:
            assert conn.execute(sa.select(db.jobs.c.gpus).where(db.jobs.c.id == job_id)).scalar_one() == 0.25
            whole = conn.execute(sa.select(db.jobs.c.gpus).where(db.jobs.c.id != job_id)).scalars().all()
            assert whole and all(type(g) is int for g in whole)
        assert corral_db(db_url, "downgrade", "--to", "0008")[0] == 0
        with engine.connect() as conn:
            got = conn.execute(sa.text("SELECT gpus FROM attempts WHERE job_id = :i"), {"i": job_id}).scalars().all()
            assert got and all(g == 1 for g in got)
    finally:
        engine.dispose()


def test_bad_revisions_and_an_empty_database(db_url: str) -> None:
    assert corral_db(db_url, "current") == (0, "none (empty: no Corral schema)\n")
    code, text = corral_db(db_url, "downgrade", "--to", revisions()[0])
    assert code == 1 and "nothing to downgrade" in text
    code, text = corral_db(db_url, "upgrade", "--to", "9999")
    assert code == 2 and "unknown revision '9999'" in text
    assert corral_db(db_url, "downgrade")[0] == 2  # --to is required
    code, text = corral_db(db_url, "upgrade")  # an empty database: the whole schema
    assert code == 0 and f"empty -> {head_revision()}" in text


def test_the_database_url_comes_from_the_service_settings(tmp_path: Path) -> None:
    # No URL: SQLite in the data dir, as `corral serve` would use it.
    out = CliRunner().invoke(
        app,
        ["db", "upgrade"],
        env={"CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_DATABASE_URL": None, "CORRAL_CONFIG": ""},
    )
    assert out.exit_code == 0, out.output
    assert current_revision(f"sqlite:///{tmp_path / 'data' / 'corral.db'}") == head_revision()


def test_migrate_on_start_off_refuses_a_database_behind_head(db_url: str, tmp_path: Path) -> None:
    prev = previous_head()
    written = database_at(db_url, prev)
    with pytest.raises(NotAtHead, match=r"run `corral db upgrade`"):
        make_service(db_url, tmp_path, migrate_on_start=False)
    assert current_revision(db_url) == prev  # untouched
    out = CliRunner().invoke(
        app,
        ["serve", "--gpus", "1", "--port", str(free_port())],
        env={
            "CORRAL_DATABASE_URL": db_url,
            "CORRAL_DATA_DIR": str(tmp_path / "data"),
            "CORRAL_MIGRATE_ON_START": "false",
            "CORRAL_CONFIG": "",
        },
    )
    assert out.exit_code == 1
    assert f"the database is at migration {prev}" in out.output and "corral db upgrade" in out.output
    # After the upgrade it starts, with the rows it had.
    assert corral_db(db_url, "upgrade")[0] == 0
    assert lost(db_url, written) == []
    svc = make_service(db_url, tmp_path, migrate_on_start=False)
    listed = svc.admin.get("/v1/jobs", params={"limit": 100}).json()
    ids = {j["id"] for j in (listed["jobs"] if isinstance(listed, dict) else listed)}
    assert {j["id"] for j in written["jobs"]} <= ids


def test_migrate_on_start_by_default(db_url: str, tmp_path: Path) -> None:
    database_at(db_url, previous_head())
    make_service(db_url, tmp_path)
    assert current_revision(db_url) == head_revision()


# --- metrics_port ----------------------------------------------------------------------------------------------


def test_metrics_on_their_own_port(tmp_path: Path) -> None:
    svc = make_service(f"sqlite:///{tmp_path / 'corral.db'}", tmp_path, metrics_port=free_port())
    r = svc.admin.get("/metrics")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    server = MetricsServer(svc.core.metrics.registry, "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as got:
            assert got.status == 200 and b"# TYPE corral_gpus gauge" in got.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/jobs", timeout=5)
        assert e.value.code == 404
    finally:
        server.close()
    plain = make_service(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "other")
    assert plain.admin.get("/metrics").status_code == 200


def test_corral_serve_with_metrics_port(tmp_path: Path, corral_cmd: list[str]) -> None:
    api, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(tmp_path / "data"),
        "CORRAL_METRICS_PORT": str(metrics),
        "CORRAL_CONFIG": "",
    }
    env.pop("CORRAL_DATABASE_URL", None)
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen(
        [*corral_cmd, "serve", "--gpus", "1", "--port", str(api)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "corral serve did not get ready"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{api}/metrics", timeout=5).status_code == 404
        r = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5)
        assert r.status_code == 200 and "corral_scheduling_cycle_seconds" in r.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
