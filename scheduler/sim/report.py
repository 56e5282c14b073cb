"""`corral sim report`: replay a trace under several policies; write report.md (waits, fragmentation, waste, the
sharing anomaly) and its plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from quotas import QueueSpec, QueueTree
from scheduler.engine import NodeSpec
from scheduler.sim import fragmentation
from scheduler.sim.inputs import World
from scheduler.sim.metrics import Stats, compute, usage_series
from scheduler.sim.outcome import PolicyRun, Private, Report
from scheduler.sim.plots import plot_gpus_in_use, plot_idle_wait, plot_wait_cdf
from scheduler.sim.runner import Simulation
from scheduler.sim.waste import HOLD_CAUSES, analyse

__all__ = ["PolicyRun", "Private", "Report", "build", "markdown", "summary_lines", "write"]

# Each queue's private cluster is replayed under this policy. With one queue alone every policy is a plain
# best-effort FIFO over its own jobs (LAS aside), so the baseline does not depend on the policy compared.
PRIVATE_POLICY = "corral"
BINS = 600  # time bins of the GPUs-in-use plot


def capacity(world: World) -> int:
    return sum(n.gpus for n in world.nodes)


def run_policy(world: World, policy: str, bins: int = BINS) -> PolicyRun:
    """Replay `world.jobs` under `policy`; keeps metrics, the per-queue usage series and what was wasted (idle
    waits, guard holds, preemptions) and the GPUs left unallocated while jobs waited, not the event log nor the
    hold records."""
    sim = Simulation(world, policy, log_fair_share=False)
    log = sim.run()
    return PolicyRun(
        policy,
        compute(world.jobs, log, capacity(world)),
        usage_series(world.jobs, log, bins),
        analyse(world, log, sim.holds),
        fragmentation.compute(log, world.nodes, world.jobs, world.events),
    )


def private_world(world: World, queue: str) -> tuple[World, int, int] | None:
    """The world where `queue` has its own cluster: per pool, ceil(quota / node GPUs) nodes like the pool's.

    Returns (world, quota GPUs, private GPUs), or None when the queue has no quota. Pools where the queue has
    no quota are left out, so its jobs there are rejected (counted as not fitting)."""
    q = world.tree[queue]
    first: dict[str, NodeSpec] = {}
    for n in world.nodes:
        first.setdefault(n.pool, n)
    nodes: list[NodeSpec] = []
    quota: dict[str, int] = {}
    for pool, like in first.items():
        want = q.quota_of(pool)
        if want <= 0 or like.gpus <= 0:
            continue
        count = math.ceil(want / like.gpus)
        nodes += [replace(like, name=f"{pool}-{i}", domain=None) for i in range(count)]
        quota[pool] = count * like.gpus
    if not nodes:
        return None
    tree = QueueTree([QueueSpec(queue, None, quota)], quota)
    jobs = [j for j in world.jobs if j.spec.queue == queue]
    return World(nodes, {}, tree, world.settings, jobs=jobs), sum(q.quota.values()), sum(quota.values())


def run_private(world: World, queue: str) -> Private:
    jobs = sum(1 for j in world.jobs if j.spec.queue == queue)
    made = private_world(world, queue)
    if made is None:
        return Private(queue, 0, 0, jobs, 0, None)
    alone, quota, gpus = made
    m = run_policy(alone, PRIVATE_POLICY, bins=1).metrics.overall
    return Private(queue, quota, gpus, jobs, m.rejected, m.mean_wait if m.started else None)


def build(world: World, policies: Sequence[str], workers: int = 1) -> Report:
    """Every policy on the shared cluster, and every leaf queue (with jobs) on its private cluster."""
    queues = sorted({j.spec.queue for j in world.jobs} & {q.name for q in world.tree.leaves})
    if workers <= 1:
        runs = [run_policy(world, p) for p in policies]
        private = [run_private(world, q) for q in queues]
    else:
        with ProcessPoolExecutor(workers) as pool:
            fr = [pool.submit(run_policy, world, p) for p in policies]
            fp = [pool.submit(run_private, world, q) for q in queues]
            runs, private = [f.result() for f in fr], [f.result() for f in fp]
    return Report(runs, private, len(world.jobs), capacity(world))


# ----- markdown -----


def _s(x: float) -> str:
    # A decimal below 10 s, so that a small but non-zero wait does not print as 0 next to "worse".
    return f"{x:.1f}" if 0 < abs(x) < 10 else f"{x:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _summary_row(r: PolicyRun) -> list[str]:
    m, o = r.metrics, r.metrics.overall
    return [
        r.policy,
        str(o.completed),
        str(o.rejected),
        str(o.unfinished),
        str(o.preemptions),
        _s(o.mean_wait),
        _s(o.p50_wait),
        _s(o.p95_wait),
        _s(o.p99_wait),
        _s(o.mean_jct),
        _s(o.p50_jct),
        _s(o.p95_jct),
        _s(o.p99_jct),
        f"{o.makespan / 86400:.2f}",
        f"{o.utilisation:.1%}",
        f"{m.useful_utilisation:.1%}",
        f"{m.jain_queue_mean_wait:.3f}",
    ]


def _queue_row(q: str, s: Stats) -> list[str]:
    return [
        q,
        str(s.jobs),
        str(s.completed),
        str(s.rejected),
        str(s.preemptions),
        _s(s.mean_wait),
        _s(s.p50_wait),
        _s(s.p95_wait),
        _s(s.p99_wait),
        _s(s.mean_jct),
        _s(s.p95_jct),
        f"{s.utilisation:.1%}",
    ]


def _ratio(shared: float, private: float | None) -> str:
    if private is None:
        return "n/a"
    if private == 0:
        return "=" if shared == 0 else "worse"
    return f"{shared / private:.2f}x"


def _h(gpu_seconds: float) -> str:
    return _s(gpu_seconds / 3600)


def _waste_row(r: PolicyRun) -> list[str]:
    w, h, p = r.waste.idle, r.waste.holds, r.waste.preemption
    held = [str(h.jobs.get(c, 0)) if h else "n/a" for c in HOLD_CAUSES]
    return [
        r.policy,
        _h(w.gpu_seconds),
        _h(w.preemptible_gpu_seconds),
        str(w.jobs),
        f"{w.max_seconds / 86400:.2f}",
        *held,
        str(p.preemptions),
        str(p.same_instant),
        str(p.moved),
        _h(p.lost_gpu_seconds),
        _h(p.lost_for_nothing_gpu_seconds),
    ]


def _waste(rep: Report) -> list[str]:
    """The idle-wait, guard-hold and preemption sections (scheduler.sim.waste says how each is counted)."""
    lines = [
        "",
        "## Idle waits, guard holds, preemptions",
        "",
        "Idle wait: GPU-hours (request x time) during which a pending job (after its submission, or after a "
        "preemption until its restart) could have started: the free GPUs of its pool, on nodes that are up, "
        "could place all its workers (and their CPUs and memory where declared; topology domains ignored), "
        "and its queue's limit and every ancestor's allowed it. Waits on a guarantee or on the starvation "
        "guard count; waits for room do not. Non-preemptible jobs may wait on their guarantee with GPUs "
        "free by design, so the preemptible jobs' part is shown apart. Held: distinct jobs the starvation "
        "guard held back, per cause (n/a: the policy records none). Preemptions: decided ones (node failures "
        "left out); same-instant: the victim started again at the instant it was preempted; moved: of those, "
        "the preemptor could not have been placed had those victims stayed where they were; lost: the "
        "victims' GPUs x time run since their last start (0 with checkpoint), GPU-hours; for nothing: lost by "
        "same-instant preemptions that were not moves.",
        "",
    ]
    lines += _table(
        [
            "policy",
            "idle-wait GPU-h",
            "of which preemptible",
            "jobs idle-waiting",
            "max idle wait (d)",
            *[f"held: {c}" for c in HOLD_CAUSES],
            "preemptions",
            "same-instant",
            "moved",
            "GPU-h lost",
            "GPU-h lost for nothing",
        ],
        [_waste_row(r) for r in rep.runs],
    )
    queues = sorted({q for r in rep.runs for q in r.waste.idle_queues})
    lines += ["", "## Idle-wait GPU-hours per queue", "", "GPU-hours (jobs that idle-waited).", ""]
    lines += _table(
        ["queue", *[r.policy for r in rep.runs]],
        [
            [q, *[f"{_h(w.gpu_seconds)} ({w.jobs})" if (w := r.waste.idle_queues.get(q)) else "-" for r in rep.runs]]
            for q in queues
        ],
    )
    held_queues = sorted({q for r in rep.runs if r.waste.holds for q in r.waste.holds.queues})
    lines += [
        "",
        "## Guard holds per queue",
        "",
        f"Distinct jobs of the queue held back, per cause: {' / '.join(HOLD_CAUSES)}. Queues with no hold "
        "under any policy are left out.",
        "",
    ]
    if held_queues:
        lines += _table(
            ["queue", *[r.policy for r in rep.runs]],
            [
                [
                    q,
                    *[
                        " / ".join(str(h.queues.get(q, {}).get(c, 0)) for c in HOLD_CAUSES)
                        if (h := r.waste.holds)
                        else "n/a"
                        for r in rep.runs
                    ],
                ]
                for q in held_queues
            ],
        )
    else:
        lines.append("No job was held back.")
    return lines + ["", "![idle-wait GPU-hours per queue](idle_wait.png)"]


def _fragmentation(rep: Report) -> list[str]:
    """Unallocated GPUs while jobs wait (scheduler.sim.fragmentation says how each is counted)."""
    lines = [
        "",
        "## Unallocated GPUs while jobs wait (fragmentation)",
        "",
        "Over the time in which at least one job waits (from its submission, or a preemption, to its start), the "
        "GPUs left unallocated in the pools where jobs wait: their up nodes' GPUs less what running jobs hold, "
        "free fractions of shared GPUs included. Mean: unallocated GPU-seconds / seconds with a job waiting; "
        "share: of those pools' capacity over that time; partial: the part that was fractions left on GPUs that "
        "running jobs share; stranded: the part during which a waiting job asked for no more GPUs than were "
        "unallocated (it waited on how they were spread, or on a rule). It counts waits of every cause (room, "
        "quota, limit, the guard): compare policies with the same admission rules to see what placement alone "
        "leaves.",
        "",
    ]
    rows = [
        [
            r.policy,
            _s(r.metrics.overall.mean_wait),
            _s(r.fragmentation.wait_seconds / 3600),
            f"{r.fragmentation.mean_unallocated:.2f}",
            f"{r.fragmentation.unallocated_share:.1%}",
            f"{r.fragmentation.partial_share:.1%}",
            f"{r.fragmentation.stranded_share:.1%}",
            _h(r.fragmentation.unallocated_gpu_seconds),
        ]
        for r in rep.runs
    ]
    header = ["policy", "mean wait", "hours with a job waiting", "mean unallocated GPUs", "share", "partial"]
    return lines + _table([*header, "stranded", "unallocated GPU-h"], rows)


def markdown(rep: Report, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"{rep.jobs} jobs on {rep.capacity} GPUs. Times in seconds; wait = first start - submit, JCT = "
        "completion - submit (completed jobs); makespan = last completion - first submit; utilisation = "
        "GPU-seconds held / (capacity x time of the last event); useful = completed jobs' GPU-seconds / "
        "(capacity x makespan); Jain's index over the queues' mean waits. Formulas as in check_trace.py.",
        "",
        "## Per policy",
        "",
    ]
    lines += _table(
        [
            "policy",
            "completed",
            "rejected",
            "unfinished",
            "preemptions",
            "mean wait",
            "p50 wait",
            "p95 wait",
            "p99 wait",
            "mean JCT",
            "p50 JCT",
            "p95 JCT",
            "p99 JCT",
            "makespan (d)",
            "utilisation",
            "useful util.",
            "Jain",
        ],
        [_summary_row(r) for r in rep.runs],
    )
    lines += _fragmentation(rep)
    queues = sorted({q for r in rep.runs for q in r.metrics.queues})
    lines += ["", "## Mean wait per queue", ""]
    lines += _table(
        ["queue", *[r.policy for r in rep.runs]],
        [[q, *[_s(r.metrics.queues[q].mean_wait) if q in r.metrics.queues else "-" for r in rep.runs]] for q in queues],
    )
    for r in rep.runs:
        lines += ["", f"## Policy {r.policy}, per queue", ""]
        lines += _table(
            [
                "queue",
                "jobs",
                "completed",
                "rejected",
                "preemptions",
                "mean wait",
                "p50 wait",
                "p95 wait",
                "p99 wait",
                "mean JCT",
                "p95 JCT",
                "GPU share",
            ],
            [_queue_row(q, s) for q, s in r.metrics.queues.items()],
        )
    lines += [
        "",
        "## Sharing anomaly",
        "",
        f"Each queue's mean wait on the shared cluster against the same jobs alone on a private cluster of "
        f"its quota (rounded up to whole nodes, policy {PRIVATE_POLICY}). A ratio above 1 means the queue "
        "waited longer sharing than it would have on its guarantee alone. Jobs larger than the private "
        "cluster are rejected there and counted; quota 0 has no private cluster (n/a).",
        "",
    ]
    rows: list[list[str]] = []
    for p in rep.private:
        row = [
            p.queue,
            str(p.quota),
            str(p.gpus),
            str(p.jobs),
            str(p.rejected) if p.gpus else "n/a",
            _s(p.mean_wait) if p.mean_wait is not None else "n/a",
        ]
        for r in rep.runs:
            s = r.metrics.queues.get(p.queue)
            row.append(f"{_s(s.mean_wait)} ({_ratio(s.mean_wait, p.mean_wait)})" if s else "-")
        rows.append(row)
    lines += _table(
        [
            "queue",
            "quota",
            "private GPUs",
            "jobs",
            "rejected alone",
            "private mean wait",
            *[f"{r.policy} (ratio)" for r in rep.runs],
        ],
        rows,
    )
    lines += _waste(rep)
    lines += ["", "![wait CDF](wait_cdf.png)", "", "![GPUs in use](gpus_in_use.png)", ""]
    return "\n".join(lines)


def anomalies(rep: Report) -> dict[str, list[str]]:
    """Per policy, the queues that waited longer on the shared cluster than alone on their quota."""
    out: dict[str, list[str]] = {}
    for r in rep.runs:
        out[r.policy] = [
            p.queue
            for p in rep.private
            if p.mean_wait is not None
            and p.queue in r.metrics.queues
            and r.metrics.queues[p.queue].mean_wait > p.mean_wait
        ]
    return out


def summary_lines(rep: Report) -> list[str]:
    bad = anomalies(rep)
    out = []
    for r in rep.runs:
        o = r.metrics.overall
        out.append(
            f"{r.policy}: mean wait {_s(o.mean_wait)} s, p95 {_s(o.p95_wait)} s, mean JCT {_s(o.mean_jct)} s, "
            f"utilisation {o.utilisation:.1%}, Jain {r.metrics.jain_queue_mean_wait:.3f}, "
            f"{o.preemptions} preemptions ({r.waste.preemption.same_instant} same-instant), "
            f"idle-wait {_h(r.waste.idle.gpu_seconds)} GPU-h, "
            f"{r.fragmentation.mean_unallocated:.2f} GPUs unallocated while jobs wait "
            f"({r.fragmentation.partial_share:.0%} partial), {o.rejected} rejected, {o.unfinished} unfinished; "
            f"{len(bad[r.policy])} queue(s) worse off than alone"
        )
    return out


def write(rep: Report, outdir: Path, title: str) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "report.md", outdir / "wait_cdf.png", outdir / "gpus_in_use.png", outdir / "idle_wait.png"]
    paths[0].write_text(markdown(rep, title))
    plot_wait_cdf(rep, paths[1])
    plot_gpus_in_use(rep, paths[2])
    plot_idle_wait(rep, paths[3])
    return paths
