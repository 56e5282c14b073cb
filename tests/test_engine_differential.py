"""The event-driven pass against the reference pass: on random worlds, the same event log, decision for decision.

Engine (scheduler/engine/engine.py) visits only the queues an event may have woken; ReferenceEngine
(scheduler/engine/reference.py) visits every queue with pending jobs at every pass. Small worlds come from the
property tests' strategy; crowded ones (many leaf queues, a saturated pool, sleepers, preemption in the middle
of a pass, the starvation guard, min_runtime) from a seeded generator, since the parked queues only matter when
many queues wait.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from quotas import QueueSpec, QueueTree
from scheduler.engine import NodeSpec, Settings
from scheduler.engine.model import JobSpec
from scheduler.engine.reference import ReferenceEngine
from scheduler.sim.inputs import SimJob, World
from scheduler.sim.runner import Simulation
from tests.factories import world
from tests.prop_model import NO_GUARD, PROPERTY, Case, cases, describe


def _log(w: World, reference: bool) -> dict[str, Any]:
    sim = Simulation(
        copy.deepcopy(w), "corral", log_fair_share=False, engine_type=ReferenceEngine if reference else None
    )
    log = sim.run()
    log["holds"] = [(h.at, h.job, h.starving, h.cause) for h in sim.holds or []]  # the guard's holds match too
    return log


def crowded(
    seed: int,
    n_nodes: int,
    n_teams: int,
    n_jobs: int,
    guard: float,
    min_runtime: float,
    mixed_priority: bool,
    gang: bool,
) -> World:
    """A saturated pool shared by many small teams under a few departments, jobs of many shapes."""
    rng = random.Random(seed)
    gpus = n_nodes * 8
    depts = max(1, n_teams // 8)
    quotas, left = [], gpus  # the teams' quotas add up to at most the pool
    for _ in range(n_teams):
        quotas.append(min(left, rng.choice([0, 1, 2, 4, 8])))
        left -= quotas[-1]
    specs = [QueueSpec(f"d{d}", quota={"h100": sum(quotas[d::depts])}) for d in range(depts)]
    for t, quota in enumerate(quotas):
        limit = {"h100": quota + 8} if rng.random() < 0.25 else {}
        specs.append(
            QueueSpec(f"t{t}", f"d{t % depts}", quota={"h100": quota}, limit=limit, weight=rng.choice([1, 2, 4]))
        )
    tree = QueueTree(specs, {"h100": gpus})
    shapes = [(1, 1), (1, 2), (1, 4), (1, 8)] + ([(2, 8), (3, 4)] if gang else [])
    jobs, t = [], 0.0
    for i in range(n_jobs):
        t += rng.expovariate(1 / 3)
        workers, g = rng.choice(shapes)
        spec = JobSpec(
            f"j{i}",
            f"t{rng.randrange(n_teams)}",
            "h100",
            gpus=g,
            workers=workers,
            priority=rng.choice([0, 0, 1, 2]) if mixed_priority else 0,
            preemptible=rng.random() < 0.9,
        )
        jobs.append(SimJob(spec, round(t, 1), float(rng.randint(5, 400))))
    nodes = [NodeSpec(f"n{i}", "h100", 8) for i in range(n_nodes)]
    return world(nodes, tree, jobs, [], Settings(min_runtime=min_runtime, starvation_timeout=guard))


@settings(PROPERTY, max_examples=300)
@given(cases(max_jobs=40))
def test_small_worlds_decide_alike(case: Case) -> None:
    note(describe(case.world))
    assert _log(case.world, reference=False) == _log(case.world, reference=True)


@settings(PROPERTY, max_examples=60)
@given(
    seed=st.integers(0, 10**6),
    n_nodes=st.integers(1, 6),
    n_teams=st.integers(4, 40),
    n_jobs=st.integers(20, 200),
    guard=st.sampled_from([NO_GUARD, 30.0, 120.0]),
    min_runtime=st.sampled_from([0.0, 0.0, 20.0]),
    mixed_priority=st.booleans(),
    gang=st.booleans(),
)
def test_crowded_worlds_decide_alike(
    seed: int,
    n_nodes: int,
    n_teams: int,
    n_jobs: int,
    guard: float,
    min_runtime: float,
    mixed_priority: bool,
    gang: bool,
) -> None:
    w = crowded(seed, n_nodes, n_teams, n_jobs, guard, min_runtime, mixed_priority, gang)
    assert _log(w, reference=False) == _log(w, reference=True)


@pytest.mark.slow  # a large world, replayed by both engines
def test_a_large_world_decides_alike() -> None:
    """Hundreds of queues, most of them parked at any time: the pass's skipping at full scale."""
    w = crowded(7, 40, 300, 2500, 300.0, 0.0, True, True)
    fast = _log(w, reference=False)
    assert fast == _log(w, reference=True)
    assert sum(e["event"] == "preempted" for e in fast["events"]) > 0
