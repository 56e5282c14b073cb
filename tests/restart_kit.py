"""Test kit for restarts: an executor that outlives a Core (as processes, Ray jobs and pods outlive a crashed
Corral), a restart without a clean stop, and what to compare across one: the engine's state, the API's answers, and
the demand and fair shares recomputed from scratch from the same database rows."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from quotas import PoolShares
from scheduler.backends.base import Exit, Handle, NodeChange, NodeInfo
from scheduler.engine import Engine
from scheduler.engine.explain import rejection
from scheduler.service.api.auth import Principal, Role
from scheduler.service.core import queues
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.rebuild import LIVE, applied_tree
from scheduler.service.core.specs import JobSubmit, engine_spec_of, job_id_of
from scheduler.service.store.db import jobs
from tests.factories import service_settings
from tests.service_kit import Clock, ScriptedExecutor

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
            "running": {
                q: [(n(j.id), j.start, j.placement(), core.engine.explain(j.id, core.clock())) for j in js]
                for q, js in sorted(ps.running.items())
            },
        }
    return out


def from_scratch(core: Core) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per pool, every queue's demand and fair share recomputed from the database rows alone, without the engine's
    bookkeeping: each leaf's demand is the GPUs of its live jobs (but a waiting job the engine must reject: one that
    can never run under the tree in force), water-filled over the GPUs of the nodes that are up."""
    with core.db.connect() as conn:
        row = queues.latest(conn)
        assert row is not None
        live = list(conn.execute(sa.select(jobs).where(jobs.c.state.in_(LIVE))).mappings())
    tree = applied_tree(row["document"], core.capacity)
    empty = Engine(tree, [i.spec() for i in core.cluster.nodes.values()])
    pools = {p: ps.pool for p, ps in empty.pools.items()}
    demand: dict[str, dict[str, int]] = {p: {} for p in pools}
    for j in live:
        spec = engine_spec_of(j["spec"], j["id"], j["pool"])
        if j["state"] == "pending" and rejection(spec, tree, pools) is not None:
            continue
        demand[j["pool"]][j["queue"]] = demand[j["pool"]].get(j["queue"], 0) + spec.request
    out = {}
    for p in pools:
        up = sum(len(n.gpus) for n in core.cluster.nodes.values() if n.pool == p and n.name not in core.cluster.down)
        fs = PoolShares(tree, p, up)
        for leaf, d in demand[p].items():
            fs.add_demand(leaf, d)
        out[p] = (dict(fs.raw), fs.shares())
    return out


def assert_demand_and_shares_from_scratch(core: Core) -> None:
    """Every queue's demand and fair share in every pool equal those recomputed from scratch; none negative."""
    for pool, (raw, ref_shares) in from_scratch(core).items():
        ps = core.engine.pools[pool]
        shares = ps.shares()
        for q in core.tree.queues:
            assert ps.fs.raw[q] >= 0 and shares.get(q, 0.0) >= -TOL, (pool, q, ps.fs.raw[q], shares.get(q))
            assert math.isclose(ps.fs.raw[q], raw[q]), (pool, q, "demand", ps.fs.raw[q], raw[q])
            assert math.isclose(shares.get(q, 0.0), ref_shares.get(q, 0.0), abs_tol=TOL), (
                pool,
                q,
                "fair share",
                shares.get(q),
                ref_shares.get(q),
            )


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


# ----- the issue's case on any backend -----

ROOT = Principal("root", Role.PLATFORM_ADMIN)


@dataclass
class Backend:
    """How a test runs the issue's case on one backend: `make` starts a Core over the test's database (each call
    is the service starting again); a job runs `command(name)` until `finish(core, name)` makes it exit 0."""

    make: Callable[[], Core]
    pool: str
    unit: int  # GPUs of every job: the pool holds four of them
    command: Callable[[str], str] = lambda name: "sleep 3600"
    finish: Callable[[Core, str], None] = lambda core, name: None
    image: str | None = None
    timeout_s: float = 120.0


def scripted_twin(tmp: Path, nodes: list[NodeInfo], pool: str, unit: int) -> Backend:
    """The same case on a scripted executor, never restarted: what the real backend must decide."""
    clock, executor = Clock(), DurableExecutor()
    settings = service_settings(tmp, f"sqlite:///{tmp / 'twin.db'}", data="twin", grace_s=0)
    bare = [NodeInfo(n.name, n.pool, n.gpus, n.cpus, n.memory_gb) for n in nodes]
    return Backend(
        lambda: build_core(settings, executor, nodes=bare, clock=clock),
        pool,
        unit,
        finish=lambda core, name: executor.exit(_id(core, name), 0),
    )


def _id(core: Core, name: str) -> int:
    return next(i for i, n in names(core).items() if n == name)


def job_row(core: Core, name: str) -> Any:
    """The job of this name, as stored."""
    with core.db.connect() as conn:
        return conn.execute(sa.select(jobs).where(jobs.c.name == name)).mappings().one()


def _state(core: Core, name: str) -> str:
    with core.db.connect() as conn:
        return str(conn.execute(sa.select(jobs.c.state).where(jobs.c.name == name)).scalar_one())


def cycle_until(core: Core, what: str, cond: Callable[[], bool], timeout_s: float) -> None:
    """Scheduling cycles until `cond` holds (real processes, Ray jobs and pods take real time)."""
    end = time.monotonic() + timeout_s
    while True:
        core.tick()
        if cond():
            return
        assert time.monotonic() < end, f"not reached in {timeout_s:g} s: {what}"
        time.sleep(0.1)


def issue_case(b: Backend, restart_it: bool) -> dict[str, Any]:
    """Issue 20 on a pool of four units: `other` (quota 2) runs one unit, `borrower` (quota 0) three; the service
    restarts (kill -9: the core is dropped as it is); one borrower job ends; `team` (quota 2) asks two units,
    within its fair share, and takes one back from the borrower. Demand and fair shares are checked against an engine
    built from scratch at every stage; returns what was decided, by job name."""
    u, pool = b.unit, b.pool
    tree = {
        "queues": [
            {"name": "team", "quota": {pool: 2 * u}},
            {"name": "other", "quota": {pool: 2 * u}},
            {"name": "borrower"},
        ]
    }
    core = b.make()
    core.apply_queues(ROOT, tree)

    def submit(queue: str, name: str) -> None:
        core.submit(ROOT, JobSubmit(name=name, queue=queue, pool=pool, gpus=u, command=b.command(name), image=b.image))

    first = ["other-0", "b0", "b1", "b2"]
    for queue, name in zip(["other", "borrower", "borrower", "borrower"], first, strict=True):
        submit(queue, name)
    cycle_until(core, "four jobs running", lambda: all(_state(core, n) == "running" for n in first), b.timeout_s)
    if restart_it:
        core = restart(core, b.make)
        assert core.engine.pools[pool].fs.raw["borrower"] == 3 * u  # its running jobs are its demand
    assert_demand_and_shares_from_scratch(core)
    b.finish(core, "b0")
    cycle_until(core, "b0 completed", lambda: _state(core, "b0") == "completed", b.timeout_s)
    assert_demand_and_shares_from_scratch(core)
    submit("team", "t0")
    submit("team", "t1")
    decided = core.tick()
    assert_demand_and_shares_from_scratch(core)
    cycle_until(
        core, "the team's jobs running", lambda: _state(core, "t0") == _state(core, "t1") == "running", b.timeout_s
    )
    assert_demand_and_shares_from_scratch(core)
    name, ps = names(core), core.engine.pools[pool]
    out = {
        "decided": [(type(d).__name__, name[job_id_of(d.job)]) for d in decided],
        "running": {q: sorted(name[job_id_of(j)] for j in js) for q, js in running_by_queue(core).items()},
        "states": {n: _state(core, n) for n in [*first, "t0", "t1"]},
        "demand": {q: ps.fs.raw[q] for q in sorted(core.tree.queues)},
        "shares": {q: round(v, 6) for q, v in sorted(ps.shares().items())},
    }
    for n in ["b1", "b2", "other-0", "t0", "t1"]:  # nothing left running on the backend
        if _state(core, n) in LIVE:
            core.cancel(ROOT, _id(core, n))
    core.tick()
    return out
