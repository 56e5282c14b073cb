"""Recorded service history as simulator inputs (SIMULATOR.md's trace CSV and cluster file) and demand per queue."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scheduler.sim.importers import TraceJob
from scheduler.sim.inputs import TRACE_COLUMNS
from scheduler.sim.metrics import percentile

# Job states in which a job never asked for GPUs that could be given: it cannot have waited for them.
NEVER_RUNNABLE = ("rejected",)


@dataclass(frozen=True)
class Attempt:
    """One launch of a job: when its process held its GPUs (`ended` None: it still does)."""

    started: float
    ended: float | None = None


@dataclass(frozen=True)
class RecordedJob:
    """A job as the service recorded it (times in epoch seconds)."""

    id: int
    queue: str
    pool: str
    state: str
    submitted: float
    first_start: float | None = None  # first admission: its wait ended here
    ended: float | None = None
    workers: int = 1
    gpus: float = 1  # per worker: whole GPUs as ints, a share of one GPU (GPU sharing) as a float below 1
    priority: int = 0
    preemptible: bool = True
    checkpoint: bool = False
    attempts: tuple[Attempt, ...] = ()  # launched attempts, oldest first

    @property
    def request(self) -> float:
        return self.workers * self.gpus

    def runtime(self, now: float) -> float | None:
        """Seconds of work the job did: its last attempt (a restart begins again), or every attempt's time for a
        job that checkpoints; a running attempt counts up to `now`. None when it never ran."""
        spans = [max(0.0, (a.ended if a.ended is not None else now) - a.started) for a in self.attempts]
        if not spans:
            return None
        return sum(spans) if self.checkpoint else spans[-1]


@dataclass(frozen=True)
class Node:
    name: str
    pool: str
    gpus: int


@dataclass
class Trace:
    """The trace of a range: jobs in submit order (submit times from the range's start), and what was left out."""

    jobs: list[TraceJob]
    skipped: dict[str, int] = field(default_factory=dict)  # why -> how many jobs

    def csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(TRACE_COLUMNS)
        for j in self.jobs:
            w.writerow(j.cells())
        return out.getvalue()


def trace(jobs: Iterable[RecordedJob], since: float, until: float, now: float) -> Trace:
    """Jobs submitted in [since, until] that ran, as trace rows with their recorded runtime.

    A job still running counts its runtime up to `now` (a lower bound). Jobs that never ran (still pending,
    cancelled or rejected before a start) are left out, counted in `skipped`: the trace cannot say how long they
    would have run.
    """
    out = Trace([])
    for j in sorted(jobs, key=lambda j: (j.submitted, j.id)):
        if not since <= j.submitted <= until:
            continue
        duration = j.runtime(now)
        if duration is None:
            why = "still pending" if j.state == "pending" else f"{j.state} before it ran"
            out.skipped[why] = out.skipped.get(why, 0) + 1
            continue
        out.jobs.append(
            TraceJob(
                id=str(j.id),
                submit=round(j.submitted - since, 3),
                duration=round(duration, 3),
                queue=j.queue,
                pool=j.pool,
                workers=j.workers,
                gpus=j.gpus,
                priority=j.priority,
                preemptible=j.preemptible,
            )
        )
    return out


def cluster_document(
    nodes: Iterable[Node], queues: Sequence[Mapping[str, Any]], min_runtime: float, starvation_timeout: float
) -> tuple[dict[str, Any], list[str]]:
    """The cluster file (pools of nodes, the queue tree, engine settings) and warnings where it is not exact.

    A simulator pool has nodes of one size. A pool whose nodes differ is written with its largest node size and
    as many nodes as hold its GPUs, rounded up (every worker that fits today still fits); a warning says so.
    """
    by_pool: dict[str, list[int]] = defaultdict(list)
    for n in nodes:
        by_pool[n.pool].append(n.gpus)
    pools: list[dict[str, Any]] = []
    warnings: list[str] = []
    for pool, sizes in sorted(by_pool.items()):
        size = max(sizes)
        count = len(sizes) if len(set(sizes)) == 1 else math.ceil(sum(sizes) / size) if size else len(sizes)
        if len(set(sizes)) > 1:
            warnings.append(
                f"pool {pool}: nodes of {sorted(set(sizes))} GPUs written as {count} nodes of {size} "
                f"({count * size} GPUs instead of {sum(sizes)})"
            )
        pools.append({"name": pool, "nodes": count, "gpus_per_node": size})
    doc = {
        "cluster": {"pools": pools},
        "queues": [dict(q) for q in queues],
        "settings": {"min_runtime": min_runtime, "starvation_timeout": starvation_timeout},
    }
    return doc, warnings


def subtree(queues: Sequence[Mapping[str, Any]], visible: set[str]) -> list[dict[str, Any]]:
    """The queues a scoped caller may see, as a tree of its own: a queue whose parent is hidden becomes a root."""
    out = []
    for q in queues:
        if q["name"] in visible:
            out.append({k: v for k, v in q.items() if k != "parent" or v in visible})
    return out


@dataclass(frozen=True)
class Demand:
    """What one leaf queue asked of one pool over a range, from the records."""

    queue: str
    pool: str
    used_gpu_hours: float  # GPUs held by its processes, launch to exit, inside the range
    waiting_gpu_hours: float  # GPUs its jobs asked for while waiting (submit to first start), inside the range
    jobs: int  # submitted in the range
    started: int  # of those, admitted at least once
    mean_wait_s: float  # over started jobs: first start - submit
    p95_wait_s: float
    largest_nonpreemptible: int  # GPUs of its largest non-preemptible job: its quota may not go below this

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def demand(jobs: Iterable[RecordedJob], since: float, until: float, now: float) -> list[Demand]:
    """Per (queue, pool) with any activity in [since, until]: usage, waiting demand and waits.

    `jobs` should hold every job alive in the range (submitted before `until`, not ended before `since`): a job
    submitted earlier still used GPUs or waited inside it.
    """
    until = min(until, now)
    used: dict[tuple[str, str], float] = defaultdict(float)
    waiting: dict[tuple[str, str], float] = defaultdict(float)
    waits: dict[tuple[str, str], list[float]] = defaultdict(list)
    count: dict[tuple[str, str], int] = defaultdict(int)
    largest: dict[tuple[str, str], int] = defaultdict(int)

    def inside(a: float, b: float) -> float:
        return max(0.0, min(b, until) - max(a, since))

    for j in jobs:
        key = (j.queue, j.pool)
        for a in j.attempts:
            used[key] += j.request * inside(a.started, a.ended if a.ended is not None else now) / 3600
        if j.state not in NEVER_RUNNABLE:
            wait_end = j.first_start if j.first_start is not None else (j.ended if j.ended is not None else now)
            waiting[key] += j.request * inside(j.submitted, wait_end) / 3600
        if since <= j.submitted <= until:
            count[key] += 1
            if j.first_start is not None:
                waits[key].append(j.first_start - j.submitted)
        if not j.preemptible and j.state not in NEVER_RUNNABLE:
            largest[key] = max(largest[key], math.ceil(j.request))  # quotas are whole GPUs: a share needs one
    keys = sorted(set(used) | set(waiting) | set(count))
    return [
        Demand(
            queue=q,
            pool=p,
            used_gpu_hours=round(used[q, p], 6),
            waiting_gpu_hours=round(waiting[q, p], 6),
            jobs=count[q, p],
            started=len(waits[q, p]),
            mean_wait_s=round(sum(waits[q, p]) / len(waits[q, p]), 3) if waits[q, p] else 0.0,
            p95_wait_s=round(percentile(waits[q, p], 95), 3),
            largest_nonpreemptible=largest[q, p],
        )
        for q, p in keys
    ]
