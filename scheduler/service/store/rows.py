"""Small reads and writes shared by the service's parts; every write takes the caller's open transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, Unpack

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from scheduler.engine.model import Reason
from scheduler.service.core.states import AttemptOutcome, AttemptState, JobState
from scheduler.service.store.db import attempts, audit, events, jobs


class JobChange(TypedDict, total=False):
    """The columns of the jobs table the service changes after a job is written (intake writes the rest)."""

    state: JobState
    attempt: int  # the latest attempt; 0: never started
    reason: dict[str, Any] | None  # the engine's last Reason as reason_json gives it (rule, message, numbers)
    started_at: float | None  # the first start: the wait ends here
    ended_at: float | None
    exit_code: int | None
    overtaken_at: float | None  # when a younger job first overtook it (starvation guard)


class AttemptChange(TypedDict, total=False):
    """The columns of the attempts table the service changes after an admission wrote the row."""

    state: AttemptState
    outcome: AttemptOutcome | None
    pid: int | None
    proc_started: float | None
    started_at: float | None  # its process launched: GPUs held from here
    ended_at: float | None
    stop_deadline: float | None
    exit_code: int | None


def reason_json(r: Reason | None) -> dict[str, Any] | None:
    return None if r is None else {"rule": r.rule, "message": r.message, "numbers": dict(r.numbers)}


def add_event(conn: Connection, at: float, kind: str, message: str, job_id: int | None = None, **data: Any) -> None:
    conn.execute(events.insert().values(at=at, job_id=job_id, kind=kind, message=message, data=data))


def add_audit(conn: Connection, at: float, actor: str, action: str, target: str, **detail: Any) -> None:
    conn.execute(audit.insert().values(at=at, actor=actor, action=action, target=target, detail=detail))


def job_row(conn: Connection, job_id: int) -> RowMapping | None:
    return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()


def current_attempt(conn: Connection, job_id: int, attempt: int) -> RowMapping | None:
    q = sa.select(attempts).where(attempts.c.job_id == job_id, attempts.c.attempt == attempt)
    return conn.execute(q).mappings().first()


def update_job(conn: Connection, job_id: int, **values: Unpack[JobChange]) -> None:
    conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))


def update_attempt(conn: Connection, job_id: int, attempt: int, **values: Unpack[AttemptChange]) -> None:
    conn.execute(attempts.update().where(attempts.c.job_id == job_id, attempts.c.attempt == attempt).values(**values))


def job_view(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A job as the API shows it."""
    spec = row["spec"]
    return {
        "id": row["id"],
        "name": row["name"],
        "owner": row["owner"],
        "queue": row["queue"],
        "pool": row["pool"],
        "state": row["state"],
        "gpus": row["gpus"],
        "workers": spec.get("workers", 1),
        "priority": row["priority"],
        "preemptible": spec.get("preemptible", True),
        "submitted_at": row["submitted_at"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "attempt": row["attempt"],
        "exit_code": row["exit_code"],
        "reason": row["reason"],
        "labels": spec.get("labels", {}),
        "idempotency_key": row["idempotency_key"],
        "kind": spec.get("kind", "job"),
        "spec": {**spec, "env": redacted(spec.get("env", {}))},
    }


SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def redacted(env: Mapping[str, str]) -> dict[str, str]:
    """A job's environment as the API shows it: values of variables named like secrets are hidden (a sandbox
    carries its hub API token)."""
    return {k: "***" if any(w in k.upper() for w in SECRET_WORDS) else v for k, v in env.items()}
