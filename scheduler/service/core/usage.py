"""GPU-hours per queue and per user over a time range, GPU-hours nobody held, and the range as a simulator trace."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from scheduler.engine.model import Settings
from scheduler.service.store.db import attempts, events, jobs, nodes, queue_versions
from scheduler.sim.recorded import Attempt, Node, RecordedJob, cluster_document, demand, subtree, trace


def usage(conn: Connection, since: float, until: float, visible: set[str] | None, now: float) -> dict[str, Any]:
    """GPU-hours held by processes (launch to exit) inside [since, until]; `visible` limits the queues shown.

    Idle GPU-hours are the pool's capacity over the range minus what any job held, counted over all queues
    (a team sees how idle the pool was, not who else used it).
    """
    until = min(until, now)
    span = max(0.0, until - since)
    q = (
        sa.select(jobs.c.queue, jobs.c.owner, jobs.c.pool, attempts.c.gpus, attempts.c.started_at, attempts.c.ended_at)
        .join(jobs, jobs.c.id == attempts.c.job_id)
        .where(
            attempts.c.started_at.is_not(None),
            attempts.c.started_at < until,
            sa.or_(attempts.c.ended_at.is_(None), attempts.c.ended_at > since),
        )
    )
    by_queue: dict[str, float] = defaultdict(float)
    by_user: dict[str, float] = defaultdict(float)
    held: dict[str, float] = defaultdict(float)
    for r in conn.execute(q).mappings():
        end = r["ended_at"] if r["ended_at"] is not None else now
        hours = r["gpus"] * max(0.0, min(end, until) - max(r["started_at"], since)) / 3600
        held[r["pool"]] += hours
        if visible is None or r["queue"] in visible:
            by_queue[r["queue"]] += hours
            by_user[r["owner"]] += hours
    # Capacity counts from the service's first record on: a range reaching back before the service existed
    # (usage --since 1d on a day-old install of an hour) must not report the time before as idle GPUs.
    first = service_began(conn)
    counted = max(0.0, until - max(since, first)) if first is not None else 0.0
    capacity: dict[str, float] = defaultdict(float)
    for n in conn.execute(sa.select(nodes.c.pool, nodes.c.gpus)).mappings():
        capacity[n["pool"]] += n["gpus"] * min(span, counted) / 3600
    return {
        "since": since,
        "until": until,
        "queues": [{"queue": k, "gpu_hours": round(v, 6)} for k, v in sorted(by_queue.items())],
        "users": [{"user": k, "gpu_hours": round(v, 6)} for k, v in sorted(by_user.items())],
        "pools": [
            {
                "pool": p,
                "capacity_gpu_hours": round(c, 6),
                "held_gpu_hours": round(held[p], 6),
                "idle_gpu_hours": round(max(0.0, c - held[p]), 6),
            }
            for p, c in sorted(capacity.items())
        ],
    }


def service_began(conn: Connection) -> float | None:
    """When the service's first record was written (its first queue tree, job or event); None: nothing yet."""
    firsts = [
        conn.execute(sa.select(sa.func.min(c))).scalar()
        for c in (queue_versions.c.created_at, jobs.c.submitted_at, events.c.at)
    ]
    found = [float(t) for t in firsts if t is not None]
    return min(found) if found else None


def recorded_jobs(conn: Connection, since: float, until: float, visible: set[str] | None) -> list[RecordedJob]:
    """Every job alive in [since, until] (submitted before `until`, not ended before `since`), with its launched
    attempts; `visible` limits the queues."""
    q = (
        sa.select(jobs)
        .where(jobs.c.submitted_at <= until, sa.or_(jobs.c.ended_at.is_(None), jobs.c.ended_at >= since))
        .order_by(jobs.c.id)
    )
    rows = [r for r in conn.execute(q).mappings() if visible is None or r["queue"] in visible]
    launched: dict[int, list[Attempt]] = defaultdict(list)
    ids = [r["id"] for r in rows]
    for i in range(0, len(ids), 500):  # bounded IN lists: databases cap the number of bound parameters
        aq = (
            sa.select(attempts.c.job_id, attempts.c.started_at, attempts.c.ended_at)
            .where(attempts.c.job_id.in_(ids[i : i + 500]), attempts.c.started_at.is_not(None))
            .order_by(attempts.c.job_id, attempts.c.attempt)
        )
        for a in conn.execute(aq).mappings():
            launched[a["job_id"]].append(Attempt(a["started_at"], a["ended_at"]))
    return [
        RecordedJob(
            id=r["id"],
            queue=r["queue"],
            pool=r["pool"],
            state=r["state"],
            submitted=r["submitted_at"],
            first_start=r["started_at"],
            ended=r["ended_at"],
            workers=int(r["spec"].get("workers", 1)),
            gpus=r["spec"].get("gpus", 1),  # a share of a GPU stays one (0.25)
            priority=r["priority"],
            preemptible=bool(r["spec"].get("preemptible", True)),
            checkpoint=bool(r["spec"].get("checkpoint", False)),
            attempts=tuple(launched[r["id"]]),
        )
        for r in rows
    ]


def export_trace(
    conn: Connection,
    since: float,
    until: float,
    visible: set[str] | None,
    now: float,
    queue_document: dict[str, Any],
    settings: Settings,
) -> dict[str, Any]:
    """The range as simulator inputs: the trace CSV of the jobs submitted in it, the cluster file (pools from the
    nodes table, the queue tree in force; a scoped caller gets its subtree as a tree of its own), and the demand
    each leaf queue put on each pool (for `corral queue recommend`)."""
    until = min(until, now)
    recorded = recorded_jobs(conn, since, until, visible)
    found = trace(recorded, since, until, now)
    queues = queue_document["queues"] if visible is None else subtree(queue_document["queues"], visible)
    node_rows = conn.execute(sa.select(nodes.c.name, nodes.c.pool, nodes.c.gpus)).mappings()
    cluster, warnings = cluster_document(
        [Node(n["name"], n["pool"], n["gpus"]) for n in node_rows],
        queues,
        settings.min_runtime,
        settings.starvation_timeout,
    )
    known = {q["name"] for q in queues}
    gone = sorted({j.queue for j in found.jobs} - known)
    if gone:
        warnings.append(f"jobs of queues no longer in the tree ({', '.join(gone)}) are rejected in a replay")
    return {
        "format": "trace",
        "since": since,
        "until": until,
        "jobs": len(found.jobs),
        "skipped": found.skipped,
        "trace": found.csv(),
        "cluster": cluster,
        "warnings": warnings,
        "demand": [d.as_dict() for d in demand(recorded, since, until, now)],
    }
