"""Schedule metrics from a replay's event log: waits, JCT, makespan, utilisation, Jain's index, per queue."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.sim.inputs import SimJob

# Events after which a job holds no GPUs (it may start again after `preempted`).
RELEASES = ("preempted", "completed", "failed", "cancelled")


def percentile(xs: Sequence[float], p: float) -> float:
    """The p-th percentile as /work/shared/tools/check_trace.py takes it: sorted[int(p/100 * n)], 0 if empty."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(p / 100 * len(s)))])


def jain(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal; 1 as well when empty or all zero."""
    xs = list(values)
    sq = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * sq) if xs and sq > 0 else 1.0


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


@dataclass
class Stats:
    """Metrics of a set of jobs (the whole trace, or one queue). Times in seconds."""

    jobs: int = 0
    started: int = 0
    completed: int = 0
    rejected: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0  # still pending or running when the log ends: a replay that did not drain
    preemptions: int = 0
    mean_wait: float = 0.0
    p50_wait: float = 0.0
    p95_wait: float = 0.0
    p99_wait: float = 0.0
    mean_jct: float = 0.0
    p50_jct: float = 0.0
    p95_jct: float = 0.0
    p99_jct: float = 0.0
    makespan: float = 0.0  # last completion - first submit
    gpu_seconds: float = 0.0  # GPU-seconds held by running jobs (work lost to preemption included)
    utilisation: float = 0.0  # gpu_seconds / (capacity x span): for a queue, its part of the cluster's use
    waits: list[float] = field(default_factory=list, repr=False)  # per started job, for CDFs


@dataclass
class Metrics:
    """A replay's metrics, overall and per leaf queue that had jobs."""

    policy: str
    capacity: int
    span: float  # time of the last event: the clock starts at 0, as in check_trace.py
    overall: Stats
    queues: dict[str, Stats]
    useful_utilisation: float  # GPU-seconds of completed jobs' durations / (capacity x makespan)
    jain_queue_mean_wait: float  # over the queues' mean waits, among queues with a started job


@dataclass
class _Job:
    queue: str
    submit: float
    work: float  # GPU-seconds of one whole run: workers x gpus x duration
    first_start: float | None = None
    end: float | None = None
    state: str = "pending"
    preemptions: int = 0


def _stats(jobs: list[_Job], gpu_seconds: float, capacity: int, span: float) -> Stats:
    waits = [j.first_start - j.submit for j in jobs if j.first_start is not None]
    jcts = [j.end - j.submit for j in jobs if j.end is not None]
    ends = [j.end for j in jobs if j.end is not None]
    count = defaultdict(int, {s: 0 for s in ("completed", "rejected", "failed", "cancelled")})
    for j in jobs:
        count[j.state] += 1
    return Stats(
        jobs=len(jobs),
        started=len(waits),
        completed=count["completed"],
        rejected=count["rejected"],
        failed=count["failed"],
        cancelled=count["cancelled"],
        unfinished=count["pending"] + count["running"],
        preemptions=sum(j.preemptions for j in jobs),
        mean_wait=_mean(waits),
        p50_wait=percentile(waits, 50),
        p95_wait=percentile(waits, 95),
        p99_wait=percentile(waits, 99),
        mean_jct=_mean(jcts),
        p50_jct=percentile(jcts, 50),
        p95_jct=percentile(jcts, 95),
        p99_jct=percentile(jcts, 99),
        makespan=(max(ends) - min(j.submit for j in jobs)) if ends else 0.0,
        gpu_seconds=gpu_seconds,
        utilisation=gpu_seconds / (capacity * span) if capacity and span else 0.0,
        waits=waits,
    )


def _gpus(e: Mapping[str, Any]) -> float:
    """GPUs a `started` event takes: the GPUs it lists, or, for a job sharing a GPU (a fraction or a MIG slice),
    its `fraction`."""
    part = e.get("fraction")
    if part is not None:
        return float(part)
    nodes: Mapping[str, Sequence[int]] = e.get("nodes") or {}
    return sum(len(g) for g in nodes.values())


def compute(jobs: Sequence[SimJob], log: Mapping[str, Any], capacity: int) -> Metrics:
    """Metrics of one replay: `jobs` as replayed, `log` as Simulation.run() returns it, `capacity` in GPUs.

    Wait is first start - submit (a preempted job's restarts do not count again); JCT is completion - submit,
    over completed jobs only. Events of jobs not in `jobs` are ignored.
    """
    js = {j.spec.id: _Job(j.spec.queue, j.submit, j.spec.request * j.duration) for j in jobs}
    holding: dict[str, float] = {}
    busy: dict[str, float] = defaultdict(float)  # queue -> GPUs held now
    since: dict[str, float] = defaultdict(float)  # queue -> time its busy count last changed
    area: dict[str, float] = defaultdict(float)  # queue -> GPU-seconds so far
    last_t = 0.0
    # check_trace.py sorts by time; the sort is stable, so order within an instant is the engine's.
    for e in sorted(log["events"], key=lambda e: e["t"]):
        t, kind, job = float(e["t"]), e["event"], js.get(e["job"])
        last_t = t
        if job is None:
            continue
        q = job.queue
        if kind == "started":
            area[q] += busy[q] * (t - since[q])
            since[q] = t
            holding[e["job"]] = _gpus(e)
            busy[q] += holding[e["job"]]
            if job.first_start is None:
                job.first_start = t
            job.state = "running"
        elif kind in RELEASES:
            area[q] += busy[q] * (t - since[q])
            since[q] = t
            busy[q] -= holding.pop(e["job"], 0.0)
            job.state = "pending" if kind == "preempted" else kind
            job.preemptions += kind == "preempted"
            if kind == "completed":
                job.end = t
        elif kind == "rejected":
            job.state = "rejected"
    for q in busy:
        area[q] += busy[q] * (last_t - since[q])  # jobs still running when the log ends
    by_queue: dict[str, list[_Job]] = defaultdict(list)
    for j in js.values():
        by_queue[j.queue].append(j)
    queues = {q: _stats(v, area[q], capacity, last_t) for q, v in sorted(by_queue.items())}
    overall = _stats(list(js.values()), sum(area.values()), capacity, last_t)
    work = sum(j.work for j in js.values() if j.end is not None)
    return Metrics(
        policy=str(log.get("policy", "")),
        capacity=capacity,
        span=last_t,
        overall=overall,
        queues=queues,
        useful_utilisation=work / (capacity * overall.makespan) if capacity and overall.makespan else 0.0,
        jain_queue_mean_wait=jain(s.mean_wait for s in queues.values() if s.started),
    )


def usage_series(
    jobs: Sequence[SimJob], log: Mapping[str, Any], bins: int = 500, end: float | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """Mean GPUs in use per queue in each of `bins` equal time bins over [0, end]: (bin starts, per queue).

    Bin means rather than samples, so that a burst shorter than a bin still shows in proportion to its area.
    """
    queue_of = {j.spec.id: j.spec.queue for j in jobs}
    events = sorted(log["events"], key=lambda e: e["t"])
    horizon = end if end is not None else (float(events[-1]["t"]) if events else 0.0)
    width = horizon / bins if horizon > 0 else 1.0
    out: dict[str, list[float]] = {q: [0.0] * bins for q in sorted(set(queue_of.values()))}
    busy: dict[str, float] = defaultdict(float)
    since: dict[str, float] = defaultdict(float)
    holding: dict[str, float] = {}

    def spread(q: str, a: float, b: float, level: float) -> None:
        """Add `level` GPUs held over [a, b) to the bins it overlaps, as a mean over each bin."""
        if level == 0 or b <= a:
            return
        k = min(bins - 1, int(a / width))
        while k < bins and a < b:
            edge = (k + 1) * width if k < bins - 1 else max(b, horizon)
            stop = min(b, edge)
            out[q][k] += level * (stop - a) / width
            a, k = stop, k + 1

    for e in events:
        q = queue_of.get(e["job"])
        if q is None or not (e["event"] == "started" or e["event"] in RELEASES):
            continue
        t = float(e["t"])
        spread(q, since[q], t, busy[q])
        since[q] = t
        if e["event"] == "started":
            holding[e["job"]] = _gpus(e)
            busy[q] += holding[e["job"]]
        else:
            busy[q] -= holding.pop(e["job"], 0)
    for q in busy:
        spread(q, since[q], horizon, busy[q])
    return [k * width for k in range(bins)], out
