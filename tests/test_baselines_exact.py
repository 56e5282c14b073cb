"""las with its shortcuts off decides the same: random worlds give the same event log (Philly's digest: at scale)."""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

from hypothesis import given, note, settings

from scheduler.engine.baselines import LasEngine
from scheduler.engine.decisions import Decision
from scheduler.engine.model import Job
from scheduler.engine.state import PoolState
from scheduler.sim import runner
from scheduler.sim.inputs import World
from scheduler.sim.runner import Simulation
from tests.factories import nodes, queue, sim_job, world
from tests.prop_model import PROPERTY, Case, cases, describe


class LasAsStated(LasEngine):
    """LasEngine as its docstring states it, with none of its shortcuts: every waiting job is tried in each fill,
    every running job is banded and sorted, every waiting job may displace, and the next band crossing is the
    least over all running jobs."""

    def _first_crossing(self, ps: PoolState, now: float) -> float | None:
        crossings = [self._crossing(j, now) for js in ps.running.values() for j in js if j.request > 0]
        return min((c for c in crossings if c is not None), default=None)

    def _fill(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        i = 0
        while i < len(ps.arrivals):
            j: Job = ps.arrivals[i]
            nodes = None
            if ps.over_limit(self.tree[j.spec.queue], j.request) is None:
                nodes = ps.pool.place(j.spec)
            if nodes is None:
                i += 1
            else:
                out.append(self._start(ps, j, nodes, now))

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        self._fill(ps, now, out)
        running = [j for js in ps.running.values() for j in js]
        band = {j.id: self._band(self._service(j, now)) for j in running}
        victims = sorted(
            (j for j in running if j.spec.preemptible and not self._young(j, now)),
            key=lambda j: (-band[j.id], -j.submit, -j.seq),
        )
        for w in list(ps.arrivals):
            # What one waiting job takes is LasEngine._displace itself: the shortcuts are in which jobs get there.
            self._displace(ps, w, self._band(self._attained.get(w.id, 0.0)), victims, band, now, out)


def _las_as_stated(name: str, *args: Any) -> LasAsStated:
    assert name == "las"
    return LasAsStated(*args)


def _simulation(w: World, stated: bool) -> Simulation:
    if not stated:
        return Simulation(copy.deepcopy(w), "las", log_fair_share=False)
    with mock.patch.object(runner, "make_policy", _las_as_stated):
        return Simulation(copy.deepcopy(w), "las", log_fair_share=False)


# Bands the random worlds reach (their jobs run at most 120 s on at most 8 GPUs each, under 1 GPU-hour).
SMALL_BANDS = (60.0, 300.0)


@settings(PROPERTY, max_examples=300)
@given(cases(max_jobs=30))
def test_las_shortcuts_never_change_a_decision(case: Case) -> None:
    note(describe(case.world))
    with mock.patch.object(LasEngine, "bands", SMALL_BANDS):
        assert _simulation(case.world, stated=True).run() == _simulation(case.world, stated=False).run()


def test_las_with_preemption_matches_and_runs_the_reference() -> None:
    """A world where las preempts (a long job passes 1 GPU-hour while a short one waits): both logs agree, and the
    reference is what the patched simulation runs."""
    w = world(
        nodes("a100", 1, 1),
        [queue("team-a")],
        [sim_job("long", submit=0, duration=7200), sim_job("short", submit=60, duration=60)],
    )
    stated = _simulation(w, stated=True)
    assert isinstance(stated.engine, LasAsStated)
    log = stated.run()
    assert [e["event"] for e in log["events"] if e["job"] == "long"].count("preempted") == 1
    assert log == _simulation(w, stated=False).run()
