"""The engine rebuilt from the database (at start, after a queue change or a capacity change, after a failed commit),
and what each cycle stores so that the rebuilt engine decides exactly as the one it replaces (docs/service.md).

What the engine keeps that decides something later, and where the database keeps it:

- a job's place in submission order (the last tie-break of queue order and of the starvation guard): its id, which
  grows with submissions, given to the engine as `seq` at submission and at every rebuild;
- a pending job's starvation-guard clock (when a younger job first overtook it): jobs.overtaken_at, written in the
  transaction of the cycle that started it, cleared when the job starts;
- the order running jobs were admitted in (victims admitted at one instant are taken back latest first):
  attempts.admission, a number that grows by one per admission, restored in that order;
- the reason a running job started with: jobs.reason, so that `explain` answers as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from quotas import QueueTree
from scheduler.backends.base import CLUSTER_OWNER, Handle
from scheduler.engine import Engine as Scheduler
from scheduler.engine.decisions import Decision
from scheduler.engine.model import JobSpec, Reason
from scheduler.service.api.errors import Invalid
from scheduler.service.core import outside, queues
from scheduler.service.core.interfaces import Rebuilds
from scheduler.service.core.specs import engine_spec_of, job_id_of
from scheduler.service.core.states import HOLDING, LIVE, AttemptOutcome, AttemptState, JobState
from scheduler.service.store import rows as store
from scheduler.service.store.db import attempts, jobs

PLACED = (AttemptState.STARTING, AttemptState.RUNNING)  # attempt states the engine counts as holding their GPUs
UNREADABLE = "invalid_spec"  # the rule a job rejected at the rebuild for a spec the engine cannot take carries
log = logging.getLogger("corral.service")


def recover(core: Rebuilds, now: float) -> None:
    """Match attempts the database says are live with what the executor finds (see docs/service.md)."""
    with core.db.connect() as conn:
        live = list(
            conn.execute(sa.select(attempts).where(attempts.c.state.in_((AttemptState.STARTING, *HOLDING)))).mappings()
        )
    for a in live:
        handle = Handle(str(a["job_id"]), a["attempt"], a["pid"], a["proc_started"] or 0.0)
        ended = core.executor.adopt(handle)
        with core.writing() as conn:
            job = store.job_row(conn, a["job_id"])
            assert job is not None
            if ended is None:  # still running: keep it, and keep stopping it if it was being stopped
                if a["state"] == AttemptState.STARTING:
                    store.update_attempt(conn, job["id"], a["attempt"], state=AttemptState.RUNNING, started_at=now)
                    store.update_job(conn, job["id"], state=JobState.RUNNING)
                store.add_event(conn, now, "adopted", f"attempt {a['attempt']} still runs; taken back", job["id"])
                if a["state"] == AttemptState.STOPPING:
                    grace = max(0.0, (a["stop_deadline"] or now) - now)
                    core.executor.terminate(str(job["id"]), a["attempt"], grace, now)
                continue
            row: Mapping[Any, Any] = a
            if a["state"] == AttemptState.STARTING and ended.code is not None:
                # Launched and finished while its pid was never recorded: it ran, so it must not run again.
                row = {**a, "state": AttemptState.RUNNING}
            elif a["state"] == AttemptState.STARTING:
                # Admitted, never launched (its GPUs were still held by a preempted job's process): the admission
                # was committed, so it stands, as it would have without the restart. The rebuilt engine holds its
                # GPUs; it is launched once no process holds them (launching.launch_ready).
                continue
            known = core.cluster.nodes
            drained = sorted(n for n, _ in a["placement"] or [] if (i := known.get(n)) is not None and i.cordoned)
            # Its pods vanished (no exit code: nothing left to read one from) while their node is cordoned: drained.
            # An attempt that finished on its own left its pods, with their exit code, for Corral to read.
            if (
                row["state"] == AttemptState.RUNNING
                and (ended.drained or (ended.code is None and drained))
                and job["owner"] != CLUSTER_OWNER
                and job["spec"].get("kind") != "sandbox"
            ):
                requeue_drained(conn, job, a, now, f"its node was drained while Corral was down ({', '.join(drained)})")
                continue
            # The engine is built after recovery, from what these updates leave in the database.
            core.end_attempt(
                conn, job, row, ended.code, ended.detail or "ended while Corral was down", now, engine=False
            )


def requeue_drained(conn: Connection, job: RowMapping, a: Mapping[Any, Any], now: float, why: str) -> None:
    """A running attempt whose pods went while its node is cordoned (kubectl drain): the job waits again, keeping its
    place, as the service that never restarted decides (Engine.requeue); the engine learns it at its rebuild."""
    reason = {"rule": "node_drained", "message": why, "numbers": {}}
    store.update_attempt(
        conn, job["id"], a["attempt"], state=AttemptState.ENDED, ended_at=now, outcome=AttemptOutcome.PREEMPTED
    )
    store.update_job(conn, job["id"], state=JobState.PENDING, reason=reason)
    store.add_event(conn, now, "preempted", why, job["id"], cause="node_drained", by=None, reason=reason)


def requeue_unlaunched(conn: Connection, job: RowMapping, a: Mapping[Any, Any], now: float) -> None:
    """An attempt admitted but never running: the job waits again (the engine learns it at its rebuild)."""
    store.update_attempt(
        conn, job["id"], a["attempt"], state=AttemptState.ENDED, ended_at=now, outcome=AttemptOutcome.NEVER_STARTED
    )
    if job["state"] == JobState.STARTING:
        store.update_job(conn, job["id"], state=JobState.PENDING)
    store.add_event(conn, now, "requeued", "admitted but never started", job["id"])


@dataclass(frozen=True)
class Rebuilt:
    """A fresh engine with the tree and version it runs on, the rejections it made (recorded by the next cycle) and
    the last admission number stored."""

    tree: QueueTree
    engine: Scheduler
    version: int
    rejected: list[Decision]
    admissions: int


def rebuild(core: Rebuilds) -> Rebuilt:
    """A fresh engine from the database: running and admitted jobs where they are, in the order they were admitted,
    then pending ones with their starvation-guard clocks."""
    with core.db.connect() as conn:
        row = queues.latest(conn)
        assert row is not None
        tree = applied_tree(row["document"], core.cluster.capacity)
        live = list(conn.execute(sa.select(jobs).where(jobs.c.state.in_(LIVE)).order_by(jobs.c.id)).mappings())
        placed = {
            a["job_id"]: a for a in conn.execute(sa.select(attempts).where(attempts.c.state.in_(PLACED))).mappings()
        }
        admissions = conn.execute(sa.select(sa.func.max(attempts.c.admission))).scalar_one()
    cluster = core.cluster
    engine = Scheduler(tree, [n.spec() for n in cluster.nodes.values()], settings=core.engine_settings)
    for name in cluster.down:  # before restoring: nothing live was left on a down node (cluster_sync)
        engine.node_down(name, core.clock())
    for name, info in cluster.nodes.items():  # its jobs stay (restored below): only new work is kept off
        if info.cordoned and name not in cluster.down:
            engine.node_cordoned(name, core.clock())
    holding = sorted((j for j in live if j["id"] in placed), key=lambda j: admission_key(placed[j["id"]]))
    for j in holding:
        a = placed[j["id"]]
        engine.restore(
            held_spec(j),
            j["submitted_at"],
            a["admitted_at"],
            [(n, list(g)) for n, g in a["placement"]],
            seq=j["id"],
            reason=reason_of(j["reason"]),
        )
    for name, held in cluster.held.items():  # what others hold, after the jobs' own GPUs: as before the rebuild
        outside.apply(engine, name, held)
    rejected: list[Decision] = []
    unreadable = reject_unreadable(core, [j for j in live if j["id"] not in placed])
    for j in live:
        if j["id"] not in placed and j["id"] not in unreadable:
            # A pending job the tree in force can never run (a queue apply lowered the quota below a
            # non-preemptible job, or a limit below a gang) is rejected with its reason at the next cycle.
            rejected += engine.submit(
                engine_spec_of(j["spec"], j["id"], j["pool"]),
                j["submitted_at"],
                seq=j["id"],
                overtaken_at=j["overtaken_at"],
            )
    engine.overtaken()  # the clocks it was given are stored already
    return Rebuilt(tree, engine, row["version"], rejected, admissions or 0)


def applied_tree(document: dict[str, Any], capacity: dict[str, int]) -> QueueTree:
    """The tree in force. If nodes were lost since it was applied, its quotas may now add up to more than the
    pools hold: Corral keeps running on it (guarantees are honoured as far as the GPUs that are left allow)
    rather than refuse to start; a new tree is checked against today's capacity when applied."""
    try:
        return queues.build_tree(document, capacity)
    except Invalid:
        tops = [q for q in document.get("queues", []) if q.get("parent") is None]
        needed = {p: sum(int(q.get("quota", {}).get(p, 0)) for q in tops) for p in capacity}
        log.warning(
            "the queue tree's quotas exceed the GPUs found now (%s > %s); running on it anyway", needed, capacity
        )
        return queues.build_tree(document, {p: max(c, needed[p]) for p, c in capacity.items()})


def held_spec(j: Mapping[Any, Any]) -> JobSpec:
    """The engine spec of a job that holds GPUs. One stored before numbers were checked may ask for infinite CPUs or
    memory (it started on a node that does not count them); its GPUs must still be held, so it is restored asking for
    none of them (what it asked for could not be counted anyway) rather than left out or stalling the rebuild."""
    try:
        return engine_spec_of(j["spec"], j["id"], j["pool"])
    except ValueError:
        repaired = {**j["spec"], **{k: 0.0 for k in ("cpus", "memory_gb") if not _finite_number(j["spec"].get(k, 0.0))}}
        log.warning("job %s: restored with its non-finite CPUs or memory as 0", j["id"])
        return engine_spec_of(repaired, j["id"], j["pool"])


def reject_unreadable(core: Rebuilds, waiting: list[RowMapping]) -> set[int]:
    """Reject, with the reason, waiting jobs whose stored spec the engine cannot take (NaN or Infinity stored before
    numbers were checked at the edge; migration 0007 repairs those, this guards against any left). One such job in
    the engine would stall every queue of its pool; refused at the rebuild, it stalls nothing."""
    bad: dict[int, str] = {}
    for j in waiting:
        try:
            engine_spec_of(j["spec"], j["id"], j["pool"])
        except ValueError as e:
            bad[j["id"]] = str(e)
    if bad:
        now = core.clock()
        with core.writing() as conn:
            for job_id, why in bad.items():
                message = f"its stored spec cannot be scheduled: {why}"
                store.update_job(
                    conn,
                    job_id,
                    state=JobState.REJECTED,
                    ended_at=now,
                    reason={"rule": UNREADABLE, "message": message, "numbers": {}},
                )
                store.add_event(conn, now, "rejected", message, job_id)
        log.warning("rejected %d job(s) whose stored spec cannot be scheduled: %s", len(bad), sorted(bad))
    return set(bad)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def admission_key(a: Mapping[Any, Any]) -> tuple[bool, int, float, int]:
    """Admission order: by the stored number; attempts admitted before it was stored (NULL) first, by time."""
    return (a["admission"] is not None, a["admission"] or 0, a["admitted_at"], a["job_id"])


def reason_of(stored: Mapping[str, Any] | None) -> Reason | None:
    """The engine's Reason from its stored form (store.reason_json)."""
    if stored is None:
        return None
    return Reason(stored["rule"], stored["message"], dict(stored.get("numbers") or {}))


def store_overtaken(conn: Connection, engine: Scheduler) -> None:
    """Write the starvation-guard clocks the engine started since it was last asked, in the transaction of the
    decisions that started them (a rolled-back cycle rebuilds the engine, which forgets them too)."""
    for eid, at in engine.overtaken().items():
        store.update_job(conn, job_id_of(eid), overtaken_at=at)
