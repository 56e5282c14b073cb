"""Node changes and arrivals from the executor, fed to the service while it runs
(scheduler/service/core/cluster_sync.py), with a scripted executor and a settable clock: no cluster needed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from scheduler.backends.base import (
    CLUSTER_OWNER,
    Arrival,
    Exit,
    GPUInfo,
    NodeChange,
    NodeInfo,
    TakesArrivals,
    WatchesNodes,
)
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Principal, Role
from scheduler.service.core import cluster_sync
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.sandboxes import SandboxRequest, open_sandbox
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit
from scheduler.service.store.db import attempts, events, jobs, nodes
from tests.service_kit import Clock, ScriptedExecutor

ROOT = Principal("root", Role.PLATFORM_ADMIN)


@dataclass
class ClusterExecutor(ScriptedExecutor):
    """A scripted executor whose cluster also reports node changes and brings work of its own."""

    changes: list[NodeChange] = field(default_factory=list)
    brought: list[Arrival] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    unsettled: bool = False  # some waiting work could not be looked at yet

    def node_changes(self, now: float) -> list[NodeChange]:
        out, self.changes = self.changes, []
        return out

    def arrivals(self, now: float) -> list[Arrival]:
        out, self.brought = self.brought, []
        return out

    def refuse(self, key: str, why: str) -> None:
        self.refused[key] = why

    def settled(self) -> bool:
        return not self.unsettled


def node(name: str, gpus: int = 4, pool: str = "p") -> NodeInfo:
    return NodeInfo(name, pool, [GPUInfo(i, pool) for i in range(gpus)])


def make(tmp_path: Path, *names: str) -> tuple[Core, ClusterExecutor, Clock]:
    ex, clock = ClusterExecutor(), Clock()
    core = build_core(
        ServiceSettings(data_dir=tmp_path / "data", grace_s=5), ex, clock=clock, nodes=[node(n) for n in names]
    )
    return core, ex, clock


def submit(core: Core, gpus: int, queue: str = "default") -> int:
    row, _ = core.submit(ROOT, JobSubmit(queue=queue, gpus=gpus, command="sleep inf"))
    return int(row["id"])


def state(core: Core, job: int) -> str:
    with core.db.connect() as conn:
        return str(conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job)).scalar_one())


def node_rows(core: Core) -> dict[str, bool]:
    with core.db.connect() as conn:
        return {r.name: r.up for r in conn.execute(sa.select(nodes.c.name, nodes.c.up))}


def placed_on(ex: ClusterExecutor, job: int) -> set[str]:
    return {n for lc in ex.launched if lc.job_id == str(job) for n in lc.gpus}


def test_the_capability_is_recognised() -> None:
    assert isinstance(ClusterExecutor(), WatchesNodes) and isinstance(ClusterExecutor(), TakesArrivals)
    assert not isinstance(ScriptedExecutor(), WatchesNodes)


def test_a_node_down_requeues_its_jobs_and_up_brings_it_back(tmp_path: Path) -> None:
    core, ex, clock = make(tmp_path, "a", "b")
    j1, j2 = submit(core, 4), submit(core, 4)
    core.tick()
    core.tick()
    assert state(core, j1) == state(core, j2) == "running"
    on_a = j1 if placed_on(ex, j1) == {"a"} else j2
    ex.changes.append(NodeChange("a", None))  # not Ready: down, still known
    clock.advance(1)
    core.tick()
    assert ex.terminated == [(str(on_a), 1)]
    assert state(core, on_a) in ("pending", "starting") and node_rows(core) == {"a": False, "b": True}
    assert core.capacity == {"p": 8} and core.cluster.down == {"a"}
    with core.db.connect() as conn:
        kinds = [r.kind for r in conn.execute(sa.select(events.c.kind).where(events.c.job_id == on_a))]
    assert "preempted" in kinds
    for _ in range(3):
        core.tick()
    assert state(core, on_a) == "pending"  # the only up node is full: nothing is placed on the down one
    ex.changes.append(NodeChange("a", node("a")))
    core.tick()
    core.tick()
    assert state(core, on_a) == "running" and core.cluster.down == set() and node_rows(core) == {"a": True, "b": True}
    assert [lc.attempt for lc in ex.launched if lc.job_id == str(on_a)] == [1, 2]


def cordoned(name: str) -> NodeInfo:
    return NodeInfo(name, "p", [GPUInfo(i, "p") for i in range(4)], cordoned=True)


def test_a_cordoned_node_keeps_its_jobs_and_takes_nothing_new_also_after_a_restart(tmp_path: Path) -> None:
    """kubectl cordon means "nothing new here": running jobs stay (issue 22, item 5), and a restart while cordoned
    decides as before it."""
    core, ex, clock = make(tmp_path, "a", "b")
    j1 = submit(core, 2)
    core.tick()
    on = placed_on(ex, j1).pop()
    other = ({"a", "b"} - {on}).pop()
    ex.changes.append(NodeChange(on, cordoned(on)))
    clock.advance(1)
    core.tick()
    assert ex.terminated == [] and state(core, j1) == "running" and core.capacity == {"p": 8}
    assert node_rows(core) == {"a": True, "b": True} and core.engine.node_room(on)[0] == 2
    j2, j3 = submit(core, 2), submit(core, 4)  # best fit would put j2 beside j1: it goes to the other node
    core.tick()
    core.tick()
    assert placed_on(ex, j2) == {other} and state(core, j3) == "pending"

    again = ClusterExecutor(live=dict(ex.live))
    core = build_core(
        ServiceSettings(data_dir=tmp_path / "data", grace_s=5), again, clock=clock, nodes=[cordoned(on), node(other)]
    )
    for _ in range(2):
        core.tick()
    assert [state(core, j) for j in (j1, j2, j3)] == ["running", "running", "pending"] and again.launched == []
    again.changes.append(NodeChange(on, node(on)))  # uncordoned: j3 (4 GPUs) still fits nowhere, until j1 ends
    core.tick()
    assert state(core, j3) == "pending"
    again.ended.append(Exit(str(j1), 1, 0))
    core.tick()
    core.tick()
    assert state(core, j3) == "running" and placed_on(again, j3) == {on}


def test_a_drained_attempt_waits_again_as_after_a_restart(tmp_path: Path) -> None:
    """kubectl drain (cordon, then evict): the job is not failed, it waits again keeping its place (issue 22, item
    5); the same when its pods went while Corral was down, read from the cordon and the attempt's placement."""
    core, ex, clock = make(tmp_path, "a", "b")
    j1, j2 = submit(core, 4), submit(core, 4)
    core.tick()
    core.tick()
    on1, on2 = placed_on(ex, j1).pop(), placed_on(ex, j2).pop()
    ex.changes += [NodeChange(on1, cordoned(on1)), NodeChange(on2, cordoned(on2))]
    core.tick()
    del ex.live[(str(j1), 1)]
    ex.ended.append(Exit(str(j1), 1, -15, f"its node was drained ({on1})", drained=True))
    core.tick()
    assert state(core, j1) == "pending" and ex.terminated == []
    with core.db.connect() as conn:
        causes = [
            r.data.get("cause")
            for r in conn.execute(sa.select(events.c.data).where(events.c.job_id == j1, events.c.kind == "preempted"))
        ]
    assert causes == ["node_drained"]
    # j2's pods go while Corral is down: after the restart it waits again too, rather than failing.
    del ex.live[(str(j2), 1)]
    again = ClusterExecutor(live=dict(ex.live))
    core = build_core(
        ServiceSettings(data_dir=tmp_path / "data", grace_s=5), again, clock=clock, nodes=[cordoned(on1), cordoned(on2)]
    )
    core.tick()
    assert state(core, j2) == "pending"
    again.changes += [NodeChange(on1, node(on1)), NodeChange(on2, node(on2))]
    core.tick()
    core.tick()
    assert state(core, j1) == state(core, j2) == "running"
    assert [lc.attempt for lc in again.launched] == [2, 2]


def test_new_deleted_and_reshaped_nodes_change_capacity_and_the_tree(tmp_path: Path) -> None:
    core, ex, clock = make(tmp_path, "a")
    big = submit(core, 4)
    core.tick()
    core.tick()
    assert state(core, big) == "running"
    waiting = submit(core, 4)
    core.tick()
    assert state(core, waiting) == "pending"
    ex.changes.append(NodeChange("b", node("b")))  # a new node: the pool grows, the default tree with it
    core.tick()
    core.tick()
    assert core.capacity == {"p": 8} and state(core, waiting) == "running"
    assert placed_on(ex, waiting) == {"b"} and core.tree.capacity == {"p": 8}
    ex.changes.append(NodeChange("b", None, deleted=True))  # deleted: gone from the pool, its job requeued
    core.tick()
    assert core.capacity == {"p": 4} and node_rows(core) == {"a": True}
    assert state(core, waiting) in ("pending", "starting") and (str(waiting), 1) in ex.terminated
    ex.changes.append(NodeChange("a", node("a", gpus=8)))  # a new shape: its job is stopped, the engine rebuilt
    core.tick()
    core.tick()
    assert core.capacity == {"p": 8} and (str(big), 1) in ex.terminated
    core.tick()
    assert state(core, big) == state(core, waiting) == "running"
    # The pool's last node deleted: kept as down, so the pool and the jobs waiting for it survive.
    ex.changes.append(NodeChange("a", None, deleted=True))
    core.tick()
    assert core.capacity == {"p": 8} and core.cluster.down == {"a"} and node_rows(core) == {"a": False}
    assert state(core, big) == state(core, waiting) == "pending"


def test_changes_are_kept_until_committed(tmp_path: Path, monkeypatch: Any) -> None:
    core, ex, _ = make(tmp_path, "a", "b")
    ex.changes.append(NodeChange("a", None))

    def broken(*a: Any, **k: Any) -> None:
        raise sa.exc.OperationalError("x", {}, Exception("database away"))

    monkeypatch.setattr(cluster_sync, "write_node", broken)
    with pytest.raises(sa.exc.OperationalError):
        core.tick()
    assert core.cluster.down == set() and len(core.cluster.node_backlog) == 1
    monkeypatch.undo()
    core.tick()
    assert core.cluster.down == {"a"} and core.cluster.node_backlog == []


def arrival(key: str, workers: int = 1, gpus: int = 1, queue: str = "default") -> Arrival:
    return Arrival(
        key,
        {
            "name": key,
            "queue": queue,
            "workers": workers,
            "gpus": gpus,
            "command": f"pods of {key}",
            "env": {"POD_GROUP": key},
        },
    )


def cluster_jobs(core: Core) -> dict[str, tuple[int, str]]:
    with core.db.connect() as conn:
        return {
            r.idempotency_key: (r.id, r.state)
            for r in conn.execute(
                sa.select(jobs.c.id, jobs.c.state, jobs.c.idempotency_key).where(jobs.c.owner == CLUSTER_OWNER)
            )
        }


def test_arrivals_become_jobs_refusals_go_back_withdrawals_cancel(tmp_path: Path) -> None:
    core, ex, _ = make(tmp_path, "a", "b")
    ex.brought += [
        arrival("ns/g1", workers=2, gpus=4),
        arrival("ns/g2"),
        arrival("ns/too-big", gpus=16),
        arrival("ns/nowhere", queue="nope"),
        Arrival("ns/bad", {"queue": "default"}),
    ]
    core.tick()
    got = cluster_jobs(core)
    assert set(got) == {"ns/g1", "ns/g2"} and set(ex.refused) == {"ns/too-big", "ns/nowhere", "ns/bad"}
    assert "does not exist" in ex.refused["ns/nowhere"] and "command" in ex.refused["ns/bad"]
    ex.brought.append(arrival("ns/g1", workers=2, gpus=4))  # after a restart, offered again: the same job
    core.tick()
    assert cluster_jobs(core) == {**got, "ns/g1": (got["ns/g1"][0], "running")}
    launch = next(lc for lc in ex.launched if lc.job_id == str(got["ns/g1"][0]))
    assert launch.env["POD_GROUP"] == "ns/g1" and launch.env["CORRAL_OWNER"] == CLUSTER_OWNER
    ex.brought.append(Arrival("ns/g2", None))  # its pods deleted while it waited
    core.tick()
    assert cluster_jobs(core)["ns/g2"][1] == "cancelled"


def test_a_preempted_cluster_job_ends_instead_of_waiting_again(tmp_path: Path) -> None:
    core, ex, clock = make(tmp_path, "a")
    core.apply_queues(
        ROOT, {"queues": [{"name": "x", "quota": {"p": 2}, "limit": {"p": 4}}, {"name": "y", "quota": {"p": 2}}]}
    )
    ex.brought.append(arrival("ns/borrower", gpus=4, queue="x"))
    core.tick()
    core.tick()
    ((jid, st),) = cluster_jobs(core).values()
    assert st == "running"
    clock.advance(10)
    mine = submit(core, 2, queue="y")  # y reclaims its quota from x's borrowed GPUs
    core.tick()
    core.tick()
    assert cluster_jobs(core)["ns/borrower"][1] == "cancelled" and (str(jid), 1) in ex.terminated
    assert state(core, mine) == "running"
    for _ in range(3):
        core.tick()
    assert [lc.attempt for lc in ex.launched if lc.job_id == str(jid)] == [1]  # never launched again


def test_a_sandbox_on_a_node_that_goes_down_ends_instead_of_waiting_again(tmp_path: Path) -> None:
    core, ex, clock = make(tmp_path, "a", "b")
    box = open_sandbox(core, ROOT, SandboxRequest(queue="default", gpus=4, command=["jupyterhub-singleuser"]))
    assert box["state"] == "running"
    node_of = next(iter(placed_on(ex, box["id"])))
    ex.changes.append(NodeChange(node_of, None))
    clock.advance(1)
    core.tick()
    assert state(core, box["id"]) == "cancelled" and (str(box["id"]), 1) in ex.terminated
    for _ in range(3):
        core.tick()
    assert [lc.attempt for lc in ex.launched if lc.job_id == str(box["id"])] == [1]  # never launched again


@dataclass
class TeamsExecutor(ClusterExecutor):
    """Records the capacity each sync_teams call saw, and whether the core's lock was free then."""

    core: Core | None = None
    synced: list[dict[str, int]] = field(default_factory=list)

    def sync_teams(self, tree: Any, capacity: dict[str, int]) -> None:
        if self.core is not None:  # (set after start) the lock is free: another thread can take it
            free: list[bool] = []

            def take(lock: Any = self.core.lock) -> None:
                free.append(lock.acquire(blocking=False))
                if free[0]:
                    lock.release()

            t = threading.Thread(target=take)
            t.start()
            t.join()
            assert free == [True]
        self.synced.append(dict(capacity))


def test_team_objects_follow_capacity_changes(tmp_path: Path, monkeypatch: Any) -> None:
    ex, clock = TeamsExecutor(), Clock()
    core = build_core(ServiceSettings(data_dir=tmp_path / "data"), ex, clock=clock, nodes=[node("a"), node("b")])
    ex.core = core
    assert ex.synced == [{"p": 8}]  # at start
    ex.changes.append(NodeChange("a", None))  # down: the pool's size stays, nothing to sync
    core.tick()
    ex.changes.append(NodeChange("a", node("a")))
    core.tick()
    assert ex.synced == [{"p": 8}]
    ex.changes.append(NodeChange("c", node("c", gpus=8)))  # new: the pool grows, unlimited teams' quotas follow
    core.tick()
    ex.changes.append(NodeChange("b", None, deleted=True))
    core.tick()
    core.tick()
    assert ex.synced == [{"p": 8}, {"p": 16}, {"p": 12}]
    # A cycle that fails after the nodes changed still owes the sync: the next one makes it.
    ex.changes.append(NodeChange("a", node("a", gpus=2)))
    monkeypatch.setattr(ex, "poll", lambda now: (_ for _ in ()).throw(RuntimeError("poll failed")))
    with pytest.raises(RuntimeError):
        core.tick()
    monkeypatch.undo()
    core.tick()
    assert ex.synced[-1] == {"p": 10} and len(ex.synced) == 4


def test_a_scoped_arrival_may_use_only_its_teams_queues(tmp_path: Path) -> None:
    core, ex, _ = make(tmp_path, "a")
    core.apply_queues(
        ROOT,
        {
            "queues": [
                {"name": "x", "quota": {"p": 2}},
                {"name": "sub", "parent": "x", "quota": {"p": 1}},
                {"name": "y", "quota": {"p": 2}},
            ]
        },
    )
    ex.brought += [
        Arrival("ns/own", arrival("ns/own", queue="sub").spec, "x"),
        Arrival("ns/theirs", arrival("ns/theirs", queue="y").spec, "x"),
        Arrival("ns/noteam", arrival("ns/noteam", queue="y").spec, "nope"),
    ]
    core.tick()
    assert set(cluster_jobs(core)) == {"ns/own"}
    assert "may not submit to queue y" in ex.refused["ns/theirs"] and "ns/noteam" in ex.refused


def _two_waiting_then_restart(tmp_path: Path, other: str) -> tuple[Core, ClusterExecutor]:
    """The node is full, so the cluster's jobs ns/kept and `other` wait; then Corral restarts and the cluster
    lists only ns/kept so far."""
    core, ex, _ = make(tmp_path, "a")
    submit(core, 4)
    core.tick()
    ex.brought += [arrival("ns/kept", gpus=4), arrival(other, gpus=4)]
    core.tick()
    assert {k: s for k, (_, s) in cluster_jobs(core).items()} == {"ns/kept": "pending", other: "pending"}
    again, ex2, _ = make(tmp_path, "a")
    ex2.brought.append(arrival("ns/kept", gpus=4))
    return again, ex2


def test_pending_cluster_jobs_not_offered_again_after_a_restart_are_withdrawn(tmp_path: Path) -> None:
    again, _ = _two_waiting_then_restart(tmp_path, "ns/lost")
    again.tick()
    got = {k: s for k, (_, s) in cluster_jobs(again).items()}
    assert got["ns/lost"] == "cancelled" and got["ns/kept"] in ("pending", "running")  # (the node freed up)


def test_nothing_is_withdrawn_at_start_while_some_waiting_work_is_not_looked_at_yet(tmp_path: Path) -> None:
    again, ex2 = _two_waiting_then_restart(tmp_path, "ns/late")
    ex2.unsettled = True  # ns/late's namespace cannot be read at first
    again.tick()
    assert cluster_jobs(again)["ns/late"][1] == "pending"  # not withdrawn: its pods may well be there
    ex2.brought.append(arrival("ns/late", gpus=4))
    ex2.unsettled = False
    again.tick()
    assert {k: s for k, (_, s) in cluster_jobs(again).items()}["ns/late"] in ("pending", "running")


def test_a_failed_stop_does_not_skip_the_rebuild_the_node_changes_owe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core, ex, _ = make(tmp_path, "a")
    job = submit(core, 4)
    core.tick()
    ex.changes += [NodeChange("a", None), NodeChange("b", node("b"))]  # a goes down under the job, b is new

    def away(*_: Any) -> None:
        raise OSError("the cluster's API is away")

    monkeypatch.setattr(ex, "terminate", away)
    with pytest.raises(OSError):
        core.tick()
    monkeypatch.undo()
    core.tick()
    core.tick()
    with core.db.connect() as conn:
        state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job)).scalar_one()
        placed = (
            conn.execute(
                sa.select(attempts.c.placement).where(attempts.c.job_id == job).order_by(attempts.c.attempt.desc())
            )
            .scalars()
            .first()
        )
    assert state == "starting" and [n for n, _ in placed] == ["b"]  # requeued onto b: the engine knows it


def test_the_apps_shutdown_closes_the_executor(tmp_path: Path) -> None:
    core, ex, _ = make(tmp_path, "a")
    closed: list[bool] = []
    ex.close = lambda: closed.append(True)  # type: ignore[attr-defined]  # its watches' threads
    with TestClient(create_app(core, run_loop=False)) as client:
        assert client.get("/healthz").status_code == 200 and not closed
    assert closed == [True]
