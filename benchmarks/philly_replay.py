"""Replay the 82,247-job Philly trace under each policy and time it (the goal: at most 60 s per policy).

Usage: python benchmarks/philly_replay.py [--policy NAME ...] [--limit N] [--digest]
--digest adds the SHA-256 of each policy's event log, to check that a change to a policy changes no decision.
Imports ../shared/traces/philly/philly.csv with the Philly importer, replays it on examples/philly-cluster.yaml.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", action="append", choices=POLICIES)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--trace", type=Path, default=Path("/tmp/corral-philly.csv"))
    ap.add_argument("--digest", action="store_true")
    args = ap.parse_args()
    rows = importers.import_trace("philly", SOURCE, importers.ImportOptions("philly", 8))
    importers.write_trace(rows, args.trace)
    print(f"machine: {platform.machine()}, python {platform.python_version()}; {len(rows)} jobs")
    for policy in args.policy or POLICIES:
        world = load_cluster(ROOT / "examples" / "philly-cluster.yaml")
        world.jobs = load_trace(args.trace)[: args.limit]
        tune_gc()  # as `corral sim trace` does once its inputs are loaded
        t0 = time.perf_counter()
        log = Simulation(world, policy, log_fair_share=False).run()
        wall = time.perf_counter() - t0
        done = sum(1 for e in log["events"] if e["event"] == "completed")
        pre = sum(1 for e in log["events"] if e["event"] == "preempted")
        digest = hashlib.sha256(json.dumps(log, sort_keys=True).encode()).hexdigest() if args.digest else ""
        print(f"{policy:13s} {wall:7.1f} s  {done} completed, {pre} preemptions, {len(log['events'])} events "
              f"{digest}", flush=True)


if __name__ == "__main__":
    main()
