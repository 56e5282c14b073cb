"""Corral's queue tree as Kueue objects: a ResourceFlavor per pool, a Cohort per inner queue (plus one root cohort
for the whole cluster), a ClusterQueue and a LocalQueue per leaf queue.

The mapping, and what it cannot carry over, is docs/kueue.md; `losses` lists the latter for one tree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from quotas import QueueTree
from quotas.tree import UNLIMITED, Queue
from scheduler.kueue.models import (
    DNS_SUBDOMAIN,
    GPU,
    GPU_PRODUCT,
    QUANTITY,
    BorrowWithinCohort,
    ClusterQueue,
    ClusterQueueSpec,
    Cohort,
    CohortSpec,
    FairSharing,
    FlavorQuotas,
    KueueObject,
    LocalQueue,
    LocalQueueSpec,
    ObjectMeta,
    Preemption,
    ResourceFlavor,
    ResourceFlavorSpec,
    ResourceGroup,
    ResourceQuota,
)

ROOT_COHORT = "corral"
MANAGED_BY = {"app.kubernetes.io/managed-by": "corral"}
QUEUE_ANNOTATION = "corral.dev/queue"
POOL_ANNOTATION = "corral.dev/pool"

# Corral's preemption in Kueue's terms (docs/kueue.md): tier 1 (reclaim a guarantee from a branch over its quota)
# is reclaimWithinCohort Any; tier 3 (priority, own queue only) is withinClusterQueue LowerPriority. A borrowing
# job never preempts another queue by priority in Corral, so borrowWithinCohort stays Never; tier 2 (fair-share
# reclaim) is Kueue's fair sharing, switched on in Kueue's Configuration, not in these objects.
PREEMPTION = Preemption(
    reclaim_within_cohort="Any",
    borrow_within_cohort=BorrowWithinCohort(policy="Never"),
    within_cluster_queue="LowerPriority",
)


class ExportError(ValueError):
    """A tree that cannot be rendered as Kueue objects; `problems` lists every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


# The resources besides GPUs a job's pods request, which Kueue counts against quota like any other.
POOL_RESOURCES = ("cpu", "memory")


def export(
    tree: QueueTree,
    flavors: Mapping[str, str],
    namespace_of: Callable[[Queue], str],
    *,
    products: Mapping[str, str] | None = None,
    root: str = ROOT_COHORT,
    pool_resources: Mapping[str, Mapping[str, int | str]] | None = None,
) -> list[dict[str, Any]]:
    """The tree as Kubernetes objects (dicts), in an order they can be created in: flavors, cohorts parents first,
    cluster queues, local queues. See `export_objects`."""
    return [
        o.to_dict()
        for o in export_objects(
            tree, flavors, namespace_of, products=products, root=root, pool_resources=pool_resources
        )
    ]


def export_objects(
    tree: QueueTree,
    flavors: Mapping[str, str],
    namespace_of: Callable[[Queue], str],
    *,
    products: Mapping[str, str] | None = None,
    root: str = ROOT_COHORT,
    pool_resources: Mapping[str, Mapping[str, int | str]] | None = None,
) -> list[KueueObject]:
    """The tree as typed Kueue objects.

    `flavors` maps each pool to export to its ResourceFlavor's name (pools left out are not exported: every
    queue's GPUs there are lost); `products` maps a pool to its nodes' nvidia.com/gpu.product label (default: the
    pool's name); `namespace_of(leaf)` is where a leaf's LocalQueue goes. `root` names the cohort at the top:
    Corral's top-level queues all share the cluster, so they share one cohort, whose own quota is what no
    top-level queue is guaranteed.

    `pool_resources` maps each exported pool to its nodes' total CPU and memory (allocatable, as quantities:
    {"cpu": 512, "memory": "4Ti"}). Kueue leaves a workload pending when it requests a resource its ClusterQueue
    does not cover, and Job pods request cpu and memory. Given, they are covered in the GPUs' resource group:
    the root cohort holds all of each pool's CPU and memory and every cohort and queue has 0 of its own with no
    borrowingLimit, so any queue may use them, as in Corral, which quotas GPUs only. Not given, only GPUs are
    covered, and Kueue's Configuration must leave cpu and memory out (`resources.excludeResourcePrefixes`;
    docs/kueue.md).
    """
    _check(tree, flavors, namespace_of, root, pool_resources)
    pools = list(flavors)
    products = products or {}
    others = list(POOL_RESOURCES) if pool_resources is not None else []
    objects: list[KueueObject] = []
    for pool in pools:
        objects.append(
            ResourceFlavor(
                metadata=_meta(flavors[pool], annotations={POOL_ANNOTATION: pool}),
                spec=ResourceFlavorSpec(node_labels={GPU_PRODUCT: products.get(pool, pool)}),
            )
        )

    def group(own: Callable[[str], int], queue: Queue | None) -> list[ResourceGroup]:
        def other(p: str, r: str) -> ResourceQuota:
            total = (pool_resources or {})[p][r]
            return ResourceQuota(name=r, nominal_quota=total if queue is None else 0)

        quotas = [
            FlavorQuotas(
                name=flavors[p],
                resources=[
                    ResourceQuota(name=GPU, nominal_quota=own(p), borrowing_limit=_borrowing(queue, p)),
                    *(other(p, r) for r in others),
                ],
            )
            for p in pools
        ]
        return [ResourceGroup(covered_resources=[GPU, *others], flavors=quotas)]

    # The root cohort holds the GPUs nobody at the top level is guaranteed (in Corral anyone may borrow them), and
    # all the CPU and memory: Corral has no quota on them.
    top_quota = {p: sum(q.quota_of(p) for q in tree.top) for p in pools}
    objects.append(
        Cohort(
            metadata=_meta(root),
            spec=CohortSpec(resource_groups=group(lambda p: tree.capacity[p] - top_quota[p], None)),
        )
    )
    inner = [q for q in _parents_first(tree) if not q.is_leaf]
    for q in inner:

        def own(pool: str, q: Queue = q) -> int:
            return q.quota_of(pool) - sum(c.quota_of(pool) for c in q.children)

        # A Kueue cohort's quota is its own nominalQuota plus its members': the department's own share is what it
        # is guaranteed beyond its teams' guarantees, so that the subtree adds up to the department's quota.
        objects.append(
            Cohort(
                metadata=_meta(q.name, queue=q),
                spec=CohortSpec(
                    parent_name=q.parent.name if q.parent else root,
                    resource_groups=group(own, q),
                    fair_sharing=FairSharing(weight=_weight(q, pools)),
                ),
            )
        )
    for q in tree.leaves:
        objects.append(
            ClusterQueue(
                metadata=_meta(q.name, queue=q),
                spec=ClusterQueueSpec(
                    cohort_name=q.parent.name if q.parent else root,
                    resource_groups=group(q.quota_of, q),
                    preemption=PREEMPTION,
                    fair_sharing=FairSharing(weight=_weight(q, pools)),
                ),
            )
        )
    for q in tree.leaves:
        objects.append(
            LocalQueue(
                metadata=_meta(q.name, queue=q, namespace=namespace_of(q)), spec=LocalQueueSpec(cluster_queue=q.name)
            )
        )
    return objects


def losses(tree: QueueTree, flavors: Mapping[str, str]) -> list[str]:
    """What an export of this tree does not carry over (beyond what every export loses, in docs/kueue.md)."""
    out = [
        f"pool {p!r} is not exported (no flavor given): its quotas and limits are dropped"
        for p in tree.capacity
        if p not in flavors
    ]
    pools = list(flavors)
    for q in tree.queues.values():
        weights = {q.weight_of(p) for p in pools}
        if len(weights) > 1:
            out.append(
                f"queue {q.name!r} has a weight per pool ({', '.join(f'{p}={q.weight_of(p):g}' for p in pools)})"
                f"; Kueue has one weight per queue: exported as {_weight(q, pools):g}"
            )
    return out


def _check(
    tree: QueueTree,
    flavors: Mapping[str, str],
    namespace_of: Callable[[Queue], str],
    root: str,
    pool_resources: Mapping[str, Mapping[str, int | str]] | None,
) -> None:
    problems = [
        f"pool {p!r} (flavor {f!r}) is not a pool of the tree" for p, f in flavors.items() if p not in tree.capacity
    ]
    if pool_resources is not None:
        for p in flavors:
            given = pool_resources.get(p, {})
            problems += [
                f"pool {p!r} has no total {r} (give every exported pool's cpu and memory, or neither)"
                for r in POOL_RESOURCES
                if r not in given
            ]
            problems += [
                f"pool {p!r}: {r} is not a resource Corral exports besides GPUs (cpu, memory)"
                for r in given
                if r not in POOL_RESOURCES
            ]
            problems += [
                f"pool {p!r}: {r} {v!r} is not a quantity (such as 512, 500m or 4Ti)"
                for r, v in given.items()
                if r in POOL_RESOURCES and not _quantity(v)
            ]
    if len(set(flavors.values())) != len(flavors):
        problems.append("two pools map to the same flavor")
    names = {f"queue {n!r}": n for n in tree.queues} | {f"flavor {f!r}": f for f in flavors.values()}
    names[f"root cohort {root!r}"] = root
    names |= {f"namespace of queue {q.name!r}": namespace_of(q) for q in tree.leaves}
    problems += [
        f"{what} is not a Kubernetes name (lower-case letters, digits, '-' and '.')"
        for what, n in names.items()
        if not re.fullmatch(DNS_SUBDOMAIN, n) or len(n) > 253
    ]
    if root in tree.queues:
        problems.append(f"the root cohort {root!r} has the name of a queue; pick another root")
    if problems:
        raise ExportError(problems)


def _quantity(v: object) -> bool:
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and v >= 0) or (isinstance(v, str) and re.fullmatch(QUANTITY, v) is not None)


def _parents_first(tree: QueueTree) -> list[Queue]:
    out: list[Queue] = []
    stack = list(reversed(tree.top))
    while stack:
        q = stack.pop()
        out.append(q)
        stack.extend(reversed(q.children))
    return out


def _borrowing(queue: Queue | None, pool: str) -> int | None:
    """Corral's limit counts the guarantee in, Kueue's borrowingLimit does not; no limit: no borrowingLimit."""
    if queue is None:
        return None
    limit = queue.limit_of(pool)
    return None if limit == UNLIMITED else int(limit) - queue.quota_of(pool)


def _weight(q: Queue, pools: list[str]) -> float:
    """One weight for Kueue: the queue's, when it is the same in every exported pool; else its default weight."""
    weights = {q.weight_of(p) for p in pools}
    return weights.pop() if len(weights) == 1 else q.default_weight


def _meta(
    name: str, queue: Queue | None = None, namespace: str | None = None, annotations: Mapping[str, str] | None = None
) -> ObjectMeta:
    notes = dict(annotations or {})
    if queue is not None:
        notes[QUEUE_ANNOTATION] = queue.name
    return ObjectMeta(name=name, namespace=namespace, labels=dict(MANAGED_BY), annotations=notes)
