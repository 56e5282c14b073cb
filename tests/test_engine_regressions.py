"""Regressions for engine bugs found by the property tests (tests/test_properties.py), each with its minimal repro."""

from __future__ import annotations

from typing import Any

import pytest

from quotas import QueueSpec, fair_shares
from scheduler.engine import Engine, JobState, NodeSpec, Settings, Started
from scheduler.sim.inputs import SimJob, World
from scheduler.sim.runner import Simulation
from tests.factories import job, nodes, queue, queue_tree, sim_job, tree, world
from tests.prop_model import NO_GUARD

# ===================================================================== engine bugs found by the properties
# Regressions for the ones fixed (all of them, now), each with the minimal repro the properties shrank to.


def _run(ns: list[NodeSpec], qs: list[QueueSpec], jobs: list[SimJob]) -> dict[str, JobState]:
    sim = Simulation(world(ns, qs, jobs, settings=Settings(starvation_timeout=NO_GUARD)), log_fair_share=False)
    sim.run()
    return {j: x.state for j, x in sim.engine.jobs.items()}


def test_never_runs_rejected_non_preemptible_over_quota() -> None:
    """Jobs: 'A job that can never run is rejected at submission': a non-preemptible job asking more than its
    leaf's quota never passes the guarantee rule (found by the properties; fixed in ff8558b)."""
    ns = nodes("a100", 1, 8)
    states = _run(
        ns, [queue("team-a", quota={"a100": 2})], [sim_job("nb", submit=0, duration=10, gpus=4, preemptible=False)]
    )
    assert states["nb"] is JobState.REJECTED


def test_never_runs_rejected_gang_that_cannot_be_placed() -> None:
    """3 workers x 2 GPUs on two 3-GPU nodes: each worker fits a node and 6 GPUs fit the pool, but a node holds
    only one worker, so the gang can never be placed and is rejected (fixed in ff8558b)."""
    ns = nodes("a100", 2, 3)
    states = _run(ns, [queue("team-a")], [sim_job("g", submit=0, duration=10, workers=3, gpus=2)])
    assert states["g"] is JobState.REJECTED


def _events(w: World) -> list[dict[str, Any]]:
    return [e for e in Simulation(w, log_fair_share=False).run()["events"] if e["event"] != "submitted"]


def test_guard_head_that_never_runs_blocks_queue_forever() -> None:
    """Regression: before such jobs were rejected, 'big' (never admissible) became the starving head, and its
    reservation held back every younger job of its queue forever ('late' never started on an idle node)."""
    w = world(
        nodes("a100", 1, 8),
        [queue("team-a", quota={"a100": 2})],
        [
            sim_job("big", submit=0, duration=10, gpus=4, preemptible=False),  # never passes the guarantee rule
            sim_job("small", submit=0, duration=10, gpus=1),  # starts past 'big' at t=0: its starvation clock runs
            sim_job("late", submit=700, duration=10, gpus=1),  # the node is idle from t=10 on
        ],
        settings=Settings(starvation_timeout=600),
    )
    events = _events(w)
    assert {"t": 0, "event": "rejected", "job": "big"} in [{k: e[k] for k in ("t", "event", "job")} for e in events]
    assert {"t": 700, "event": "started", "job": "late", "nodes": {"a100-0": [0]}} in events


def test_guard_lifted_mid_pass_retries_skipped_queues() -> None:
    w = world(
        nodes("a100", 2, 4),
        [queue("alpha"), queue("beta", quota={"a100": 8}), queue("zeta")],
        [
            sim_job("L", 0, 50, queue="beta", gpus=4, preemptible=False),  # a100-0 until t=50
            sim_job("M", 0, 1000, queue="beta", gpus=4, preemptible=False),  # a100-1 until t=1000
            sim_job("H", 1, 500, queue="zeta", gpus=2),  # waits for GPUs
            sim_job("Y", 2, 1, queue="beta", gpus=0, preemptible=False),  # starts past H: H's clock starts at t=2
            sim_job("X", 20, 100, queue="alpha", gpus=1),  # H's reservation (from t=12) holds a100-0 against it
        ],
        settings=Settings(starvation_timeout=10),
    )
    events = _events(w)
    assert {"t": 50, "event": "started", "job": "H", "nodes": {"a100-0": [0, 1]}} in events
    assert {"t": 50, "event": "started", "job": "X", "nodes": {"a100-0": [2]}} in events


def test_skipped_queue_retried_after_later_start_in_pass() -> None:
    w = world(
        nodes("a100", 2, 4),
        [queue("A", weight=1), queue("B", weight=3), queue("C", quota={"a100": 1})],
        [
            sim_job("O", 0, 1000, queue="A", gpus=4),  # a100-0
            sim_job("X", 0, 1000, queue="C", gpus=1, preemptible=False),  # a100-1, within C's quota
            sim_job("J", 10, 100, queue="B", gpus=4),  # needs a whole node; fair shares: A 3, B 4, C 1
            sim_job("K", 10, 1000, queue="A", gpus=3, priority=1),  # fits the rest of a100-1
        ],
        settings=Settings(starvation_timeout=NO_GUARD),
    )
    events = _events(w)
    assert {"t": 10, "event": "started", "job": "K", "nodes": {"a100-1": [1, 2, 3]}} in events
    assert {"t": 10, "event": "started", "job": "J", "nodes": {"a100-0": [0, 1, 2, 3]}} in events


def test_zero_weight_child_gets_what_weighted_children_leave() -> None:
    t = queue_tree(queue("a", weight=1), queue("b", weight=0), gpus=8)
    assert fair_shares(t, "a100", 8, {"a": 0, "b": 10}) == pytest.approx({"a": 0, "b": 8})
    assert fair_shares(t, "a100", 8, {"a": 2, "b": 10}) == pytest.approx({"a": 2, "b": 6})


# ===================================================================== fractional CPUs (found in review)


def _started(ns: list[NodeSpec], jobs: list[SimJob]) -> dict[str, tuple[float, dict[str, list[int]]]]:
    qs = [queue("team-a", quota={"a100": sum(n.gpus for n in ns)})]
    w = world(ns, qs, jobs, settings=Settings(starvation_timeout=NO_GUARD))
    return {e["job"]: (e["t"], e["nodes"]) for e in _events(w) if e["event"] == "started"}


def test_a_node_its_jobs_left_holds_a_job_of_its_full_cpus() -> None:
    """2.0 - 0.1 - 0.3 - 0.2 - 0.7, then the same added back, is 1.9999999999999998 in floats: 'J' (all 2.0 CPUs)
    waited forever on the idle node. Free CPUs and memory are now kept to a millionth (cluster.exact)."""
    ns = nodes("a100", 1, 4, cpus=2.0, names="x")
    jobs = [sim_job(f"j{i}", submit=0, duration=10 * (i + 1), cpus=c) for i, c in enumerate([0.1, 0.3, 0.2, 0.7])]
    started = _started(ns, [*jobs, sim_job("J", submit=1, duration=10, gpus=4, cpus=2.0)])
    assert started["J"] == (40, {"x": [0, 1, 2, 3]})


def test_a_gang_of_tenths_of_a_cpu_fills_a_node() -> None:
    """20 workers of 0.1 CPUs fit a 2.0-CPU node, but 2.0 // 0.1 is 19.0: the gang was rejected as never fitting."""
    ns = nodes("a100", 1, 4, cpus=2.0, names="x")
    started = _started(ns, [sim_job("g", submit=0, duration=10, gpus=0, cpus=0.1, workers=20)])
    assert started["g"] == (0, {"x": []})


def test_prune_puts_a_kept_victim_back_exactly() -> None:
    """Pruning drops A, B and E (latest taken first), finds 'J' needs each, and puts it back. Adding 0.1 CPUs back
    after taking them away left less than before, so the placement made before those drops no longer fitted, and
    the prune pass failed its assertion (the service's scheduling loop would have died). CPUs and memory now count
    in millionths (model.exact), so putting a victim back restores exactly what it found."""
    ns = [*nodes("a100", 1, 4, cpus=2.0, names="x"), *nodes("a100", 1, 4, names="y")]
    jobs = [
        sim_job("W", submit=0, duration=1000, gpus=3, cpus=3.0, priority=20),  # only y has the CPUs
        sim_job("Cv", submit=1, duration=1000, priority=1),  # y's last GPU
        sim_job("Z", submit=2, duration=1000, cpus=0.5, priority=2),
        sim_job("E", submit=3, duration=1000, cpus=0.2),
        sim_job("B", submit=4, duration=1000, cpus=0.1),
        sim_job("A", submit=5, duration=1000, cpus=0.1),
        sim_job("J", submit=6, duration=100, gpus=4, cpus=2.0, priority=10),
    ]
    assert _started(ns, jobs)["J"] == (6, {"x": [0, 1, 2, 3]})


def test_factories_round_trip() -> None:
    """The builders produce what the engine expects (a smoke test for tests/factories.py)."""
    ns = nodes("a100", 4, 8, cpus=64, domains={"d0": [0, 1], "d1": [2, 3]})
    t = tree([queue("dept", quota={"a100": 16}), queue("team-a", "dept", quota={"a100": 8})], ns)
    eng = Engine(t, ns, {"a100": {"d0": ["a100-0", "a100-1"], "d1": ["a100-2", "a100-3"]}})
    assert eng.submit(job("x", workers=2, gpus=8), 0) == []
    out = eng.schedule(0)
    assert len(out) == 1 and isinstance(out[0], Started)
    assert sorted(out[0].placement) in (["a100-0", "a100-1"], ["a100-2", "a100-3"])
