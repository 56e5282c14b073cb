"""Replay the 82,247-job Philly trace under each policy and time it (the goal: at most 30 s per policy).

Usage: python benchmarks/philly_replay.py [--policy NAME ...] [--cluster philly|demand60] [--limit N] [--digest]
--digest adds the SHA-256 of each policy's event log, to check that a change to a policy changes no decision.
Imports ../shared/traces/philly/philly.csv with the Philly importer, replays it on examples/philly-cluster.yaml
(--cluster philly, the default: 96 nodes x 8 GPUs, quotas adding up to the capacity) or on
examples/philly-demand60.yaml (--cluster demand60: 60 nodes x 8 GPUs, quotas adding up to 0.9 x the capacity;
examples/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim import importers
from scheduler.sim.inputs import load_cluster, load_trace
from scheduler.sim.runner import Simulation

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "traces" / "philly" / "philly.csv"
CLUSTERS = {"philly": "philly-cluster.yaml", "demand60": "philly-demand60.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", action="append", choices=POLICIES)
    ap.add_argument("--cluster", choices=CLUSTERS, default="philly")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--trace", type=Path, default=Path("/tmp/corral-philly.csv"))
    ap.add_argument("--digest", action="store_true")
    args = ap.parse_args()
    rows = importers.import_trace("philly", SOURCE, importers.ImportOptions("philly", 8))
    importers.write_trace(rows, args.trace)
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}; {len(rows)} jobs; "
        f"cluster examples/{CLUSTERS[args.cluster]}"
    )
    for policy in args.policy or POLICIES:
        world = load_cluster(ROOT / "examples" / CLUSTERS[args.cluster])
        world.jobs = load_trace(args.trace)[: args.limit]
        tune_gc()  # as `corral sim trace` does once its inputs are loaded
        t0, c0 = time.perf_counter(), time.process_time()
        log = Simulation(world, policy, log_fair_share=False).run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        done = sum(1 for e in log["events"] if e["event"] == "completed")
        pre = sum(1 for e in log["events"] if e["event"] == "preempted")
        digest = hashlib.sha256(json.dumps(log, sort_keys=True).encode()).hexdigest() if args.digest else ""
        # CPU time beside wall time: on a shared machine the wall time counts the other processes' turns too.
        print(
            f"{policy:13s} {wall:7.1f} s ({cpu:.1f} s CPU)  {done} completed, {pre} preemptions, "
            f"{len(log['events'])} events {digest}",
            flush=True,
        )


if __name__ == "__main__":
    main()
