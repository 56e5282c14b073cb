"""Issue 20 before/after: waits with idle GPUs, starvation-guard holds and preemptions lost for nothing, per policy.

Usage: python benchmarks/guard_waits.py [--seed N] [--policy NAME ...] [--trace T.csv --cluster C.yaml | --philly]
                                        [--limit N]
Default: the `services` trace of scheduler/sim/generate.py (seed 1: six teams, non-preemptible services beside
preemptible batch jobs, a mostly idle cluster), written to /tmp. --trace/--cluster replay another trace; --philly
imports ../shared/traces/philly/philly.csv as benchmarks/philly_replay.py does, on examples/philly-cluster.yaml.
Prints markdown: one row per policy, then idle-wait GPU-hours and guard holds per queue.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim import generate, importers
from scheduler.sim.inputs import World, load_cluster, load_trace
from scheduler.sim.metrics import Metrics, compute
from scheduler.sim.runner import Simulation
from scheduler.sim.waste import HOLD_CAUSES, Waste, analyse

ROOT = Path(__file__).resolve().parent.parent
PHILLY = ROOT.parent / "shared" / "traces" / "philly" / "philly.csv"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def num(x: float) -> str:
    return f"{x:.1f}" if 0 < abs(x) < 10 else f"{x:,.0f}"


def commit() -> str:
    """The commit measured, and whether the working tree differs from it (the engine may be mid-change)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "scheduler", "quotas")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")


def inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.philly:
        rows = importers.import_trace("philly", PHILLY, importers.ImportOptions("philly", 8))
        importers.write_trace(rows, "/tmp/corral-philly.csv")
        return Path("/tmp/corral-philly.csv"), ROOT / "examples" / "philly-cluster.yaml"
    if args.trace or args.cluster:
        if not (args.trace and args.cluster):
            raise SystemExit("--trace and --cluster go together")
        return args.trace, args.cluster
    trace, cluster = Path(f"/tmp/corral-services-{args.seed}.csv"), Path(f"/tmp/corral-services-{args.seed}.yaml")
    generate.services(generate.ServicesConfig(seed=args.seed)).write(trace, cluster)
    return trace, cluster


def replay(trace: Path, cluster: Path, policy: str, limit: int | None) -> tuple[World, Metrics, Waste, float]:
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)[:limit]
    tune_gc()
    t0 = time.perf_counter()
    sim = Simulation(world, policy, log_fair_share=False)
    log = sim.run()
    wall = time.perf_counter() - t0
    return world, compute(world.jobs, log, sum(n.gpus for n in world.nodes)), analyse(world, log, sim.holds), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", action="append", choices=POLICIES)
    ap.add_argument("--trace", type=Path)
    ap.add_argument("--cluster", type=Path)
    ap.add_argument("--philly", action="store_true")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    trace, cluster = inputs(args)
    policies = args.policy or list(POLICIES)
    print(f"commit {commit()}; {platform.machine()}, python {platform.python_version()}; {trace} on {cluster}\n")
    rows, per_queue = [], []
    for policy in policies:
        world, m, w, wall = replay(trace, cluster, policy, args.limit)
        o, h, p = m.overall, w.holds, w.preemption
        rows.append(
            [
                policy,
                str(o.jobs),
                str(o.rejected),
                num(o.mean_wait),
                num(o.p99_wait),
                f"{max(o.waits, default=0) / 86400:.2f}",
                num(o.mean_jct),
                num(w.idle.gpu_seconds / 3600),
                num(w.idle.preemptible_gpu_seconds / 3600),
                str(w.idle.jobs),
                *[str(h.jobs[c]) if h else "n/a" for c in HOLD_CAUSES],
                str(p.preemptions),
                str(p.same_instant),
                str(p.moved),
                num(p.lost_gpu_seconds / 3600),
                num(p.lost_for_nothing_gpu_seconds / 3600),
                f"{wall:.1f}",
            ]
        )
        per_queue.append((policy, w))
        print(f"<!-- {policy}: replayed in {wall:.1f} s -->", flush=True)
    print()
    print(
        "\n".join(
            table(
                [
                    "policy",
                    "jobs",
                    "rejected",
                    "mean wait (s)",
                    "p99 wait (s)",
                    "max wait (d)",
                    "mean JCT (s)",
                    "idle-wait GPU-h",
                    "of which preemptible",
                    "jobs idle-waiting",
                    *[f"held: {c}" for c in HOLD_CAUSES],
                    "preemptions",
                    "same-instant",
                    "moved",
                    "GPU-h lost",
                    "GPU-h lost for nothing",
                    "replay (s)",
                ],
                rows,
            )
        )
    )
    queues = sorted({q for _, w in per_queue for q in w.idle_queues})
    print("\nIdle-wait GPU-hours per queue (jobs that idle-waited):\n")
    print(
        "\n".join(
            table(
                ["queue", *[p for p, _ in per_queue]],
                [
                    [
                        q,
                        *[
                            f"{num(w.idle_queues[q].gpu_seconds / 3600)} ({w.idle_queues[q].jobs})"
                            if q in w.idle_queues
                            else "-"
                            for _, w in per_queue
                        ],
                    ]
                    for q in queues
                ],
            )
        )
    )
    held = sorted({q for _, w in per_queue if w.holds for q in w.holds.queues})
    print(f"\nGuard holds per queue, distinct jobs ({' / '.join(HOLD_CAUSES)}):\n")
    print(
        "\n".join(
            table(
                ["queue", *[p for p, _ in per_queue]],
                [
                    [
                        q,
                        *[
                            " / ".join(str(w.holds.queues.get(q, {}).get(c, 0)) for c in HOLD_CAUSES)
                            if w.holds
                            else "n/a"
                            for _, w in per_queue
                        ],
                    ]
                    for q in held
                ],
            )
        )
        if held
        else "none"
    )


if __name__ == "__main__":
    main()
