"""The scaling table: engine_scale's world at 100, 1,000 and 10,000 queues x 1,000, 5,000 and 20,000 nodes.

Usage: python benchmarks/engine_grid.py [--policy corral] [--queues 100 1000 10000] [--nodes 1000 5000 20000]
                                        [--jobs 5000] [--max-cpu 60]
Each cell replays `--jobs` jobs of benchmarks/engine_scale.py's world (10 departments; the leaf queues split
evenly under them; quotas the capacity split evenly, so at 10,000 queues on 1,000 nodes a team's quota is 0 GPUs
and every job borrows; offered load 1.4x capacity) under `--policy`, and stops after `--max-cpu` seconds of
the process's CPU time in the replay (CPU, not wall time: on a shared machine the wall clock counts the others'
turns), reporting what it got so far (the "jobs in" column: submissions replayed before the stop). A capped cell
of a large cluster measures a cluster that is still filling up: read the table for how the cost grows, not as
the saturated rate. Per cell: admissions/s over wall and over CPU time (the machine may be shared), and the
CPU time of each `schedule()` call (one per instant; the garbage collector's pauses inside it included).
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

from engine_scale import world

from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim.runner import Simulation

DEPTS = 10


class _Stop(Exception):
    """The cell's CPU-time cap is reached: the replay stops there."""


def cell(policy: str, queues: int, nodes: int, jobs: int, max_cpu: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    w = world(jobs, nodes, depts=DEPTS, teams=max(1, queues // DEPTS))
    sim = Simulation(w, policy, log_fair_share=False)
    setup = time.perf_counter() - t0
    tune_gc()
    engine = sim.engine
    inner = engine.schedule
    latencies: list[float] = []

    def timed(now: float) -> list[Any]:
        if time.process_time() > deadline:
            raise _Stop
        c = time.thread_time()
        out: list[Any] = inner(now)
        latencies.append(time.thread_time() - c)
        return out

    engine.schedule = timed  # type: ignore[method-assign]
    started, cpu0 = time.perf_counter(), time.process_time()
    deadline = cpu0 + max_cpu
    stopped = False
    try:
        sim.run()
    except _Stop:
        stopped = True
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    starts = sum(1 for e in sim.events if e["event"] == "started")
    submitted = len(engine.jobs)
    lat = sorted(latencies) or [0.0]
    return {
        "queues": len(w.tree.leaves),
        "nodes": nodes,
        "jobs": submitted,
        "stopped": stopped,
        "setup": setup,
        "wall": wall,
        "cpu": cpu,
        "starts": starts,
        "calls": len(latencies),
        "p50": lat[len(lat) // 2],
        "p99": lat[int(len(lat) * 0.99)],
        "max": lat[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", choices=POLICIES, default="corral")
    ap.add_argument("--queues", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1_000, 5_000, 20_000])
    ap.add_argument("--jobs", type=int, default=5_000, help="jobs per cell")
    ap.add_argument("--max-cpu", type=float, default=60.0, help="CPU seconds of replay per cell before it stops")
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"policy {args.policy}, at most {args.jobs} jobs and {args.max_cpu:g} CPU s of replay per cell"
    )
    print(
        "| queues | nodes | jobs in | admissions | wall s | CPU s | adm/s (wall) | adm/s (CPU) | schedule() calls "
        "| p50 ms | p99 ms | max ms | setup s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for q in args.queues:
        for n in args.nodes:
            r = cell(args.policy, q, n, args.jobs, args.max_cpu)
            jobs_in = f"{r['jobs']}{' (stopped)' if r['stopped'] else ''}"
            print(
                f"| {r['queues']:,} | {n:,} | {jobs_in} | {r['starts']:,} | {r['wall']:.1f} | {r['cpu']:.1f} "
                f"| {r['starts'] / r['wall']:,.0f} | {r['starts'] / max(r['cpu'], 1e-9):,.0f} | {r['calls']:,} "
                f"| {r['p50'] * 1e3:.3f} | {r['p99'] * 1e3:.3f} | {r['max'] * 1e3:.1f} | {r['setup']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
