"""GPU-hours per queue and per user over a time range, and GPU-hours nobody held (idle capacity)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from scheduler.service.db import attempts, jobs, nodes


def usage(conn: Connection, since: float, until: float, visible: set[str] | None, now: float) -> dict[str, Any]:
    """GPU-hours held by processes (launch to exit) inside [since, until]; `visible` limits the queues shown.

    Idle GPU-hours are the pool's capacity over the range minus what any job held, counted over all queues
    (a team sees how idle the pool was, not who else used it).
    """
    until = min(until, now)
    span = max(0.0, until - since)
    q = (sa.select(jobs.c.queue, jobs.c.owner, jobs.c.pool, attempts.c.gpus, attempts.c.started_at,
                   attempts.c.ended_at)
         .join(jobs, jobs.c.id == attempts.c.job_id)
         .where(attempts.c.started_at.is_not(None), attempts.c.started_at < until,
                sa.or_(attempts.c.ended_at.is_(None), attempts.c.ended_at > since)))
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
    capacity: dict[str, float] = defaultdict(float)
    for n in conn.execute(sa.select(nodes.c.pool, nodes.c.gpus)).mappings():
        capacity[n["pool"]] += n["gpus"] * span / 3600
    return {
        "since": since, "until": until,
        "queues": [{"queue": k, "gpu_hours": round(v, 6)} for k, v in sorted(by_queue.items())],
        "users": [{"user": k, "gpu_hours": round(v, 6)} for k, v in sorted(by_user.items())],
        "pools": [{"pool": p, "capacity_gpu_hours": round(c, 6), "held_gpu_hours": round(held[p], 6),
                   "idle_gpu_hours": round(max(0.0, c - held[p]), 6)} for p, c in sorted(capacity.items())],
    }
