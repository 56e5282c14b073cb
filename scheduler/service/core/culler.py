"""Idle-GPU culling in the service: sample the GPUs of running sandboxes, warn, then close idle ones."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from sandbox.culling import IdleTracker, Stop, Warn, clock_text, duration_text, warning_text
from scheduler.backends.base import ReportsPids
from scheduler.service.api.auth import Principal, Role
from scheduler.service.api.errors import ServiceError
from scheduler.service.core.interfaces import Culls
from scheduler.service.core.states import AttemptState, JobState
from scheduler.service.store import rows as store
from scheduler.service.store.db import attempts, jobs

log = logging.getLogger("corral.culler")
IDLE_TIMEOUT_LABEL = "corral.sandbox/idle-timeout-s"  # per-profile timeout, kept with the job
CULLER = Principal("corral-culler", Role.PLATFORM_ADMIN)


def cull(core: Culls, tracker: IdleTracker, now: float) -> None:
    """One look at every running sandbox's GPUs (called by the scheduling loop every cull_interval_s)."""
    readers = {n.name: n.sample for n in core.cluster.nodes.values() if n.sample is not None}
    if not readers:
        return  # declared or remote GPUs: nothing to measure from here
    samples = {name: read() or {} for name, read in readers.items()}
    with core.db.connect() as conn:
        rows = (
            conn.execute(
                sa.select(jobs.c.id, jobs.c.spec, attempts.c.attempt, attempts.c.placement)
                .join(attempts, sa.and_(attempts.c.job_id == jobs.c.id, attempts.c.attempt == jobs.c.attempt))
                .where(jobs.c.state == JobState.RUNNING, attempts.c.state == AttemptState.RUNNING)
            )
            .mappings()
            .all()
        )
    running = {str(r["id"]) for r in rows if r["spec"].get("kind") == "sandbox"}
    for sid in set(tracker.watched()) - running:
        tracker.forget(sid)  # closed or ended: start afresh if it ever comes back
    for r in rows:
        sid = str(r["id"])
        if sid not in running:
            continue
        timeout = r["spec"].get("labels", {}).get(IDLE_TIMEOUT_LABEL)
        if timeout is not None:
            tracker.set_policy(sid, tracker.default.for_profile(float(timeout)))
        held = [(node, g) for node, gs in r["placement"] for g in gs]
        if not held or any(node not in samples for node, _ in held):
            continue  # a CPU-only sandbox holds no GPU to free; one on unmeasured GPUs cannot be judged
        # A share of a GPU is judged on the sandbox's own processes (NVML per process): the other tenants' work
        # neither keeps it alive nor hides that it idles. Whole GPUs keep the whole-GPU reading.
        pids = _pids(core, r) if _shared(r["spec"]) else None
        # The tracker keys GPUs by one number: a sandbox's GPUs are numbered in placement order.
        readings = {i: samples[node].get(_nvml_index(core, node, g)) for i, (node, g) in enumerate(held)}
        for action in tracker.observe(sid, now, readings, pids=pids):
            _act(core, tracker, action, now)


def _shared(spec: dict[str, Any]) -> bool:
    gpus = spec.get("gpus", 1)
    return isinstance(gpus, float) and 0 < gpus < 1


def _pids(core: Culls, row: Any) -> set[int] | None:
    """The sandbox's processes, where the executor can say (None: the whole GPU decides, see culling._reading)."""
    if not isinstance(core.executor, ReportsPids):
        return None
    return core.executor.pids(str(row["id"]), int(row["attempt"]))


def _nvml_index(core: Culls, node: str, gpu: int) -> int:
    """NVML's index of engine GPU `gpu` of the node: GPUs in MIG mode are not the engine's (NodeInfo.whole)."""
    info = core.cluster.nodes.get(node)
    whole = info.whole() if info is not None else []
    return whole[gpu].index if gpu < len(whole) else gpu


def _act(core: Culls, tracker: IdleTracker, action: Warn | Stop, now: float) -> None:
    job_id = int(action.sandbox_id)
    if isinstance(action, Warn):
        msg = warning_text(action.idle_since, action.stop_at, now)
        with core.writing() as conn:
            store.add_event(
                conn,
                now,
                "idle_warning",
                msg,
                job_id,
                idle_since=action.idle_since,
                stop_at=action.stop_at,
                idle_gpu_minutes=round(action.idle_gpu_minutes, 3),
            )
        return
    try:
        _close(core, job_id, action, now)
    except ServiceError as e:  # it ended on its own meanwhile: nothing to stop, the others still get looked at
        log.info("idle sandbox %s not closed: %s", job_id, e)
    tracker.forget(action.sandbox_id)


def _close(core: Culls, job_id: int, action: Stop, now: float) -> None:
    core.cancel(
        CULLER,
        job_id,
        reason={
            "rule": "idle",
            "message": f"stopped after its GPUs stayed idle for {duration_text(now - action.idle_since)} "
            f"(since {clock_text(action.idle_since)}): {action.idle_gpu_minutes:.0f} idle GPU-minutes",
            "numbers": {"idle_gpu_minutes": action.idle_gpu_minutes, "idle_since": action.idle_since},
        },
    )


def idle_view(core: Culls, job_id: int, now: float) -> dict[str, object] | None:
    """A running sandbox's idle stretch as the API shows it (None while its GPUs work, or nothing measures them):
    since when, when it will be stopped, the seconds left, and the warning's text once it is warned."""
    status = core.idle.status(str(job_id))
    if status is None:
        return None
    since, stop_at, warned = status
    return {
        "idle_since": since,
        "stop_at": stop_at,
        "seconds_left": max(0.0, stop_at - now),
        "stop_in": duration_text(stop_at - now),
        "stop_at_text": clock_text(stop_at),
        "warning": warning_text(since, stop_at, now) if warned else None,
    }
