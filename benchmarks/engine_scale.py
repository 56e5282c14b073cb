"""Engine at scale: 1,000 nodes x 8 GPUs, 1,000 leaf queues under 10 departments, 50,000 saturating jobs.

Usage: python benchmarks/engine_scale.py [--jobs N] [--nodes N] [--min-runtime S] [--reference] [--profile | --digest]
Prints admissions per second over the whole replay and the time the engine takes to decide after one event (with
and without the garbage collector's pauses inside it);
--digest prints the SHA-256 of the replay's event log instead, to check that a change to the engine changes no
decision (run it before and after). --reference replays with ReferenceEngine (the pass before it was event-driven,
scheduler/engine/reference.py), to compare the two side by side: same digest, different speed.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import hashlib
import json
import platform
import pstats
import random
import statistics
import sys
import time

from quotas import QueueSpec, QueueTree
from scheduler.engine import NodeSpec, Settings
from scheduler.engine.model import JobSpec
from scheduler.engine.reference import ReferenceEngine
from scheduler.gc_tuning import tune_gc
from scheduler.sim.inputs import SimJob, World
from scheduler.sim.runner import Simulation

SIZES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8)]  # (workers, gpus): 1 to 16 GPUs
WEIGHTS = [0.4, 0.2, 0.2, 0.15, 0.05]


def world(n_jobs: int, n_nodes: int, depts: int = 10, teams: int = 100, seed: int = 7) -> World:
    rng = random.Random(seed)
    gpus = n_nodes * 8
    nodes = [NodeSpec(f"h100-{i}", "h100", 8) for i in range(n_nodes)]
    specs = []
    for d in range(depts):
        specs.append(QueueSpec(f"dept-{d}", quota={"h100": gpus // depts}))
        for t in range(teams):
            specs.append(
                QueueSpec(
                    f"team-{d}-{t}",
                    f"dept-{d}",
                    quota={"h100": gpus // depts // teams},
                    weight=rng.choice([1, 1, 2, 4]),
                )
            )
    tree = QueueTree(specs, {"h100": gpus})
    # Offered load ~1.4x capacity: the cluster stays saturated and a backlog builds.
    mean_gpus = sum(w * g * n for (w, g), n in zip(SIZES, WEIGHTS, strict=True))
    mean_dur = 1850.0
    rate = 1.4 * gpus / (mean_gpus * mean_dur)
    t, jobs = 0.0, []
    for i in range(n_jobs):
        t += rng.expovariate(rate)
        workers, g = rng.choices(SIZES, WEIGHTS)[0]
        team = f"team-{rng.randrange(depts)}-{rng.randrange(teams)}"
        spec = JobSpec(f"j{i}", team, "h100", gpus=g, workers=workers, priority=rng.choice([0, 0, 0, 1]))
        jobs.append(SimJob(spec, round(t, 1), rng.uniform(100, 3600)))
    return World(nodes, {}, tree, Settings(), jobs=jobs)


def simulation(w: World, reference: bool) -> Simulation:
    """The corral policy's replay, with the reference pass in place of the event-driven one when asked."""
    return Simulation(w, "corral", log_fair_share=False, engine_type=ReferenceEngine if reference else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--min-runtime", type=float, default=0.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--digest", action="store_true")
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    w = world(args.jobs, args.nodes)
    w = dataclasses.replace(w, settings=dataclasses.replace(w.settings, min_runtime=args.min_runtime))
    tune_gc()  # as `corral sim trace` does once its inputs are loaded
    if args.digest:
        log = simulation(w, args.reference).run()
        print(hashlib.sha256(json.dumps(log, sort_keys=True).encode()).hexdigest(), len(log["events"]), "events")
        return
    sim = simulation(w, args.reference)
    engine = sim.engine
    latencies: list[float] = []
    without_gc: list[float] = []  # the same, less the garbage collector's pauses inside the call
    pauses: list[float] = []
    inner = engine.schedule

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            pauses.append(-time.perf_counter())
        else:
            pauses[-1] += time.perf_counter()

    def timed(now: float) -> list:  # type: ignore[type-arg]
        n, t0 = len(pauses), time.perf_counter()
        out = inner(now)
        latencies.append(time.perf_counter() - t0)
        without_gc.append(latencies[-1] - sum(pauses[n:]))
        if len(latencies) % 5000 == 0:
            print(
                f"  ... t={now:.0f} s simulated, {len(latencies)} decisions, "
                f"{time.perf_counter() - started:.0f} s wall",
                file=sys.stderr,
                flush=True,
            )
        return out

    engine.schedule = timed  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)
    prof = cProfile.Profile() if args.profile else None
    t0 = started = time.perf_counter()
    if prof:
        prof.enable()
    log = sim.run()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    starts = sum(1 for e in log["events"] if e["event"] == "started")
    preempt = sum(1 for e in log["events"] if e["event"] == "preempted")
    lat = sorted(latencies)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{args.nodes} nodes x 8 GPUs, {len(w.tree.leaves)} leaf queues, {args.jobs} jobs")
    print(
        f"replay wall time {wall:.1f} s; {starts} admissions ({preempt} preemptions): "
        f"{starts / wall:.0f} admissions/s end to end"
    )
    print(
        f"engine.schedule after each instant: {len(lat)} calls, mean {statistics.mean(lat) * 1e3:.2f} ms, "
        f"p50 {lat[len(lat) // 2] * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms, "
        f"max {lat[-1] * 1e3:.1f} ms; engine share of wall time {sum(lat) / wall:.0%}"
    )
    bare = sorted(without_gc)
    print(
        f"garbage collection over the whole replay: {len(pauses)} collections, {sum(pauses):.1f} s, longest pause "
        f"{max(pauses, default=0) * 1e3:.1f} ms; decisions less its pauses: "
        f"p99 {bare[int(len(bare) * 0.99)] * 1e3:.2f} ms, max {bare[-1] * 1e3:.1f} ms"
    )
    print(
        f"decisions over the 10 ms goal: {sum(1 for x in lat if x > 0.01)} of {len(lat)}, "
        f"{sum(1 for x in bare if x > 0.01)} less the collector's pauses"
    )
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
