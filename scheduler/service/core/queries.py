"""The reads the API's routes answer from (jobs, sandboxes, pools, audit, models): never the tables or the store."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from quotas import QueueTree
from scheduler.service.api.auth import Principal
from scheduler.service.core.loop import Core
from scheduler.service.store import rows as store
from scheduler.service.store.db import approvals, attempts, audit, events, jobs, models, promotions, queue_versions


def job_page(
    core: Core,
    who: Principal,
    visible: Collection[str],
    queue: str | None,
    state: list[str] | None,
    owner: str | None,
    before: int | None,
    limit: int,
    labels: dict[str, str],
) -> list[dict[str, Any]]:
    """Jobs `who` may see (`visible`: its queues), newest first, as the API shows them; `before` (an id) pages back."""
    q = sa.select(jobs).order_by(jobs.c.id.desc())
    if queue:
        q = q.where(jobs.c.queue == queue)
    if state:
        q = q.where(jobs.c.state.in_(state))
    if owner:
        q = q.where(jobs.c.owner == owner)
    if before is not None:
        q = q.where(jobs.c.id < before)
    q = q.limit(limit if not labels else 100 * limit)
    # A scoped caller sees its queues' jobs and its own: two newest-first queries, merged. One query with OR made
    # SQLite sort every matching row before the limit (its index on queue then owner cannot give id order).
    parts = (
        [q]
        if who.admin or who.scope is None
        else [q.where(jobs.c.queue.in_(visible)), q.where(jobs.c.owner == who.user)]
    )
    out: list[dict[str, Any]] = []
    with core.db.connect() as conn:
        rows = {r["id"]: r for part in parts for r in conn.execute(part).mappings()}
        # Labels live in the JSON spec; they are filtered here so the query stays portable across databases.
        for row in sorted(rows.values(), key=lambda r: -r["id"]):
            view = store.job_view(row)
            if all(view["labels"].get(k) == v for k, v in labels.items()):
                out.append(view)
            if len(out) == limit:
                break
    return out


def readable_job(core: Core, who: Principal, job_id: int) -> dict[str, Any]:
    """The job as the API shows it, if `who` may see it (else NotFound, as for a missing one)."""
    with core.db.connect() as conn:
        return store.job_view(core.readable(conn, who, job_id))


def attempts_of(conn: Connection, job_id: int) -> list[dict[str, Any]]:
    """The job's attempts, first to last."""
    return [
        dict(a)
        for a in conn.execute(
            sa.select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.attempt)
        ).mappings()
    ]


def events_of(conn: Connection, job_id: int, kind: str | None = None) -> list[dict[str, Any]]:
    """The job's events (of one kind, if given), oldest first."""
    q = sa.select(events).where(events.c.job_id == job_id)
    if kind is not None:
        q = q.where(events.c.kind == kind)
    return [dict(r) for r in conn.execute(q.order_by(events.c.id)).mappings()]


def attempt_state(core: Core, job_id: int, attempt: int) -> str | None:
    """The state of the job's attempt (None: no such attempt)."""
    with core.db.connect() as conn:
        row = store.current_attempt(conn, job_id, attempt)
    return None if row is None else str(row["state"])


def open_sandboxes(conn: Connection, who: Principal, tree: QueueTree) -> list[dict[str, Any]]:
    """Sandboxes admitted or running that `who` may see, as the API shows them, oldest first."""
    rows = (
        conn.execute(sa.select(jobs).where(jobs.c.state.in_(("starting", "running"))).order_by(jobs.c.id))
        .mappings()
        .all()
    )
    return [
        store.job_view(r)
        for r in rows
        if r["spec"].get("kind") == "sandbox" and who.may_read_job(tree, r["queue"], r["owner"])
    ]


def unreadable_jobs(conn: Connection, who: Principal, tree: QueueTree, ids: Collection[int]) -> set[int]:
    """Of these job ids, those `who` may not read (gone ones too)."""
    hidden: set[int] = set()
    for job_id in ids:
        job = store.job_row(conn, job_id)
        if job is None or not who.may_read_job(tree, job["queue"], job["owner"]):
            hidden.add(job_id)
    return hidden


def set_up_at(conn: Connection) -> float:
    """When Corral was set up: the time of the first queue tree."""
    at: float = conn.execute(sa.select(sa.func.min(queue_versions.c.created_at))).scalar_one()
    return at


def audit_entries(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The audit log, newest first."""
    return [dict(r) for r in conn.execute(sa.select(audit).order_by(audit.c.id.desc()).limit(limit)).mappings()]


def model_rows(conn: Connection, who: Principal, tree: QueueTree) -> list[dict[str, Any]]:
    """The models whose queue `who` may see, by name."""
    rows = conn.execute(sa.select(models).order_by(models.c.name)).mappings().all()
    return [dict(r) for r in rows if who.covers(tree, r["queue"])]


def promotion_rows(
    conn: Connection, who: Principal, tree: QueueTree, model: str | None, state: str | None
) -> list[dict[str, Any]]:
    """Promotion requests of the models `who` may see (of one model, in one state, if given), newest first."""
    q = sa.select(promotions).order_by(promotions.c.id.desc())
    if model is not None:
        q = q.where(promotions.c.model == model)
    if state is not None:
        q = q.where(promotions.c.state == state)
    visible = {r["name"] for r in conn.execute(sa.select(models)).mappings() if who.covers(tree, r["queue"])}
    return [dict(r) for r in conn.execute(q).mappings() if r["model"] in visible]


def promotion_row(conn: Connection, promotion_id: int) -> dict[str, Any] | None:
    p = conn.execute(sa.select(promotions).where(promotions.c.id == promotion_id)).mappings().first()
    return None if p is None else dict(p)


def approvals_of(conn: Connection, promotion_id: int) -> list[dict[str, Any]]:
    return [
        dict(a) for a in conn.execute(sa.select(approvals).where(approvals.c.promotion_id == promotion_id)).mappings()
    ]
