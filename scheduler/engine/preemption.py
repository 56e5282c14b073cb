"""The three preemption tiers: candidates in their fixed order, greedy until the job fits, then the prune pass."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from quotas.tree import Queue
from scheduler.engine.cluster import Freed
from scheduler.engine.memo import may_fit, own_room
from scheduler.engine.model import Amounts, Job, Reason, add_gpus, gpu_amount
from scheduler.engine.state import PoolState, ratio


class Tier(IntEnum):
    """The preemption tiers, in the order their candidates are taken (SCHEDULING.md, Preemption)."""

    RECLAIM = 1  # from queues over their quota, for a queue under its own
    FAIR_SHARE = 2  # from queues over their fair share, for a queue under its own
    PRIORITY = 3  # from the job's own queue's lower-priority jobs


# tier, victim queue ratio (highest first), priority, start (latest first), admission (latest first), id
CandidateKey = tuple[int, float, int, float, int, str]
CAUSE = {Tier.RECLAIM: "reclaim", Tier.FAIR_SHARE: "fair_share", Tier.PRIORITY: "priority"}


def tiers_for(ps: PoolState, job: Job, q: Queue) -> set[Tier]:
    """The tiers that may free GPUs for `job` of leaf `q` (SCHEDULING.md, Preemption), from the state before
    preemption. Limits are not checked here: victims lower usage up the tree, and every plan is checked
    against all admission rules with its victims removed."""
    u, r, pool = ps.usage[q.name], job.request, ps.name
    tiers: set[Tier] = set()
    if not ps.guaranteed(q, job):
        # Only non-preemptible GPUs count against a non-preemptible job's guarantee, and victims are always
        # preemptible: no preemption can lift it.
        return tiers
    after = add_gpus(u, r)
    if after <= q.quota_of(pool):
        tiers.add(Tier.RECLAIM)
    if after <= ps.shares().get(q.name, 0.0):
        tiers.add(Tier.FAIR_SHARE)
    running = ps.running.get(q.name)
    if running and running[0].spec.priority < job.spec.priority and ps.mixed.get(q.name, 0) > 0:
        tiers.add(Tier.PRIORITY)
    return tiers


@dataclass
class Victim:
    job: Job
    tier: Tier
    facts: dict[str, float | int | str]  # the numbers its reason quotes, as they stood when it was taken
    reason: Reason | None = None  # written once the plan is final


@dataclass
class Plan:
    """Victims to preempt and the nodes the job then gets."""

    victims: list[Victim]
    nodes: list[str]


class Preemption:
    """Finds the victims for one job of queue `q`, or None when no allowed set of victims makes it admissible."""

    def __init__(
        self,
        ps: PoolState,
        job: Job,
        q: Queue,
        excluded: Collection[str],
        young: Callable[[Job], bool],
        tiers: set[Tier],
        quiet: bool = False,
    ):
        self.ps, self.job, self.q, self.excluded = ps, job, q, excluded
        self.young = young  # a job under min_runtime: not a victim (the caller registers a wakeup)
        # No job can be young (min_runtime 0): walking the candidates has no side effect (no wakeups to
        # register), so a walk that is bound to fail may be skipped.
        self.quiet = quiet
        self.pool = ps.name
        self.request = job.request
        # GPUs per worker as whole GPUs (what worker slots count); 0 for a job that shares a GPU.
        self.whole = 0 if job.spec.shared else int(job.spec.gpus)
        self.shares = ps.shares()
        self.tiers = tiers

    # ----- candidates -----

    def _victim_queues(self) -> dict[str, list[Tier]]:
        """Leaf queues that may lose jobs, each with its tiers: only queues over quota or over fair share."""
        ps, q = self.ps, self.q
        tiers: dict[str, list[Tier]] = {}
        if Tier.PRIORITY in self.tiers:
            tiers[q.name] = [Tier.PRIORITY]
        if Tier.RECLAIM in self.tiers:
            # A victim's branch is the child, on its side, of its lowest common ancestor with q.
            for i, above in enumerate([*q.path[1:], None]):
                mine = q.path[i]
                for b in ps.over_quota.get(above.name if above else "", ()):
                    if b == mine.name:
                        continue
                    for leaf in self.ps.tree.leaves_under(b):
                        if leaf in ps.running:
                            tiers.setdefault(leaf, []).append(Tier.RECLAIM)
        if Tier.FAIR_SHARE in self.tiers:
            shares = self.shares
            after_q = ratio(add_gpus(ps.usage[q.name], self.request), shares.get(q.name, 0.0))
            # The smallest job that can help frees a GPU; with GPU sharing a victim may hold less (nothing skipped).
            least = 1 if self.request and not ps.pool.sharing else 0
            for leaf in ps.over_share:
                # Skip queues whose ratio would drop below q's after losing even their smallest job.
                if (
                    leaf != q.name
                    and leaf in ps.running
                    and ratio(ps.usage[leaf] - least, shares.get(leaf, 0.0)) >= after_q
                ):
                    tiers.setdefault(leaf, []).append(Tier.FAIR_SHARE)
        return tiers

    def candidates(self) -> Iterator[tuple[Tier, Job]]:
        """Victims in the fixed order: tier, victim queue's ratio (highest first), priority, latest start."""
        ps = self.ps
        queues = sorted(
            (tier, -ps.ratio(ps.tree[name]), name) for name, tiers in self._victim_queues().items() for tier in tiers
        )
        # Queues are read a block of equal (tier, ratio) at a time: most plans need only the first block.
        for (tier, neg_ratio), group in itertools.groupby(queues, key=lambda e: (e[0], e[1])):
            block = [name for _, _, name in group]
            if len(block) == 1:
                jobs: Iterable[Job] = ps.running[block[0]]  # already in victim order
            else:
                jobs = (
                    j for _, _, j in heapq.merge(*(self._stream(tier, -neg_ratio, ps.running[name]) for name in block))
                )
            for j in jobs:
                if tier == Tier.PRIORITY and j.spec.priority >= self.job.spec.priority:
                    break  # within one queue, lowest priority first: no lower-priority job is left
                if j.spec.preemptible and not self.young(j):
                    yield tier, j

    @staticmethod
    def _stream(tier: Tier, r: float, jobs: Iterable[Job]) -> Iterator[tuple[CandidateKey, Tier, Job]]:
        return (((tier, -r, j.spec.priority, -j.start, -j.admitted, j.id), tier, j) for j in jobs)

    # ----- admissibility with victims removed -----

    def _init_room(self) -> None:
        """What the victims taken so far free: per queue up the tree, per node, and as worker slots."""
        pool, g = self.ps.pool, self.whole
        self.gone = Amounts()
        self.freed = Freed()
        self.extra = 0  # GPUs freed on nodes the job may use (a sharing victim counts 1: an upper bound)
        # Worker slots (node free GPUs // gpus per worker, summed): a quick necessary condition for a fit.
        self.slots = 0
        if g:
            self.slots = pool.worker_slots(g)
            self.slots -= sum(len(pool.nodes[n].free) // g for n in self.excluded if pool.nodes[n].up)

    def _take(self, j: Job, sign: int) -> None:
        """Count `j` as a victim (sign 1) or no longer one (-1)."""
        pool, g, freed = self.ps.pool, self.whole, self.freed
        for a in self.ps.tree[j.spec.queue].path:
            gone = self.gone[a.name] + sign * j.request
            self.gone[a.name] = gone if type(gone) is int else gpu_amount(gone)
        more = 1 if j.spec.shared else 0
        for node, gpus in j.workers:
            n = pool.nodes[node]
            if node not in self.excluded and n.up:
                count = more or len(gpus)
                before = len(n.free) + freed.gpus.get(node, 0) + freed.shared.get(node, 0)
                self.extra += sign * count
                if g:
                    self.slots += (before + sign * count) // g - before // g
            freed.add([(node, gpus)], j.spec, sign)

    def admissible(self) -> list[str] | None:
        """Nodes for the job if it passes every admission check with the victims taken so far removed."""
        return self._place() if self._allowed() else None

    def _allowed(self) -> bool:
        """Every admission check but placement, with the victims taken so far removed."""
        ps, q, spec = self.ps, self.q, self.job.spec
        # Cheapest and most often failing first: not enough worker slots yet.
        if ps.pool.free_gpus + ps.pool.loose + self.extra < self.request or (self.whole and self.slots < spec.workers):
            return False
        # The guarantee rule needs no check here: tiers_for allows preemption only where it holds, and victims,
        # being preemptible, never change it.
        return ps.over_limit(q, self.request, self.gone) is None

    def _place(self) -> list[str] | None:
        return self.ps.pool.place(self.job.spec, self.excluded, self.freed)

    def priority_only_hopeless(self) -> bool:
        """With only tier 3: even all the job's lower-priority queue-mates gone, would it fit by GPU count and
        worker slots? (What _init_room and _take would count, summed per node at once: this runs for every such
        try.) The engine asks this before `plan`, and wakes a queue stuck on it by the same test (memo.py)."""
        spec = self.job.spec
        own = own_room(self.ps.running.get(self.q.name, ()), self.job)
        return not may_fit(self.ps.pool, self.request, spec.gpus, spec.workers, self.excluded, own, spec.shared)

    def _whole_nodes_hopeless(self) -> bool:
        """Workers that each need a whole node, with the fair-share tier the only way into other queues: even
        with every job the walk would take gone, would too few nodes be empty? (See clearable.py.)"""
        ps, spec, pool, q = self.ps, self.job.spec, self.ps.pool, self.q.name
        g = self.whole
        if (
            not self.quiet
            or Tier.RECLAIM in self.tiers
            or Tier.FAIR_SHARE not in self.tiers
            or g != pool.max_gpus
            or g <= 0
            or spec.shared
        ):
            return False
        need = spec.workers - len(pool.buckets[g])  # whole free nodes
        need += sum(1 for n in self.excluded if pool.nodes[n].up and len(pool.nodes[n].free) == g)
        if need <= 0:
            return False
        index = ps.clear_index()
        after_q = ratio(add_gpus(ps.usage[q], self.request), self.shares.get(q, 0.0))
        prio, tier3 = spec.priority, Tier.PRIORITY in self.tiers
        takes: dict[str, set[int]] = {}

        def taken(j: Job) -> bool:
            v = j.spec.queue
            if v == q:
                return tier3 and j.spec.priority < prio and j.spec.preemptible
            if v not in takes:
                takes[v] = self._fair_share_takes(v, after_q)
            return id(j) in takes[v]

        nodes: Iterable[str] = index.at_least(after_q)
        if tier3:
            # Nodes that its own lower-priority jobs (tier 3) kept out of the slack range.
            mine = {n for j in ps.running.get(q, ()) if j.spec.priority < prio for n, gpus in j.workers if gpus}
            nodes = itertools.chain(nodes, sorted(n for n in mine if not index.clears(n, after_q)))
        for n in nodes:
            if n not in self.excluded and all(taken(j) for j in index.on_node[n]):
                need -= 1
                if need <= 0:
                    return False
        return True

    def _fair_share_takes(self, v: str, after_q: float) -> set[int]:
        """The jobs of leaf `v` that an exhaustive tier-2 walk would take (ids): in victim order, each while
        v's ratio after losing it stays at or above `after_q`."""
        ps = self.ps
        out: set[int] = set()
        if v not in ps.over_share or v not in ps.running:
            return out
        share, left = self.shares.get(v, 0.0), ps.usage[v]
        for j in ps.running[v]:
            if j.spec.preemptible:
                after = left - j.request
                if type(after) is not int:
                    after = gpu_amount(after)
                if ratio(after, share) >= after_q:
                    left = after
                    out.add(id(j))
        return out

    def plan(self) -> Plan | None:
        ps, pool, q = self.ps, self.pool, self.q
        if self._whole_nodes_hopeless():
            return None
        taken: list[Victim] = []
        taken_ids: set[int] = set()
        self._init_room()
        from_branch = Amounts()
        from_queue = Amounts()
        nodes = None
        for tier, j in self.candidates():
            if id(j) in taken_ids:
                continue  # already taken in an earlier tier
            v = ps.tree[j.spec.queue]
            facts: dict[str, float | int | str] = {"queue": q.name, "victim_queue": v.name}
            if tier == Tier.RECLAIM:
                b = ps.tree.branch(v, q)
                left = ps.usage[b.name] - from_branch[b.name]
                if type(left) is not int:
                    left = gpu_amount(left)
                if left <= b.quota_of(pool):
                    continue
                facts.update(branch=b.name, branch_usage=left, branch_quota=b.quota_of(pool))
                from_branch[b.name] = add_gpus(from_branch[b.name], j.request)
            elif tier == Tier.FAIR_SHARE:
                # Ints (whole GPUs) added plainly; fractions rounded once, as add_gpus does (a call per victim
                # candidate is measurable in walks of hundreds).
                vu = ps.usage[v.name] - from_queue[v.name] - j.request
                qu = ps.usage[q.name] + self.request - from_queue[q.name]
                after_v = ratio(vu if type(vu) is int else gpu_amount(vu), self.shares.get(v.name, 0.0))
                after_q = ratio(qu if type(qu) is int else gpu_amount(qu), self.shares.get(q.name, 0.0))
                if after_v < after_q:
                    continue
                facts.update(victim_usage=ps.usage[v.name], ratio_after=after_v, beneficiary_ratio_after=after_q)
            taken_gpus = from_queue[v.name] + j.request
            from_queue[v.name] = taken_gpus if type(taken_gpus) is int else gpu_amount(taken_gpus)
            taken.append(Victim(j, tier, facts))
            taken_ids.add(id(j))
            self._take(j, 1)
            nodes = self.admissible()
            if nodes is not None:
                break
        if nodes is None:
            return None
        kept, nodes = self._prune(taken, nodes)
        for victim in kept:
            victim.reason = self._explain(victim)
        return Plan(kept, nodes)

    def _prune(self, taken: list[Victim], nodes: list[str]) -> tuple[list[Victim], list[str]]:
        """Drop, latest first, every victim the job does not need after all; the victims kept (in the order taken)
        and the job's nodes without the others.

        Placement finds room whenever there is any, so dropping a victim on none of the nodes the job was last
        placed on leaves the job placeable there: only the others are placed again (a walk for one whole node
        takes hundreds of victims, and each placement reads every node they free GPUs on). The last drop's
        placement is then made once."""
        kept: list[Victim] = []
        placed = True  # whether `nodes` is a placement made in the state after the last drop
        for victim in reversed(taken):
            self._take(victim.job, -1)
            still: list[str] | None = None
            if self._allowed():
                still = self._place() if any(node in nodes for node, _ in victim.job.workers) else nodes
            if still is not None:
                placed = still is not nodes
                nodes = still
            else:
                self._take(victim.job, 1)  # exactly as before: CPUs and memory count in millionths (model.exact)
                kept.append(victim)
        if not placed:
            again = self._place()
            assert again is not None  # the state after the last drop, where the job was placeable
            nodes = again
        return kept[::-1], nodes

    def _explain(self, victim: Victim) -> Reason:
        """The sentence a victim sees: who took its GPUs back, under which rule, with the numbers."""
        q, pool, ps, f = self.q, self.pool, self.ps, victim.facts
        head = f"{q.name} uses {ps.usage[q.name]} GPUs of {pool} and {self.job.id} needs {self.request}"
        if victim.tier == Tier.RECLAIM:
            msg = (
                f"{q.name} reclaims its guarantee on {pool}: {head}, within its quota of {q.quota_of(pool)}; "
                f"{f['branch']} uses {f['branch_usage']} GPUs, over its quota of {f['branch_quota']}"
            )
        elif victim.tier == Tier.FAIR_SHARE:
            msg = (
                f"{q.name} is below its fair share: {head}, within its share of "
                f"{self.shares.get(q.name, 0.0):.2f}; {f['victim_queue']} uses {f['victim_usage']} GPUs, over "
                f"its share of {self.shares.get(str(f['victim_queue']), 0.0):.2f}, and its ratio stays "
                f"{float(f['ratio_after']):.2f} >= {float(f['beneficiary_ratio_after']):.2f}"
            )
        else:
            msg = (
                f"{self.job.id} (priority {self.job.spec.priority}) preempts lower-priority work of {q.name} "
                f"(priority {victim.job.spec.priority})"
            )
        return Reason(CAUSE[victim.tier], msg, victim.facts)
