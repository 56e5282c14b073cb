"""A database at an older migration with rows in it, and what it held: for the upgrade tests of `corral db` and of
the Helm chart's hook (tests/test_db_cli.py, tests/test_helm_chart.py)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from scheduler.service.store.db import revisions, upgrade

TREE = {
    "queues": [
        {"name": "research", "quota": {"local": 4}},
        {"name": "nlp", "parent": "research", "quota": {"local": 2}},
    ]
}


def previous_head() -> str:
    """The migration before this version's newest: where the previous release left the database."""
    return revisions()[-2]


def _rows(now: float) -> dict[str, list[dict[str, Any]]]:
    spec = {
        "name": "train",
        "queue": "nlp",
        "gpus": 2,
        "workers": 1,
        "command": ["python", "train.py"],
        "env": {"SEED": "1"},
        "priority": 0,
        "preemptible": True,
    }
    jobs = [
        {
            "id": i,
            "name": f"job-{i}",
            "owner": "ana" if i % 2 else "bo",
            "queue": "nlp",
            "pool": "local",
            "state": state,
            "spec": {**spec, "name": f"job-{i}"},
            "gpus": 2,
            "priority": i,
            "idempotency_key": f"key-{i}",
            "submitted_at": now + i,
            "started_at": now + i + 1 if state != "pending" else None,
            "ended_at": now + i + 9 if state == "completed" else None,
            "attempt": 0 if state == "pending" else 1,
            "exit_code": 0 if state == "completed" else None,
            "reason": {"rule": "fits", "message": "started", "numbers": {"free": 4}},
            "overtaken_at": None,
        }
        for i, state in enumerate(["pending", "running", "completed", "pending", "running"], start=1)
    ]
    attempts = [
        {
            "job_id": j["id"],
            "attempt": 1,
            "state": "ended" if j["state"] == "completed" else "running",
            "placement": [["localhost", [0, 1]]],
            "gpus": 2,
            "pid": 4000 + j["id"],
            "proc_started": now,
            "admitted_at": now + j["id"],
            "started_at": now + j["id"] + 1,
            "ended_at": j["ended_at"],
            "stop_deadline": None,
            "exit_code": j["exit_code"],
            "outcome": "completed" if j["state"] == "completed" else None,
            "admission": j["id"],
        }
        for j in jobs
        if j["state"] != "pending"
    ]
    events = [
        {
            "id": n,
            "at": now + n,
            "job_id": j["id"],
            "kind": "submitted",
            "message": f"job {j['id']} queued",
            "data": {"queue": "nlp"},
        }
        for n, j in enumerate(jobs, start=1)
    ]
    tokens = [
        {
            "id": 1,
            "digest": "a" * 64,
            "user": "admin",
            "role": "platform-admin",
            "scope": None,
            "created_at": now,
            "created_by": "corral",
            "revoked": False,
            "expires_at": None,
        },
        {
            "id": 2,
            "digest": "b" * 64,
            "user": "ana",
            "role": "member",
            "scope": "nlp",
            "created_at": now,
            "created_by": "admin",
            "revoked": False,
            "expires_at": now + 86400,
        },
        {
            "id": 3,
            "digest": "c" * 64,
            "user": "bo",
            "role": "team-admin",
            "scope": "research",
            "created_at": now,
            "created_by": "admin",
            "revoked": True,
            "expires_at": now + 3600,
        },
    ]
    queues = [{"version": 1, "author": "admin", "created_at": now, "comment": "first tree", "document": TREE}]
    audit = [
        {"id": 1, "at": now, "actor": "admin", "action": "queues.apply", "target": "queues", "detail": {"version": 1}}
    ]
    return {
        "queue_versions": queues,
        "jobs": jobs,
        "attempts": attempts,
        "events": events,
        "tokens": tokens,
        "audit": audit,
    }


def database_at(url: str, revision: str, now: float = 1_700_000_000.0) -> dict[str, list[dict[str, Any]]]:
    """Migrate the empty database at `url` to `revision` and fill it with jobs, attempts, events, a queue tree,
    tokens and audit rows, using only the columns that revision has. Returns what it wrote, per table."""
    upgrade(url, revision)
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine)
    written: dict[str, list[dict[str, Any]]] = {}
    try:
        with engine.begin() as conn:
            for name, rows in _rows(now).items():
                table = meta.tables[name]
                rows = [{k: v for k, v in row.items() if k in table.c} for row in rows]
                conn.execute(table.insert(), rows)
                written[name] = rows
            if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them
                for name in ("jobs", "events", "tokens", "audit", "queue_versions"):
                    key = "version" if name == "queue_versions" else "id"
                    conn.execute(
                        sa.text(
                            f"SELECT setval(pg_get_serial_sequence('{name}', '{key}'), (SELECT max({key}) FROM {name}))"
                        )
                    )
    finally:
        engine.dispose()
    return written


def lost(url: str, written: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What of `written` the database at `url` no longer holds as written (empty: nothing lost)."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine)
    problems = []
    try:
        with engine.connect() as conn:
            for name, rows in written.items():
                table = meta.tables[name]
                have = [dict(r) for r in conn.execute(sa.select(table)).mappings()]
                for row in rows:
                    if not any(all(h.get(k) == v for k, v in row.items()) for h in have):
                        problems.append(f"{name}: {row} is gone or changed")
                if len(have) != len(rows):
                    problems.append(f"{name}: {len(rows)} rows written, {len(have)} now")
    finally:
        engine.dispose()
    return problems
