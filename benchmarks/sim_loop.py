"""The simulator's own cost per event, the engine left out: its answers are recorded once, then replayed from a tape.

Usage: python benchmarks/sim_loop.py [--policy fifo] [--jobs 20000] [--nodes 1000] [--repeat 3]
Runs the engine_scale world (no cancellations or node events) once under the policy, recording every answer of the
engine; then times `Simulation.run()` `--repeat` times against a stand-in that hands back those answers in order,
so what is timed is the simulator's loop alone: its event heap, its handling of decisions and its log. Prints the
best run's CPU time per admission and the admissions per second the simulator alone would allow, and the time
the stand-in itself takes to hand back the whole tape (part of the runs' time, not the simulator's).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_scale import world

from scheduler.engine import Started
from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim.runner import Simulation

CALLS = ("submit", "finish", "cancel", "node_down", "node_up", "schedule", "next_wakeup")


@dataclass(slots=True)
class _Admitted:
    admitted: int


class Recorder:
    """Wraps an engine: every call of CALLS passes through, its answer (and each start's admission) recorded."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.tape: list[tuple[Any, list[int]]] = []
        for name in CALLS:
            setattr(self, name, self._recording(getattr(engine, name)))

    def _recording(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            starts = (
                [self.engine.jobs[d.job].admitted for d in out if isinstance(d, Started)]
                if isinstance(out, list)
                else []
            )
            self.tape.append((out, starts))
            return out

        return recorded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class Tape:
    """Stands in for the engine: answers each call with the recorded answer, in order."""

    def __init__(self, tape: list[tuple[Any, list[int]]], pools: Any, shares: dict[str, Any]):
        self._answers = iter(tape)
        self.jobs: dict[str, _Admitted] = {}
        self.pools = pools
        self._shares = shares
        for name in CALLS:
            setattr(self, name, self._answer)

    def _answer(self, *args: Any, **kwargs: Any) -> Any:
        out, starts = next(self._answers)
        if starts:
            for d, admitted in zip((d for d in out if isinstance(d, Started)), starts, strict=True):
                self.jobs[d.job] = _Admitted(admitted)
        return out

    def shares(self, pool: str) -> Any:
        return self._shares[pool]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", choices=POLICIES, default="fifo")
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    w = world(args.jobs, args.nodes)
    sim = Simulation(w, args.policy, log_fair_share=False)
    shares = {p: sim.engine.shares(p) for p in sim.engine.pools}
    recorder = Recorder(sim.engine)
    sim.engine = recorder  # type: ignore[assignment]
    reference = sim.run()
    starts = sum(1 for e in reference["events"] if e["event"] == "started")
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"{args.policy}, {args.jobs} jobs on {args.nodes} nodes: {starts} admissions, "
        f"{len(reference['events'])} events, {len(recorder.tape)} engine calls"
    )
    best = float("inf")
    for _ in range(args.repeat):
        sim = Simulation(w, args.policy, log_fair_share=False)
        sim.engine = Tape(recorder.tape, sim.engine.pools, shares)  # type: ignore[assignment]
        tune_gc()
        t0, c0 = time.perf_counter(), time.process_time()
        log = sim.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert log == reference, "the replay from the tape differs from the recorded run"
        best = min(best, cpu)
        print(f"  simulator alone: {cpu:.2f} s CPU ({wall:.2f} s wall), {cpu / starts * 1e6:.1f} us per admission")
    tape = Tape(recorder.tape, None, shares)
    c0 = time.process_time()
    for _ in recorder.tape:
        tape._answer()
    alone = time.process_time() - c0
    print(
        f"best: {best / starts * 1e6:.1f} us CPU per admission: {starts / best:,.0f} admissions/s "
        f"for the simulator's loop alone; of which the stand-in's answers {alone / starts * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
