"""Issue 21, item 2, stored poison: what older versions stored before bodies were checked (SQLite kept NaN and
Infinity in JSON columns) is repaired by migration 0007, recorded in the model audit chain so that verification
replays it, refused at the rebuild, or shown as a string in answers instead of failing them.

Each hostile attempt is counted with attack_kit.attempt.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from scheduler.registry import audit as chain
from scheduler.service.store.db import alembic_config, audit, events, jobs, model_audit, model_versions
from tests import attack_kit
from tests.service_kit import Service, make_service
from tests.test_attack_edge import NON_FINITE, job

# ----- stored poison: migration 0007 and the rebuild -----

POISON = (
    '{"name": "x", "queue": "%s", "gpus": 1, "workers": 1, "cpus": %s, "memory_gb": %s, "command": ["x"], '
    '"max_runtime": %s, "kind": "job", "env": {}, "labels": {}, "priority": 0, "preemptible": true, '
    '"checkpoint": false}'
)


def poison(
    conn: sa.Connection, queue: str, state: str, cpus: str = "0", memory: str = "0", max_runtime: str = "null"
) -> int:
    """A job row as the old code stored it: its JSON spec with NaN or Infinity as Python's json writes them."""
    conn.execute(
        sa.text(
            "INSERT INTO jobs (name, owner, queue, pool, state, spec, gpus, priority, submitted_at, attempt) "
            "VALUES ('x', 'eve', :q, 'local', :s, :spec, 1, 0, 1000000.0, 0)"
        ),
        {"q": queue, "s": state, "spec": POISON % (queue, cpus, memory, max_runtime)},
    )
    job_id: int = conn.execute(sa.text("SELECT max(id) FROM jobs")).scalar_one()
    return job_id


def restart(url: str, tmp: Path) -> Service:
    return make_service(url, tmp)


def test_migration_0007_repairs_stored_non_finite_numbers(tmp_path: Path) -> None:
    """A database at 0006 with what the old code stored (SQLite keeps NaN and Infinity in JSON as given): after the
    upgrade, waiting poisoned jobs are rejected saying why, finished ones validate, model metrics are finite, every
    repair is audited, and jobs of other queues start."""
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    first = make_service(url, tmp_path)
    done = first.admin.post("/v1/jobs", json=job(queue="ranking")).json()["id"]
    first.core.db.dispose()
    command.downgrade(alembic_config(url), "0006")
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        waiting = poison(conn, "nlp", "pending", cpus="Infinity")
        nan_memory = poison(conn, "vision", "pending", memory="NaN")
        forever = poison(conn, "nlp", "pending", max_runtime="Infinity")
        finished = poison(conn, "nlp", "completed", cpus="Infinity", memory="-Infinity")
        conn.execute(
            sa.text(
                "INSERT INTO models (name, queue, description, created_at, created_by) "
                "VALUES ('m', 'nlp', '', 1.0, 'eve')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_versions (model, version, job_id, lineage, metrics, eval_set, artifact_uri, digest, "
                "registered_at, registered_by) VALUES ('m', 1, :j, '{}', '{\"acc\": NaN, \"loss\": 0.5, "
                "\"f1\": Infinity}', NULL, 'a', :d, 1.0, 'eve')"
            ),
            {"j": done, "d": "0" * 64},
        )
    eng.dispose()
    attack_kit.attempt(NON_FINITE, 5)

    svc = restart(url, tmp_path)  # migrates to head, then rebuilds the engine
    with svc.core.db.connect() as conn:
        rows = {r["id"]: r for r in conn.execute(sa.select(jobs)).mappings()}
        for j in (waiting, nan_memory, forever):
            assert rows[j]["state"] == "rejected", rows[j]
            assert rows[j]["reason"]["rule"] == "invalid_spec"
            assert "migration 0007" in rows[j]["reason"]["message"]
        assert "cpus = Infinity" in rows[waiting]["reason"]["message"]
        assert "memory_gb = NaN" in rows[nan_memory]["reason"]["message"]
        assert rows[forever]["spec"]["max_runtime"] is None
        assert rows[finished]["state"] == "completed"
        assert (rows[finished]["spec"]["cpus"], rows[finished]["spec"]["memory_gb"]) == (0.0, 0.0)
        metrics = conn.execute(sa.select(model_versions.c.metrics)).scalar_one()
        assert metrics == {"loss": 0.5}
        repairs = conn.execute(sa.select(audit).where(audit.c.action == "repair.non_finite")).mappings().all()
        assert {r["target"] for r in repairs} == {f"job {j}" for j in (waiting, nan_memory, forever, finished)} | {
            "model m version 1"
        }
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(events).where(events.c.kind == "rejected")).scalar_one()
            == 3
        )
    for spec in rows.values():  # every stored spec validates again
        assert all(
            isinstance(v, (int, float)) and math.isfinite(v)
            for k, v in spec["spec"].items()
            if k in ("cpus", "memory_gb")
        )
    other = svc.admin.post("/v1/jobs", json=job(queue="nlp", cpus=2.0)).json()["id"]
    svc.tick()
    states = {j: svc.admin.get(f"/v1/jobs/{j}").json()["state"] for j in (done, other)}
    assert states == {done: "starting", other: "starting"} or all(
        s in ("starting", "running") for s in states.values()
    ), states


def test_postgresql_never_stored_non_finite_numbers(db_url: str, tmp_path: Path) -> None:
    """PostgreSQL's json type refuses NaN and Infinity, so the old code failed there (a 500) instead of storing
    them; migration 0007 finds nothing to repair and runs the same."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite stores NaN and Infinity: test_migration_0007_repairs_stored_non_finite_numbers")
    svc = make_service(db_url, tmp_path)
    with pytest.raises(sa.exc.DataError), svc.core.db.begin() as conn:
        attack_kit.attempt(NON_FINITE)
        poison(conn, "nlp", "pending", cpus="Infinity")
    command.downgrade(alembic_config(db_url), "0006")
    command.upgrade(alembic_config(db_url), "head")
    with svc.core.db.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count()).select_from(audit).where(audit.c.action == "repair.non_finite")
            ).scalar_one()
            == 0
        )
    svc.core.db.dispose()


def test_the_rebuild_rejects_a_poisoned_job_left_in_the_database(tmp_path: Path) -> None:
    """Whatever put it there (a restore from an old backup, a hand edit), a waiting job with infinite CPUs is
    rejected at the rebuild, saying why, instead of stalling its pool; a running one keeps its GPUs."""
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    first = make_service(url, tmp_path)
    first.core.db.dispose()
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        bad = poison(conn, "nlp", "pending", cpus="Infinity")
    eng.dispose()
    attack_kit.attempt(NON_FINITE)
    svc = restart(url, tmp_path)
    row = svc.admin.get(f"/v1/jobs/{bad}").json()
    assert row["state"] == "rejected" and row["reason"]["rule"] == "invalid_spec"
    assert "finite" in row["reason"]["message"]
    ok = svc.admin.post("/v1/jobs", json=job(queue="vision", cpus=1.0)).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{ok}").json()["state"] in ("starting", "running")


def test_migration_0007_records_its_metric_repairs_in_the_model_audit_chain(tmp_path: Path) -> None:
    """The metrics 0007 removes are a change to a version: it is appended to the chain (linked and hashed as the
    registry does, by the migration's frozen copy of the hashing), so the chain verifies and replays it."""
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    first = make_service(url, tmp_path)
    done = first.admin.post("/v1/jobs", json=job(queue="nlp")).json()["id"]
    first.core.db.dispose()
    command.downgrade(alembic_config(url), "0006")
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO models (name, queue, description, created_at, created_by) "
                "VALUES ('m', 'nlp', '', 1.0, 'eve')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_versions (model, version, job_id, lineage, metrics, eval_set, artifact_uri, digest, "
                "registered_at, registered_by) VALUES ('m', 1, :j, '{}', '{\"acc\": NaN, \"loss\": 0.5}', NULL, 'a', "
                ":d, 1.0, 'eve')"
            ),
            {"j": done, "d": "0" * 64},
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_aliases (model, stage, version, previous, updated_at) "
                "VALUES ('m', 'candidate', 1, NULL, 1.0)"
            )
        )
        registered = chain.next_entry(
            None,
            at=1.0,
            actor="eve",
            action="version.register",
            model="m",
            detail={"version": 1, "job": done, "digest": "0" * 64, "artifact_uri": "a"},
        )
        conn.execute(model_audit.insert().values(**registered))
    eng.dispose()
    attack_kit.attempt(NON_FINITE)
    svc = make_service(url, tmp_path)
    with svc.core.db.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(model_audit).order_by(model_audit.c.seq)).mappings()]
    assert [r["action"] for r in rows] == ["version.register", "version.repair"]
    assert rows[1]["detail"]["metrics"] == {"loss": 0.5} and rows[1]["detail"]["removed_metrics"] == {"acc": "NaN"}
    assert rows[1]["hash"] == chain.entry_hash(rows[1]["prev_hash"], rows[1])  # the frozen copy agrees
    checked = svc.admin.get("/v1/models/audit", params={"verify": True}).json()["verified"]
    assert checked["intact"] is True, checked


def test_verify_replays_repairs_and_reads_nan_as_nan() -> None:
    registered = chain.next_entry(
        None,
        at=1.0,
        actor="eve",
        action="version.register",
        model="m",
        detail={"version": 1, "metrics": {"acc": 0.9, "f1": 0.5}},
    )
    repaired = chain.next_entry(
        registered,
        at=2.0,
        actor="corral",
        action="version.repair",
        model="m",
        detail={"version": 1, "metrics": {"acc": 0.9}, "removed_metrics": {"f1": "NaN"}},
    )
    table = [
        {"model": "m", "version": 1, "digest": None, "artifact_uri": None, "metrics": {"acc": 0.9}, "eval_set": None}
    ]
    assert chain.version_problems([registered, repaired], table) == []
    assert chain.version_problems([registered], table)  # without the repair entry, the change shows
    # NaN equals nothing in Python, itself included; a version still holding the NaN it was registered with
    # (a row no hash could cover, but version_problems reads what it is given) is unchanged.
    old = {"action": "version.register", "model": "m", "detail": {"version": 1, "metrics": {"acc": math.nan}}}
    nan_table = [{**table[0], "metrics": {"acc": math.nan}}]
    assert chain.version_problems([old], nan_table) == []


def test_answers_show_stored_non_finite_values_as_null(tmp_path: Path) -> None:
    """jobs.reason, events.data and model_audit.detail written by an older Corral on SQLite may hold NaN or
    Infinity (migration 0007 repairs job specs and metrics only): every answer has a response model, which pydantic
    writes with NaN and Infinity as null, so they answer 200, and verification reports the unhashable row."""
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    svc = make_service(url, tmp_path)
    j = svc.admin.post("/v1/jobs", json=job(queue="nlp")).json()["id"]
    # Ended, so that its answer shows the stored reason (a pending job's is the engine's, computed now).
    assert svc.admin.post(f"/v1/jobs/{j}/cancel").status_code == 200
    with svc.core.db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET reason = :r WHERE id = :j"),
            {"r": '{"rule": "x", "message": "m", "numbers": {"free": NaN}}', "j": j},
        )
        conn.execute(
            sa.text("INSERT INTO events (at, job_id, kind, message, data) VALUES (1.0, :j, 'note', 'm', :d)"),
            {"j": j, "d": '{"cpus": Infinity, "left": -Infinity}'},
        )
        conn.execute(
            sa.text(
                "INSERT INTO models (name, queue, description, created_at, created_by) "
                "VALUES ('m', 'nlp', '', 1.0, 'eve')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_audit (seq, at, actor, action, model, detail, prev_hash, hash) "
                "VALUES (1, 1.0, 'eve', 'model.create', 'm', '{\"x\": NaN}', :g, :g)"
            ),
            {"g": "0" * 64},
        )
    attack_kit.attempt(NON_FINITE, 3)
    shown = svc.admin.get(f"/v1/jobs/{j}")
    assert shown.status_code == 200 and shown.json()["reason"]["numbers"]["free"] is None, shown.text
    listed = svc.admin.get(f"/v1/jobs/{j}/events")
    assert listed.status_code == 200, listed.text
    assert [e["data"] for e in listed.json()["events"] if e["kind"] == "note"][0]["cpus"] is None
    entries = svc.admin.get("/v1/models/audit", params={"verify": True})
    assert entries.status_code == 200 and entries.json()["entries"][0]["detail"]["x"] is None, entries.text
    assert entries.json()["verified"]["intact"] is False  # a row no hash can cover is reported, not a 500
