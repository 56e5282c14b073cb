"""What the API and metrics show of live state: queues with fair share and usage, pools, nodes and GPUs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import Metric

from scheduler.engine.model import JobState
from scheduler.service.api.auth import Principal
from scheduler.service.api.models import QueuePoolView, QueueTreeView, QueueView
from scheduler.service.core.loop import Core
from scheduler.service.core.metrics import gauge
from scheduler.service.core.specs import engine_id, job_id_of
from scheduler.service.store.rows import reason_json


def reason_now(core: Core, job_id: int, stored: Any) -> Any:
    """Why the job is where it is now: for a job the engine holds pending, the rule that blocks it (the engine's
    explain, with its numbers), not the reason stored at its last decision (a requeued job's preemption);
    for any other job the stored reason. Call under core.lock; the caller redacts the answer."""
    if core.engine.job_state(engine_id(job_id)) is JobState.PENDING:
        return reason_json(core.engine.explain(engine_id(job_id), core.clock()))
    return stored


def live_reasons(core: Core, views: Iterable[dict[str, Any]]) -> None:
    """Set each job view's "reason" to reason_now, under one hold of the lock for the whole page (a listing
    is paginated, so this stays cheap). Jobs the engine does not hold keep their stored reason."""
    with core.lock:
        for v in views:
            v["reason"] = reason_now(core, v["id"], v["reason"])


def queue_tree(core: Core, who: Principal) -> QueueTreeView:
    """Every queue the caller may see, with quota, limit and weight per pool and the live numbers."""
    with core.lock:
        out, loads = [], core.engine.pool_loads()
        for q in core.tree.queues.values():
            if not who.covers(core.tree, q.name):
                continue
            pools = {}
            for name, ps in loads.items():
                leaves = core.tree.leaves_under(q.name)
                pending_jobs, pending_gpus = ps.backlog(leaves)
                used, quota = ps.used(q.name), q.quota_of(name)
                limit = q.limit_of(name)
                pools[name] = QueuePoolView(
                    quota=quota,
                    limit=None if limit == float("inf") else int(limit),
                    weight=q.weight_of(name),
                    fair_share=round(ps.share(q.name), 4),
                    usage=used,
                    np_usage=ps.np_used(q.name),
                    borrowed=max(0, used - quota),
                    pending_jobs=pending_jobs,
                    pending_gpus=pending_gpus,
                    running_jobs=ps.running(leaves),
                )
            out.append(QueueView(name=q.name, parent=q.parent.name if q.parent else None, leaf=q.is_leaf, pools=pools))
        return QueueTreeView(version=core.version, queues=out)


def pools(core: Core) -> list[dict[str, Any]]:
    """Pools and their nodes; each GPU says which job holds it (job ids only: names may be private), a shared GPU
    every job's share, a node its MIG slices by profile and the jobs holding them."""
    with core.lock:
        out = []
        snapshot = core.engine.pool_gpus()
        slices = _mig_holders(core) if any(n.mig for ps in snapshot.values() for n in ps.nodes) else {}
        for name, ps in snapshot.items():
            node_views = []
            for n in ps.nodes:
                known = core.cluster.nodes.get(n.name)
                info = {g.index: g for g in known.gpus} if known is not None else {}
                node_views.append(
                    {
                        "name": n.name,
                        "up": n.name not in core.cluster.down,
                        "cordoned": known is not None and known.cordoned and n.name not in core.cluster.down,
                        "gpus": [
                            {
                                "index": i,
                                "model": info[i].model if i in info else None,
                                "uuid": info[i].uuid if i in info else None,
                                "memory_mb": info[i].memory_mb if i in info else None,
                                "job": job_id_of(n.holders[i]) if i in n.holders else None,
                                "shares": [{"job": job_id_of(j), "fraction": f} for j, f in n.shared.get(i, ())],
                            }
                            for i in range(n.gpus)
                        ],
                        "mig": [
                            {
                                "profile": p,
                                "slices": total,
                                "free": free,
                                "jobs": sorted(slices.get((n.name, p), [])),
                            }
                            for p, (total, free) in n.mig.items()
                        ],
                    }
                )
            out.append({"name": name, "capacity": ps.capacity, "free": ps.free_gpus, "nodes": node_views})
        return out


def _mig_holders(core: Core) -> dict[tuple[str, str], list[int]]:
    """(node, MIG profile) -> the running jobs holding a slice of it there (the engine counts slices, not which)."""
    out: dict[tuple[str, str], list[int]] = {}
    for j in core.engine.jobs.values():
        if j.state is JobState.RUNNING and j.spec.mig is not None:
            for node, _ in j.workers:
                out.setdefault((node, j.spec.mig), []).append(job_id_of(j.id))
    return out


def live_metrics(core: Core) -> list[Metric]:
    """Gauges per queue and pool, read under the lock at scrape time, and per GPU from NVML."""
    out = gpu_metrics(core)
    with core.lock:
        jobs: list[tuple[list[str], float]] = []
        gpus: list[tuple[list[str], float]] = []
        share: list[tuple[list[str], float]] = []
        borrowed: list[tuple[list[str], float]] = []
        for pool, ps in core.engine.pool_loads().items():
            for q in core.tree.leaves:
                pending_jobs, pending_gpus = ps.backlog([q.name])
                labels = [q.name, pool]
                jobs += [
                    (labels + [JobState.PENDING.value], pending_jobs),
                    (labels + [JobState.RUNNING.value], ps.running([q.name])),
                ]
                gpus += [
                    (labels + [JobState.PENDING.value], pending_gpus),
                    (labels + [JobState.RUNNING.value], ps.used(q.name)),
                ]
            for q in core.tree.queues.values():
                share.append(([q.name, pool], ps.share(q.name)))
                borrowed.append(([q.name, pool], max(0, ps.used(q.name) - q.quota_of(pool))))
        return out + [
            gauge("corral_jobs", "Jobs per leaf queue, pool and state.", ["queue", "pool", "state"], jobs),
            gauge(
                "corral_gpus",
                "GPUs asked (pending) or held (running) per leaf queue and pool.",
                ["queue", "pool", "state"],
                gpus,
            ),
            gauge("corral_fair_share_gpus", "Fair share of each queue in each pool, GPUs.", ["queue", "pool"], share),
            gauge("corral_borrowed_gpus", "GPUs a queue uses beyond its quota.", ["queue", "pool"], borrowed),
        ]


def gpu_metrics(core: Core) -> list[Metric]:
    util: list[tuple[list[str], float]] = []
    mem: list[tuple[list[str], float]] = []
    for n in core.cluster.nodes.values():
        samples = n.sample() if n.sample is not None else None
        for i, s in sorted((samples or {}).items()):
            util.append(([n.pool, n.name, str(i)], s.util_pct))
            mem.append(([n.pool, n.name, str(i)], float(s.mem_used_bytes)))
    if not util:
        return []
    labels = ["pool", "node", "gpu"]
    return [
        gauge("corral_gpu_utilisation_percent", "GPU utilisation (NVML), percent.", labels, util),
        gauge("corral_gpu_memory_used_bytes", "GPU memory in use (NVML), bytes.", labels, mem),
    ]
