"""Issue 27: unallocated GPUs while jobs wait, and mean wait, under best fit and under Corral's placement of fractions.

Usage: python benchmarks/fragmentation.py [--seed N ...] [--jobs N] [--nodes N] [--load X] [--fraction-share X]
                                          [--starvation-timeout S] [--policy NAME ...] [--dir DIR]
For each seed (default 1, 2, 3), writes the `sharing` trace of scheduler/sim/sharing.py and its cluster to DIR
(default /tmp/corral-fragmentation), which `corral sim generate sharing --seed N` writes byte for byte alike, and
replays it under each policy (default: best-fit-fractions, corral). Prints markdown: the machine, one row per seed
and policy (mean and p95 wait, utilisation, unallocated GPUs while jobs wait: mean, share of capacity, partial and
stranded parts), then the means over the seeds. Each row names the SHA-256 of the trace and of the event log, as
`corral sim trace TRACE --cluster CLUSTER --policy P --json | sha256sum` prints them, so a rerun can be checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim import fragmentation
from scheduler.sim.inputs import load_cluster, load_trace
from scheduler.sim.metrics import compute
from scheduler.sim.runner import Simulation
from scheduler.sim.sharing import SharingConfig, sharing

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICIES = ("best-fit-fractions", "corral")


@dataclass
class Row:
    seed: int
    policy: str
    mean_wait: float
    p95_wait: float
    utilisation: float
    unallocated: float  # mean unallocated GPUs while jobs wait
    share: float  # of the capacity, over that time
    partial: float  # part of the unallocated GPU-seconds on shared GPUs
    stranded: float  # part of them while a waiting job asked for no more than was unallocated
    waiting_hours: float
    preemptions: int
    cpu: float
    trace_sha: str
    log_sha: str


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    label = commit.stdout.strip() or os.environ.get("CORRAL_COMMIT", "?")  # a `git archive` copy has no .git
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}, {model}; Python "
        f"{platform.python_version()}; commit {label}; load average {load:.1f}"
    )


def replay(seed: int, policy: str, config: SharingConfig, where: Path) -> Row:
    trace, cluster = where / f"sharing-{seed}.csv", where / f"sharing-{seed}.yaml"
    sharing(config).write(trace, cluster)
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    tune_gc()  # as `corral sim trace` does once its inputs are loaded
    c0 = time.process_time()
    log = Simulation(world, policy).run()  # with the fair-share log, as `corral sim trace --json` writes it
    cpu = time.process_time() - c0
    text = json.dumps(log, separators=(",", ":")) + "\n"
    m = compute(world.jobs, log, sum(n.gpus for n in world.nodes)).overall
    frag = fragmentation.compute(log, world.nodes, world.jobs, world.events)
    return Row(
        seed,
        policy,
        m.mean_wait,
        m.p95_wait,
        m.utilisation,
        frag.mean_unallocated,
        frag.unallocated_share,
        frag.partial_share,
        frag.stranded_share,
        frag.wait_seconds / 3600,
        m.preemptions,
        cpu,
        hashlib.sha256(trace.read_bytes()).hexdigest()[:12],
        hashlib.sha256(text.encode()).hexdigest()[:12],
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, action="append")
    ap.add_argument("--jobs", type=int, default=SharingConfig.jobs)
    ap.add_argument("--nodes", type=int, default=SharingConfig.nodes)
    ap.add_argument("--load", type=float, default=SharingConfig.load)
    ap.add_argument("--fraction-share", type=float, default=SharingConfig.fraction_share)
    ap.add_argument("--starvation-timeout", type=float, default=SharingConfig.starvation_timeout)
    ap.add_argument("--policy", action="append", choices=POLICIES)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/corral-fragmentation"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    policies = args.policy or list(DEFAULT_POLICIES)
    print(f"machine: {machine()}\n", flush=True)
    rows: list[Row] = []
    for seed in args.seed or [1, 2, 3]:
        config = SharingConfig(
            seed=seed,
            jobs=args.jobs,
            nodes=args.nodes,
            load=args.load,
            fraction_share=args.fraction_share,
            starvation_timeout=args.starvation_timeout,
        )
        for policy in policies:
            rows.append(replay(seed, policy, config, args.dir))
            r = rows[-1]
            print(f"seed {seed} {policy}: {r.cpu:.1f} s CPU, log {r.log_sha}", flush=True)
    header = ["seed", "policy", "mean wait (s)", "p95 wait (s)", "utilisation", "unallocated GPUs while jobs wait"]
    header += ["share of capacity", "partial", "stranded", "hours with a job waiting", "preemptions", "trace"]
    lines = table(
        [*header, "event log"],
        [
            [
                str(r.seed),
                r.policy,
                f"{r.mean_wait:,.0f}",
                f"{r.p95_wait:,.0f}",
                f"{r.utilisation:.1%}",
                f"{r.unallocated:.2f}",
                f"{r.share:.1%}",
                f"{r.partial:.1%}",
                f"{r.stranded:.1%}",
                f"{r.waiting_hours:.1f}",
                str(r.preemptions),
                r.trace_sha,
                r.log_sha,
            ]
            for r in rows
        ],
    )
    means = []
    for p in policies:
        mine = [r for r in rows if r.policy == p]
        means.append(
            [
                p,
                f"{statistics.fmean(r.mean_wait for r in mine):,.0f}",
                f"{statistics.fmean(r.unallocated for r in mine):.2f}",
                f"{statistics.fmean(r.share for r in mine):.1%}",
                f"{statistics.fmean(r.partial for r in mine):.1%}",
                f"{statistics.fmean(r.stranded for r in mine):.1%}",
            ]
        )
    lines += ["", f"Means over {len(rows) // max(1, len(policies))} seed(s):", ""]
    lines += table(
        ["policy", "mean wait (s)", "unallocated GPUs while jobs wait", "share", "partial", "stranded"], means
    )
    if len(policies) == 2:
        lines += ["", *paired(rows, policies[0], policies[1])]
    print("\n".join(lines))


def paired(rows: Sequence[Row], a: str, b: str) -> list[str]:
    """Per seed, b - a (the same trace under both): the mean difference, its standard error, and how many seeds
    b was lower on, for unallocated GPUs while jobs wait and for mean wait."""
    by = {(r.seed, r.policy): r for r in rows}
    seeds = sorted({r.seed for r in rows})
    out = [f"Paired, {b} - {a} over {len(seeds)} seed(s) (mean, standard error; seeds where {b} is lower):"]
    for name, attr in (("unallocated GPUs", "unallocated"), ("mean wait (s)", "mean_wait")):
        d: list[float] = [getattr(by[s, b], attr) - getattr(by[s, a], attr) for s in seeds]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        out.append(f"- {name}: {statistics.fmean(d):+.2f} +- {se:.2f}; lower on {sum(x < 0 for x in d)}/{len(d)}")
    return out


if __name__ == "__main__":
    main()
