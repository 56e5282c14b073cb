"""Test kit for restarts: an executor that outlives a Core (as processes, Ray jobs and pods outlive a crashed
Corral), a restart without a clean stop, and what to compare across one: the engine's state, the API's answers, and
the demand and fair shares an engine built from scratch from the same database rows finds."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from scheduler.backends.base import Exit, Handle, NodeChange, NodeInfo
from scheduler.engine import Engine
from scheduler.service import queues
from scheduler.service.core import Core
from scheduler.service.db import jobs
from scheduler.service.rebuild import LIVE
from scheduler.service.specs import engine_spec_of, job_id_of
from tests.service_kit import ScriptedExecutor

TOL = 1e-6


@dataclass
class DurableExecutor(ScriptedExecutor):
    """A scripted executor whose world survives Corral: an ended process's exit code is found again by adopt (as
    the local executor's shim file, Ray's job status or a pod's status keep it), and nodes report their state to
    whoever asks next (a restarted Corral is told of the nodes that are down, as a fresh node list and watch would)."""

    codes: dict[tuple[str, int], int] = field(default_factory=dict)
    changes: list[NodeChange] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    infos: dict[str, NodeInfo] = field(default_factory=dict)

    def exit(self, job_id: int | str, code: int, attempt: int | None = None) -> None:
        key = next(k for k in self.live if k[0] == str(job_id) and (attempt is None or k[1] == attempt))
        self.codes[key] = code
        super().exit(key[0], code, key[1])

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        """A second stop (a cancel while it was being preempted) keeps the first deadline, as the local executor
        does: the database's stop_deadline, from which a restart takes the stopping up again, is the first one."""
        key = (job_id, attempt)
        first = self.stopping.get(key)
        super().terminate(job_id, attempt, grace_s, now)
        if first is not None and key in self.stopping:
            self.stopping[key] = min(first, self.stopping[key])

    def adopt(self, handle: Handle) -> Exit | None:
        key = (handle.job_id, handle.attempt)
        if key in self.live:
            return None
        if key in self.codes:
            return Exit(handle.job_id, handle.attempt, self.codes[key])
        return Exit(handle.job_id, handle.attempt, None, "vanished while Corral was down")

    def node_changes(self, now: float) -> list[NodeChange]:
        out, self.changes = self.changes, []
        return out

    def set_node(self, name: str, up: bool) -> None:
        if up == (name not in self.down):
            return
        if up:
            self.down.discard(name)
            self.changes.append(NodeChange(name, self.infos[name]))
        else:
            self.down.add(name)
            self.changes.append(NodeChange(name, None))

    def restarted(self) -> None:
        """What a restarted Corral hears first: the nodes that are down now (changes it had not committed are
        the cluster's state, not a history)."""
        self.changes = [NodeChange(n, None) for n in sorted(self.down)]


def restart(old: Core, make: Callable[[], Core]) -> Core:
    """kill -9: the old core is dropped as it is (no stop, nothing flushed), a new one starts over the same
    database and executor through the service's own start-up (recovery, then the rebuild)."""
    old.db.dispose()  # its connections only: what a killed process leaves
    return make()


def names(core: Core) -> dict[int, str]:
    with core.db.connect() as conn:
        return {r.id: r.name for r in conn.execute(sa.select(jobs.c.id, jobs.c.name))}


def _r(x: float) -> float:
    return round(x, 6)


def engine_view(core: Core) -> dict[str, Any]:
    """Everything the engine decides from, by job name: per pool the nodes' free GPUs, usage, demand and fair
    share of every queue, pending jobs in queue order with their guard clocks, running jobs in victim order."""
    name = names(core)

    def n(eid: str) -> str:
        return name[job_id_of(eid)]

    out: dict[str, Any] = {}
    for pool, ps in core.engine.pools.items():
        shares = ps.shares()
        out[pool] = {
            "nodes": {k: (v.up, list(v.free)) for k, v in sorted(ps.pool.nodes.items())},
            "usage": {q: ps.usage[q] for q in sorted(core.tree.queues)},
            "np_usage": {q: ps.np_usage[q] for q in sorted(core.tree.queues)},
            "demand": {q: _r(ps.fs.raw[q]) for q in sorted(core.tree.queues)},
            "shares": {q: _r(shares.get(q, 0.0)) for q in sorted(core.tree.queues)},
            "pending": {q: [(n(j.id), j.submit, j.skipped_since) for j in js] for q, js in sorted(ps.pending.items())},
            "running": {q: [(n(j.id), j.start, j.placement(), core.engine.explain(j.id, core.clock())) for j in js]
                        for q, js in sorted(ps.running.items())},
        }
    return out


def fresh_engine(core: Core) -> Engine:
    """An engine built from scratch from the database rows: the tree in force, the nodes, and every live job
    submitted plainly (no restore): what demand and fair shares must be, whatever ran where."""
    with core.db.connect() as conn:
        row = queues.latest(conn)
        assert row is not None
        live = list(conn.execute(sa.select(jobs).where(jobs.c.state.in_(LIVE)).order_by(jobs.c.id)).mappings())
    engine = Engine(core._applied_tree(row["document"]), [i.spec() for i in core.nodes.values()],
                    settings=core.engine_settings)
    for name in core.down:
        engine.node_down(name, 0.0)
    for j in live:
        engine.submit(engine_spec_of(j["spec"], j["id"], j["pool"]), j["submitted_at"])
    return engine


def assert_demand_and_shares_from_scratch(core: Core) -> None:
    """Every queue's demand and fair share in every pool equal those of an engine built from scratch from the same
    rows; none negative."""
    fresh = fresh_engine(core)
    for pool, ps in core.engine.pools.items():
        ref = fresh.pools[pool]
        shares, ref_shares = ps.shares(), ref.shares()
        for q in core.tree.queues:
            assert ps.fs.raw[q] >= 0 and shares.get(q, 0.0) >= -TOL, (pool, q, ps.fs.raw[q], shares.get(q))
            assert math.isclose(ps.fs.raw[q], ref.fs.raw[q]), (pool, q, "demand", ps.fs.raw[q], ref.fs.raw[q])
            assert math.isclose(shares.get(q, 0.0), ref_shares.get(q, 0.0), abs_tol=TOL), (
                pool, q, "fair share", shares.get(q), ref_shares.get(q))


def running_by_queue(core: Core) -> dict[str, list[str]]:
    """Running jobs of each leaf (engine ids, victim order), over every pool."""
    out: dict[str, list[str]] = {}
    for ps in core.engine.pools.values():
        for q, js in ps.running.items():
            out.setdefault(q, []).extend(j.id for j in js)
    return out


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested values differ, as readable paths (an assertion's message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=repr):
            if k not in a or k not in b:
                out.append(f"{path}/{k!r}: {a.get(k, '<missing>')!r} != {b.get(k, '<missing>')!r}")
            else:
                out += differences(a[k], b[k], f"{path}/{k!r}")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
