"""Reasons with numbers: why a job is rejected, why it still waits, and what would have to change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from quotas import QueueTree
from scheduler.engine.cluster import Pool
from scheduler.engine.decisions import GUARANTEE, LIMIT, QUEUE_MATE
from scheduler.engine.model import Job, JobSpec, Reason, add_gpus
from scheduler.engine.preemption import Tier, tiers_for
from scheduler.engine.state import PoolState

if TYPE_CHECKING:
    from scheduler.engine.guard import Reservation


def rejection(spec: JobSpec, tree: QueueTree, pools: Mapping[str, Pool]) -> Reason | None:
    """Why a job can never run (so it is rejected at submission), or None."""
    if spec.queue not in tree:
        return Reason("unknown_queue", f"queue {spec.queue} does not exist", {"queue": spec.queue})
    q = tree[spec.queue]
    if not q.is_leaf:
        leaves = ", ".join(c.name for c in q.children)
        return Reason(
            "inner_queue", f"queue {q.name} is not a leaf queue; submit to one of: {leaves}", {"queue": q.name}
        )
    if spec.pool not in pools:
        return Reason("unknown_pool", f"pool {spec.pool} does not exist", {"pool": spec.pool})
    if spec.workers < 1 or spec.gpus < 0 or spec.cpus < 0 or spec.memory_gb < 0:
        return Reason(
            "invalid",
            f"a job needs workers >= 1 and gpus, cpus, memory_gb >= 0; got workers="
            f"{spec.workers}, gpus={spec.gpus}, cpus={spec.cpus}, memory_gb={spec.memory_gb}",
            {},
        )
    pool = pools[spec.pool]
    why = _no_mig(spec, pool) if spec.mig is not None else _too_big(spec, pool)
    if why is not None:
        return why
    for a in q.path:
        if spec.request > a.limit_of(pool.name):
            return Reason(
                "over_limit",
                (
                    f"the job asks {spec.request} GPUs of {pool.name}, more than queue {a.name}'s limit of "
                    f"{a.limit_of(pool.name):g}"
                ),
                {"request": spec.request, "limit": a.limit_of(pool.name), "queue": a.name},
            )
    if not spec.preemptible and spec.request > q.quota_of(pool.name):
        return Reason(
            "over_quota",
            (
                f"a non-preemptible job runs only within its queue's quota: it asks {spec.request} GPUs of "
                f"{pool.name}, more than queue {q.name}'s quota of {q.quota_of(pool.name)}"
            ),
            {"request": spec.request, "quota": q.quota_of(pool.name), "queue": q.name},
        )
    return None


def _no_mig(spec: JobSpec, pool: Pool) -> Reason | None:
    """A MIG job on a pool where no node has a slice of its profile (with room for its CPUs and memory)."""
    if pool.workers_fit_empty(spec):
        return None
    profiles = sorted({p for n in pool.mig_nodes for p, k in n.mig.items() if k > 0})
    return Reason(
        "no_mig_slice",
        (
            f"no node of pool {pool.name} has a MIG slice {spec.mig} that can hold the job ({spec.cpus:g} CPUs, "
            f"{spec.memory_gb:g} GB); MIG profiles there: {', '.join(profiles) or 'none'}"
        ),
        {"mig": str(spec.mig)},
    )


def _too_big(spec: JobSpec, pool: Pool) -> Reason | None:
    """A job no node, or not the whole pool, could ever hold."""
    if not any(
        g >= spec.gpus and (c is None or c >= spec.cpus) and (m is None or m >= spec.memory_gb)
        for g, c, m in pool.shapes
    ):
        return Reason(
            "worker_too_big",
            (
                f"no node of pool {pool.name} can hold one worker ({spec.gpus} GPUs, {spec.cpus:g} CPUs, "
                f"{spec.memory_gb:g} GB); its largest node has {pool.max_gpus} GPUs"
            ),
            {"gpus": spec.gpus, "largest_node_gpus": pool.max_gpus},
        )
    if spec.request > pool.total_gpus:
        return Reason(
            "gang_too_big",
            (
                f"the gang asks {spec.request} GPUs ({spec.workers} x {spec.gpus}); pool {pool.name} has "
                f"{pool.total_gpus} in all"
            ),
            {"request": spec.request, "pool_gpus": pool.total_gpus},
        )
    room = pool.workers_fit_empty(spec)
    if room < spec.workers:
        return Reason(
            "gang_too_big",
            (
                f"the gang needs {spec.workers} workers of {spec.gpus} GPUs; even empty, the nodes of pool "
                f"{pool.name} hold only {room} such workers"
            ),
            {"workers": spec.workers, "fits": room},
        )
    return None


def explain_pending(ps: PoolState, job: Job, res: Reservation | None, preempted_now: bool) -> Reason:
    """The first rule that keeps a pending job from starting now, with its numbers."""
    q = ps.tree[job.spec.queue]
    pool, r = ps.name, job.request
    u, quota, share = ps.usage[q.name], q.quota_of(ps.name), ps.shares().get(q.name, 0.0)
    np = ps.np_usage[q.name]
    nums: dict[str, float | int | str] = {
        "usage": u,
        "request": r,
        "quota": quota,
        "fair_share": round(share, 4),
        "free_gpus": ps.pool.free_gpus,
        "np_usage": np,
    }
    head = f"{q.name} uses {u} GPUs of {pool} (quota {quota}, fair share {share:.2f})"
    held = res.holds(job) if res is not None and q.name in res.affected else None
    if held is not None:
        assert res is not None
        s = res.job
        why = {
            QUEUE_MATE: f"{s.id}, first in {q.name}, has waited past starvation_timeout for room; younger jobs of "
            f"the queue wait until it starts",
            GUARANTEE: f"{s.id}, first in {q.name}, has waited past starvation_timeout on {q.name}'s guarantee; "
            f"non-preemptible jobs of the queue, which count against it, wait until it starts",
            LIMIT: f"{s.id} of {s.spec.queue} has waited past starvation_timeout on a limit this job's queue "
            f"shares; jobs that would raise it and that {s.id} could not take back wait until it starts",
        }[held]
        return Reason("starvation_guard", why, {**nums, "waits_for": s.id, "cause": held})
    blocked = ps.over_limit(q, r)
    if blocked is not None:
        a, au = blocked
        return Reason(
            "limit",
            (
                f"queue {a.name} would use {au} + {r} GPUs of {pool}, over its limit of {a.limit_of(pool):g}; "
                f"it starts when {a.name}'s usage drops to {a.limit_of(pool) - r:g}"
            ),
            {**nums, "queue": a.name, "queue_usage": au, "limit": a.limit_of(pool)},
        )
    if not ps.guaranteed(q, job):
        return Reason(
            "guarantee",
            (
                f"non-preemptible jobs run only within quota, counting the queue's non-preemptible GPUs: {q.name} "
                f"holds {np} non-preemptible GPUs of {pool} (quota {quota}); {np} + {r} > {quota}, so it waits until "
                f"{add_gpus(np, r - quota)} of them free up (its queue's preemptible jobs never hold it back)"
            ),
            nums,
        )
    within = add_gpus(u, r) <= quota
    excluded = res.excludes(job, within) if res is not None else frozenset()
    if ps.pool.place(job.spec, excluded) is not None:
        return Reason("next_pass", f"fits now; it starts at the next scheduling pass ({head})", nums)
    spec = job.spec
    if spec.mig is not None:
        msg = f"needs a MIG slice {spec.mig} on {pool}: none is free"
    elif spec.shared:
        msg = (
            f"needs {spec.gpus} of a GPU on {pool}: {ps.pool.free_gpus} whole GPUs free, the most room on a shared "
            f"GPU is {ps.pool.most_room()}"
        )
    else:
        msg = (
            f"needs {spec.workers} x {spec.gpus} GPUs on {pool}: {ps.pool.free_gpus} GPUs free, the largest free "
            f"block on one node is {ps.pool.largest_free()}"
        )
    if excluded:
        assert res is not None
        msg += f"; nodes {', '.join(sorted(excluded))} are held for starving job {res.job.id}"
    tiers = tiers_for(ps, job, q)
    if preempted_now:
        preempt = "it was preempted at this instant, so it may take GPUs back only from its own queue until the next"
    elif not tiers - {Tier.PRIORITY}:
        preempt = (
            f"it may preempt only lower-priority jobs of {q.name}: {head}, and {u} + {r} is over both "
            f"its quota and its fair share"
        )
    else:
        preempt = "no allowed set of victims makes room (see docs/scheduling.md, Preemption)"
    return Reason("fit", f"{msg}; {preempt}", nums)
