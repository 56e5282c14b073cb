"""Idle waits, guard holds and preemption waste (scheduler.sim.waste) on hand-made event logs with known answers."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.engine.cluster import workers_per_node
from scheduler.engine.decisions import Hold
from scheduler.sim.inputs import World
from scheduler.sim.runner import Simulation
from scheduler.sim.waste import HOLD_CAUSES, analyse, count_holds, workers_on
from tests import factories as f


def _ev(t: float, event: str, job: str, **extra: Any) -> dict[str, Any]:
    return {"t": t, "event": event, "job": job, **extra}


def _log(*events: dict[str, Any]) -> dict[str, Any]:
    return {"policy": "test", "events": list(events), "fair_share": []}


def test_guarantee_wait_counts_and_a_wait_for_room_does_not() -> None:
    # One 8-GPU node; team-a's guarantee is 4. s1 (4 GPUs, non-preemptible) runs 0-100; s2, non-preemptible too,
    # waits on the guarantee from 0 to 100 while 4 GPUs are free: 4 x 100. big (8 GPUs) waits for room: 0. At
    # t=100 the whole node is free for an instant only (s2 starts at once): an instant adds nothing.
    world = f.world(
        f.nodes("a100", 1, 8),
        [f.queue("team-a", quota={"a100": 4})],
        [
            f.sim_job("s1", 0, 100, gpus=4, preemptible=False),
            f.sim_job("s2", 0, 100, gpus=4, preemptible=False),
            f.sim_job("big", 0, 100, gpus=8),
        ],
    )
    log = _log(
        _ev(0, "submitted", "s1"),
        _ev(0, "submitted", "s2"),
        _ev(0, "submitted", "big"),
        _ev(0, "started", "s1", nodes={"a100-0": [0, 1, 2, 3]}),
        _ev(100, "completed", "s1"),
        _ev(100, "started", "s2", nodes={"a100-0": [0, 1, 2, 3]}),
        _ev(200, "completed", "s2"),
        _ev(200, "started", "big", nodes={"a100-0": list(range(8))}),
        _ev(300, "completed", "big"),
    )
    w = analyse(world, log)
    assert w.idle.gpu_seconds == 400 and w.idle.jobs == 1 and w.idle.max_seconds == 100
    assert w.idle.preemptible_gpu_seconds == 0
    assert w.idle_queues["team-a"].gpu_seconds == 400
    assert w.holds is None and w.preemption.preemptions == 0


def test_limits_of_the_queue_and_its_ancestors() -> None:
    # Two 8-GPU nodes, room for everyone. dept may use 6 GPUs, team-a 4. a1 (2 GPUs of team-a) runs from 0 to 50.
    # a2 (team-a, 4): 2 + 4 > 4, held by team-a's limit. b1 (team-b, 4): dept 2 + 4 <= 6, so it could have
    # started: 4 x 50. b2 (team-b, 6): dept 2 + 6 > 6. The log ends at 50 with all three still waiting.
    queues = [
        f.queue("dept", limit={"a100": 6}),
        f.queue("team-a", "dept", limit={"a100": 4}),
        f.queue("team-b", "dept"),
    ]
    world = f.world(
        f.nodes("a100", 2, 8),
        queues,
        [
            f.sim_job("a1", 0, 50, "team-a", gpus=2),
            f.sim_job("a2", 0, 50, "team-a", gpus=4),
            f.sim_job("b1", 0, 50, "team-b", gpus=4),
            f.sim_job("b2", 0, 50, "team-b", gpus=6),
        ],
    )
    log = _log(
        *[_ev(0, "submitted", j) for j in ("a1", "a2", "b1", "b2")],
        _ev(0, "started", "a1", nodes={"a100-0": [0, 1]}),
        _ev(50, "completed", "a1"),
    )
    w = analyse(world, log)
    assert w.idle_queues["team-a"].gpu_seconds == 0
    assert w.idle_queues["team-b"].gpu_seconds == 200 and w.idle_queues["team-b"].jobs == 1
    assert w.idle.gpu_seconds == w.idle.preemptible_gpu_seconds == 200


def test_cpus_gangs_and_nodes_down() -> None:
    # Two nodes of 8 GPUs and 16 CPUs; a100-1 is down from 0 to 30. x (1 GPU, 16 CPUs) takes a100-0's CPUs.
    # y (2 GPUs, 4 CPUs) has no room until a100-1 is up: 2 x 70. z, a gang of 2 x 4 GPUs with no CPUs declared,
    # has one worker's room on a100-0 (7 GPUs free) until a100-1 is up, then both: 8 x 70.
    world = f.world(
        f.nodes("a100", 2, 8, cpus=16),
        [f.queue("team-a")],
        [
            f.sim_job("x", 0, 200, gpus=1, cpus=16),
            f.sim_job("y", 0, 100, gpus=2, cpus=4),
            f.sim_job("z", 0, 100, gpus=4, workers=2),
        ],
        events=[f.node_down(0, "a100-1"), f.node_up(30, "a100-1")],
    )
    log = _log(
        *[_ev(0, "submitted", j) for j in ("x", "y", "z")],
        _ev(0, "started", "x", nodes={"a100-0": [0]}),
        _ev(100, "started", "y", nodes={"a100-1": [0, 1]}),
    )
    w = analyse(world, log)
    assert w.idle.gpu_seconds == 2 * 70 + 8 * 70 and w.idle.jobs == 2 and w.idle.max_seconds == 70


def test_replayed_guarantee_wait() -> None:
    # The engine itself: s2 is non-preemptible and team-a's guarantee (4) is full of s1, so s2 waits 100 s with
    # 4 GPUs free (scenarios 04 and 13), except from 10 to 30 when b1 holds 2 of them: 4 x 80. b1 starts at once.
    world = f.world(
        f.nodes("a100", 1, 8),
        [f.queue("team-a", quota={"a100": 4}), f.queue("team-b")],
        [
            f.sim_job("s1", 0, 100, gpus=4, preemptible=False),
            f.sim_job("s2", 0, 50, gpus=4, preemptible=False),
            f.sim_job("b1", 10, 20, "team-b", gpus=2),
        ],
    )
    sim = Simulation(world, "corral", log_fair_share=False)
    log = sim.run()
    w = analyse(world, log, sim.holds)
    assert w.idle.gpu_seconds == 4 * 80 and w.idle_queues["team-a"].jobs == 1
    assert w.idle_queues["team-b"].gpu_seconds == 0


# Two 8-GPU nodes p-0 and p-1.
NODES = f.nodes("p", 2, 8)
JOBS = [
    f.sim_job("v", 0, 1000, pool="p", gpus=2),
    f.sim_job("s", 0, 1000, pool="p", gpus=4, preemptible=False),
    f.sim_job("x", 0, 1000, pool="p", gpus=4),
    f.sim_job("g", 0, 1000, pool="p", gpus=8),
    f.sim_job("w", 0, 1000, pool="p", gpus=1, checkpoint=True),
    f.sim_job("h", 0, 1000, pool="p", gpus=1),
    f.sim_job("u", 0, 1000, pool="p", gpus=1),
]


def test_preempted_and_restarted_at_once_for_nothing() -> None:
    # s takes v's GPUs on p-0 and v restarts at once on p-1; s would have fit beside v (6 GPUs free on p-0).
    log = _log(
        _ev(0, "started", "v", nodes={"p-0": [0, 1]}),
        _ev(10, "preempted", "v", reason="priority", by="s"),
        _ev(10, "started", "s", nodes={"p-0": [0, 1, 2, 3]}),
        _ev(10, "started", "v", nodes={"p-1": [0, 1]}),
    )
    p = analyse(f.world(NODES, [f.queue("team-a")], JOBS), log).preemption
    assert (p.preemptions, p.same_instant, p.moved, p.for_nothing) == (1, 1, 0, 1)
    assert p.lost_gpu_seconds == 20 and p.lost_for_nothing_gpu_seconds == 20


def test_a_victim_that_only_moved_a_checkpoint_and_a_node_failure() -> None:
    # g (8 GPUs) needs a whole node: p-0 has v, p-1 has x, w and u. v restarts at once on p-1; had it stayed on
    # p-0, g would have had 6 GPUs there and 3 on p-1: a move. w (checkpoint) is preempted at 40 and restarts at 50:
    # not same-instant, nothing lost. u's node failure is not counted.
    log = _log(
        _ev(0, "started", "v", nodes={"p-0": [0, 1]}),
        _ev(0, "started", "x", nodes={"p-1": [0, 1, 2, 3]}),
        _ev(0, "started", "w", nodes={"p-1": [6]}),
        _ev(0, "started", "u", nodes={"p-1": [7]}),
        _ev(30, "preempted", "v", reason="fair_share", by="g"),
        _ev(30, "started", "g", nodes={"p-0": list(range(8))}),
        _ev(30, "started", "v", nodes={"p-1": [4, 5]}),
        _ev(40, "preempted", "w", reason="priority", by="h"),
        _ev(40, "started", "h", nodes={"p-1": [6]}),
        _ev(45, "preempted", "u", reason="node_down"),
        _ev(45, "started", "u", nodes={"p-1": [7]}),
        _ev(50, "completed", "u"),
        _ev(50, "started", "w", nodes={"p-1": [7]}),
    )
    p = analyse(f.world(NODES, [f.queue("team-a")], JOBS), log).preemption
    assert (p.preemptions, p.same_instant, p.moved, p.for_nothing) == (2, 1, 1, 0)
    assert p.lost_gpu_seconds == 2 * 30 and p.lost_for_nothing_gpu_seconds == 0


def test_holds_count_distinct_jobs_per_cause_and_queue() -> None:
    world = f.world(
        f.nodes("a100", 1, 8),
        [f.queue("team-a"), f.queue("team-b")],
        [f.sim_job("a1", 0, 10), f.sim_job("a2", 0, 10), f.sim_job("b1", 0, 10, "team-b")],
    )
    holds = [
        Hold(0, "a1", "big", "queue_mate"),
        Hold(5, "a1", "big", "queue_mate"),
        Hold(5, "a2", "big", "guarantee"),
        Hold(6, "a1", "big2", "guarantee"),
        Hold(6, "b1", "big2", "held_nodes"),
    ]
    h = analyse(world, _log(), holds).holds
    assert h is not None
    assert h.jobs == {"held_nodes": 1, "queue_mate": 1, "guarantee": 2, "limit": 0}
    assert h.queues == {
        "team-a": {"held_nodes": 0, "queue_mate": 1, "guarantee": 2, "limit": 0},
        "team-b": {"held_nodes": 1, "queue_mate": 0, "guarantee": 0, "limit": 0},
    }
    assert (h.held, h.starving, h.records) == (3, 2, 5)
    assert count_holds(None, {}) is None
    assert list(count_holds([], {}).jobs) == list(HOLD_CAUSES)  # type: ignore[union-attr]


def test_simulation_gives_the_engine_a_list_for_holds() -> None:
    sim = Simulation(f.world(f.nodes("a100", 1, 8), [f.queue("team-a")], [f.sim_job("a", 0, 1)]))
    sim.run()
    assert sim.holds == ([] if hasattr(sim.engine, "holds") else None)


@pytest.mark.parametrize(
    ("gpus", "workers", "placement", "want"),
    [
        (4, 3, {"n0": [0, 1, 2, 3, 4, 5, 6, 7], "n1": [0, 1, 2, 3]}, {"n0": 2, "n1": 1}),
        (0, 3, {"n0": [], "n1": []}, {"n0": 2, "n1": 1}),
    ],
)
def test_workers_on(gpus: int, workers: int, placement: dict[str, list[int]], want: dict[str, int]) -> None:
    assert workers_on(f.job("j", gpus=gpus, workers=workers), placement) == want


def _oracle(world: World, log: dict[str, Any]) -> dict[str, float]:
    """Idle-wait GPU-seconds per queue the slow way: every pending job, every node, at every instant."""
    specs = {j.spec.id: j.spec for j in world.jobs}
    held: dict[str, dict[str, list[int]]] = {}
    pending: set[str] = set()
    down: set[str] = set()
    out: dict[str, float] = {j.spec.queue: 0.0 for j in world.jobs}
    times = sorted({float(e["t"]) for e in log["events"]} | {float(e.at) for e in world.events})
    horizon = max(float(e["t"]) for e in log["events"])
    for t in (t for t in times if t <= horizon):
        for e in world.events:
            if e.at == t and e.node_down:
                down.add(e.node_down)
            if e.at == t and e.node_up:
                down.discard(e.node_up)
        for e in log["events"]:
            if float(e["t"]) != t:
                continue
            job, kind = e["job"], e["event"]
            if kind in ("submitted", "preempted"):
                pending.add(job)
            if kind in ("started", "cancelled"):
                pending.discard(job)
            if kind == "started":
                held[job] = e["nodes"]
            elif kind in ("preempted", "completed", "failed", "cancelled"):
                held.pop(job, None)
        nxt = [u for u in times if u > t]
        dt = (min(nxt) if nxt else horizon) - t
        for job in pending:
            s = specs[job]
            room = 0
            for n in world.nodes:
                if n.pool != s.pool or n.name in down:
                    continue
                used = [(specs[j], g[n.name]) for j, g in held.items() if n.name in g]
                free = n.gpus - sum(len(g) for _, g in used)
                cpus = None if n.cpus is None else n.cpus - sum(len(g) // o.gpus * o.cpus for o, g in used)
                mem = (
                    None if n.memory_gb is None else n.memory_gb - sum(len(g) // o.gpus * o.memory_gb for o, g in used)
                )
                room += workers_per_node(s, free, cpus, mem)
            usage = {
                a.name: sum(
                    len(g)
                    for j, p in held.items()
                    for g in p.values()
                    if specs[j].pool == s.pool and a in world.tree[specs[j].queue].path
                )
                for a in world.tree[s.queue].path
            }
            if room >= s.workers and all(
                usage[a.name] + s.request <= a.limit_of(s.pool) for a in world.tree[s.queue].path
            ):
                out[s.queue] += s.request * dt
    return out


@pytest.mark.parametrize("policy", ["corral", "fifo", "strict-quota"])
def test_idle_waits_match_a_slow_oracle(policy: str) -> None:
    # Small gangs, CPUs on the nodes, a limit over two teams and a node that goes down and up again.
    queues = [
        f.queue("dept", quota={"a100": 12}, limit={"a100": 20}),
        f.queue("team-a", "dept", quota={"a100": 8}),
        f.queue("team-b", "dept", quota={"a100": 4}),
        f.queue("team-c", quota={"a100": 4}),
    ]
    jobs = [
        f.sim_job(
            f"j{i}",
            (i * 37) % 300,
            50 + (i * 53) % 400,
            ("team-a", "team-b", "team-c")[i % 3],
            gpus=(1, 2, 4, 8)[i % 4],
            workers=1 + (i % 5 == 0),
            cpus=(0, 4, 12)[i % 3],
            preemptible=i % 2 == 1,
        )
        for i in range(40)
    ]
    world = f.world(
        f.nodes("a100", 4, 8, cpus=32), queues, jobs, events=[f.node_down(100, "a100-2"), f.node_up(350, "a100-2")]
    )
    log = Simulation(world, policy, log_fair_share=False).run()
    got = analyse(world, log).idle_queues
    want = _oracle(world, log)
    assert sum(want.values()) > 0
    assert {q: w.gpu_seconds for q, w in got.items()} == pytest.approx(want)


def test_fractional_jobs_wait_with_room_on_a_shared_gpu() -> None:
    # One 1-GPU node. a holds 0.5 of GPU 0 from 0 to 100, b 0.25 of it from 0 to 50. w (a whole GPU) has no room
    # until both are gone (a GPU that fractional jobs share is not free for a whole-GPU job): it starts at 100,
    # no idle wait. c (0.5) has room from 50 (0.5 held, 0.5 free) to 100, when w takes the GPU whole: 0.5 x 50.
    world = f.world(
        f.nodes("a100", 1, 1),
        [f.queue("team-a", quota={"a100": 1})],
        [
            f.sim_job("a", 0, 100, gpus=0.5),
            f.sim_job("b", 0, 50, gpus=0.25),
            f.sim_job("w", 0, 50, gpus=1),
            f.sim_job("c", 0, 50, gpus=0.5),
        ],
    )
    log = _log(
        _ev(0, "started", "a", nodes={"a100-0": [0]}, fraction=0.5),
        _ev(0, "started", "b", nodes={"a100-0": [0]}, fraction=0.25),
        _ev(0, "submitted", "w"),
        _ev(0, "submitted", "c"),
        _ev(50, "completed", "b"),
        _ev(100, "completed", "a"),
        _ev(100, "started", "w", nodes={"a100-0": [0]}),
        _ev(150, "completed", "w"),
        _ev(150, "started", "c", nodes={"a100-0": [0]}, fraction=0.5),
        _ev(200, "completed", "c"),
    )
    w = analyse(world, log)
    assert w.idle.gpu_seconds == pytest.approx(25.0) and w.idle.jobs == 1 and w.idle.max_seconds == 50


def test_a_fraction_left_beside_a_whole_gpu_job_is_room_for_a_fraction_only() -> None:
    # One 2-GPU node: x holds 0.5 of GPU 0, whole holds GPU 1, from 0 to 100. f (0.5) could start on GPU 0: it
    # idle-waits 0.5 x 100; one (a whole GPU) has no room. A preempted fractional job's lost work is its fraction.
    world = f.world(
        f.nodes("a100", 1, 2),
        [f.queue("team-a", quota={"a100": 2})],
        [
            f.sim_job("x", 0, 100, gpus=0.5),
            f.sim_job("whole", 0, 100, gpus=1),
            f.sim_job("f", 0, 10, gpus=0.5),
            f.sim_job("one", 0, 10, gpus=1),
        ],
    )
    log = _log(
        _ev(0, "started", "x", nodes={"a100-0": [0]}, fraction=0.5),
        _ev(0, "started", "whole", nodes={"a100-0": [1]}),
        _ev(0, "submitted", "f"),
        _ev(0, "submitted", "one"),
        _ev(100, "preempted", "x", reason="priority", by="one"),
        _ev(100, "completed", "whole"),
        _ev(100, "started", "one", nodes={"a100-0": [0]}),
        _ev(100, "started", "f", nodes={"a100-0": [1]}, fraction=0.5),
    )
    w = analyse(world, log)
    assert w.idle.gpu_seconds == pytest.approx(50.0) and w.idle.jobs == 1
    assert w.preemption.preemptions == 1 and w.preemption.lost_gpu_seconds == pytest.approx(50.0)


def test_a_mig_job_waits_with_room_while_a_slice_of_its_profile_is_free() -> None:
    # One node with two 1g.10gb slices (and no whole GPU). m1 holds one slice from 0 to 100; m2 (1g.10gb) could
    # take the other but waits 0-100: its fraction (1/7, to a millionth) x 100. m3 asks for 3g.40gb, which the
    # node does not have: no room, no idle wait.
    world = f.world(
        [f.node("n-0", gpus=0, mig={"1g.10gb": 2})],
        [f.queue("team-a", quota={"a100": 0})],
        [
            f.sim_job("m1", 0, 100, mig="1g.10gb"),
            f.sim_job("m2", 0, 10, mig="1g.10gb"),
            f.sim_job("m3", 0, 10, mig="3g.40gb"),
        ],
    )
    log = _log(
        _ev(0, "started", "m1", nodes={"n-0": []}, fraction=0.142857, mig="1g.10gb"),
        _ev(0, "submitted", "m2"),
        _ev(0, "submitted", "m3"),
        _ev(100, "completed", "m1"),
        _ev(100, "started", "m2", nodes={"n-0": []}, fraction=0.142857, mig="1g.10gb"),
    )
    w = analyse(world, log)
    assert w.idle.gpu_seconds == pytest.approx(14.2857) and w.idle.jobs == 1
