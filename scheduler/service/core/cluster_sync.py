"""What the cluster tells the service between cycles: nodes that went down or came up, and work it brought itself.

Nodes. A node that goes down (not Ready, being drained) stays known, marked down: the engine preempts the jobs on
it (recorded like any decision; their attempts are stopped through the executor) and places nothing there until it
comes back with the same shape, when the engine takes it up again. A cordoned node takes nothing new, and what runs
there stays (NodeInfo.cordoned; the engine's node_cordoned). The pools' configured size (what quotas are
checked against) still counts it. A node seen for the first time, one whose shape changed, and a deleted node
change that size: the engine and the queue tree are rebuilt from the database with the new capacity (a deleted
node that was its pool's last stays known as down, so the pool and the jobs queued for it survive).

Arrivals (TakesArrivals): each becomes a job submitted by CLUSTER_OWNER through the intake, like an API
submission (admission policy, idempotency on the arrival's key), as a member of the arrival's scope (its
namespace's team) when it has one; one the intake refuses is handed back to the
executor to tell its owner. A withdrawn arrival's job is cancelled if it is still pending.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import sqlalchemy as sa
from pydantic import ValidationError

from scheduler.backends.base import CLUSTER_OWNER, NodeChange, NodeInfo, TakesArrivals, WatchesNodes
from scheduler.service.api.auth import Principal, Role
from scheduler.service.api.errors import Conflict
from scheduler.service.core.intake import Submission, write
from scheduler.service.core.interfaces import Stop, SyncsCluster
from scheduler.service.core.specs import JobSubmit
from scheduler.service.core.states import JobState
from scheduler.service.store.db import jobs, nodes

log = logging.getLogger("corral.service")
CLUSTER = Principal(CLUSTER_OWNER, Role.PLATFORM_ADMIN)


def sync_nodes(core: SyncsCluster, now: float) -> None:
    """Apply the executor's node changes (under the core's lock): one transaction for the preemptions they cause
    and the nodes table; the executor's stops after it; a rebuild when the pools' size changed."""
    cluster = core.cluster
    if isinstance(core.executor, WatchesNodes):
        # Kept until committed, like exits: the executor reports each change once.
        cluster.node_backlog += core.executor.node_changes(now)
    if not cluster.node_backlog:
        return
    after, down = dict(cluster.nodes), set(cluster.down)
    for c in cluster.node_backlog:
        known = after.get(c.name)
        if c.info is not None:
            after[c.name] = c.info
            down.discard(c.name)
        elif known is not None and c.deleted and sum(n.pool == known.pool for n in after.values()) > 1:
            del after[c.name]
            down.discard(c.name)
        elif known is not None:
            down.add(c.name)
    # Down in the engine first: a node leaving or changing shape loses its jobs whatever comes next.
    before, was_down = cluster.nodes, cluster.down
    changed = {n for n, info in after.items() if n in before and before[n].spec() != info.spec()}
    going = [n for n in before if n not in was_down and (n not in after or n in down or n in changed)]
    rebuild = set(after) != set(before) or bool(changed)
    stops: list[Stop] = []
    with core.changing() as conn:
        for name in going:
            for d in core.engine.node_down(name, now):
                stops += core.record(conn, d, now)
        if not rebuild:
            for name, info in after.items():  # cordoned: nothing new lands, its jobs stay (kubectl cordon)
                was_open = name in before and name not in was_down and not before[name].cordoned
                if name in down or name in going or was_open == (not info.cordoned):
                    continue
                if info.cordoned:
                    core.engine.node_cordoned(name, now)
                else:  # uncordoned, or back from down
                    core.engine.node_up(name, now)
        conn.execute(nodes.delete().where(nodes.c.name.not_in(list(after))))
        for info in after.values():
            write_node(conn, info, info.name not in down, replace=True)
    log.info("nodes changed: %s", ", ".join(f"{c.name} {state(c)}" for c in cluster.node_backlog))
    cluster.nodes, cluster.down, cluster.node_backlog = after, down, []
    # Owed from here: if a stop below fails (the cluster's API away), the next cycle still rebuilds.
    if rebuild:
        core.invalidate()
    core.terminate(stops, now)
    if rebuild:
        core.refresh()


def state(c: NodeChange) -> str:
    if c.info is not None:
        return "cordoned" if c.info.cordoned else "up"
    return "deleted" if c.deleted else "down"


def write_node(conn: sa.Connection, n: NodeInfo, up: bool, replace: bool = False) -> None:
    """The node's row in the nodes table (what GET /v1/pools and usage read)."""
    if replace:
        conn.execute(nodes.delete().where(nodes.c.name == n.name))
    conn.execute(
        nodes.insert().values(
            name=n.name,
            pool=n.pool,
            gpus=len(n.gpus),
            gpu_model=n.gpus[0].model if n.gpus else "none",
            up=up,
            info=[dataclasses.asdict(g) for g in n.gpus],  # a MIG GPU's instances as dicts too
        )
    )


def take_arrivals(core: SyncsCluster) -> None:
    """Submit what the cluster brought and cancel what it withdrew; outside the core's lock, as API submissions
    are (the admission policy's hook may be slow). Kept until written: a database error retries them."""
    if not isinstance(core.executor, TakesArrivals):
        return
    if core.cluster.arrivals_lock.acquire(blocking=False):  # else another thread is taking them now
        try:
            _take_arrivals(core, core.executor)
        finally:
            core.cluster.arrivals_lock.release()


def _take_arrivals(core: SyncsCluster, ex: TakesArrivals) -> None:
    cluster = core.cluster
    cluster.arrivals += ex.arrivals(core.clock())
    if cluster.offered_at_start is not None:
        # The arrivals since the start are every one still waiting: a pending job of the cluster's that is not
        # among them lost its pods while Corral was down. Only once nothing waiting is left unlooked-at (a
        # namespace that could not be read): else that gang's job would be withdrawn while its pods are there.
        cluster.offered_at_start |= {a.key for a in cluster.arrivals if a.spec is not None}
        if ex.settled():
            _withdraw_unoffered(core, cluster.offered_at_start)
            cluster.offered_at_start = None
    if not cluster.arrivals:
        return
    batch: list[tuple[str, Submission]] = []
    for a in cluster.arrivals:
        if a.spec is None:
            continue
        try:
            sub = JobSubmit.model_validate({**a.spec, "idempotency_key": a.key})
        except ValidationError as e:
            ex.refuse(a.key, f"not a valid job: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}")
            continue
        if sub.kind != "job":  # as on /v1/jobs: only /v1/sandboxes opens sandboxes, after the guarantee check
            ex.refuse(a.key, "kind sandbox is opened through /v1/sandboxes, not by creating pods")
            continue
        # Scoped arrivals are checked like a team member's submission: the cluster's pods may use only their team's
        # queues, whoever made them.
        who = CLUSTER if a.scope is None else Principal(CLUSTER_OWNER, Role.MEMBER, a.scope)
        batch.append((a.key, Submission(who, sub)))
    if batch:
        write(core, [s for _, s in batch])
    for key, s in batch:
        if s.error is not None:
            ex.refuse(key, str(s.error))
    for a in cluster.arrivals:
        if a.spec is None:
            withdraw(core, a.key)
    cluster.arrivals = []


def _withdraw_unoffered(core: SyncsCluster, offered: set[str]) -> None:
    with core.db.connect() as conn:
        keys = (
            conn.execute(
                sa.select(jobs.c.idempotency_key).where(jobs.c.owner == CLUSTER_OWNER, jobs.c.state == JobState.PENDING)
            )
            .scalars()
            .all()
        )
    for key in keys:
        if key is not None and key not in offered:
            withdraw(core, key)


def withdraw(core: SyncsCluster, key: str) -> None:
    """Cancel the pending job of a withdrawn arrival; one already admitted ends when its pods are seen gone."""
    with core.db.connect() as conn:
        row = conn.execute(
            sa.select(jobs.c.id, jobs.c.state).where(jobs.c.owner == CLUSTER_OWNER, jobs.c.idempotency_key == key)
        ).first()
    if row is None or row.state != JobState.PENDING:
        return
    reason = {"rule": "withdrawn", "message": "its pods were deleted before it was admitted", "numbers": {}}
    with contextlib.suppress(Conflict):  # it ended meanwhile
        core.cancel(CLUSTER, row.id, reason)
