"""Baseline policies for comparison, run by the same simulator: fifo, strict-quota, las, best-fit-fractions."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping

from sortedcontainers import SortedList

from quotas import QueueSpec, QueueTree
from scheduler.engine.cluster import Freed
from scheduler.engine.decisions import Decision, Preempted, Started
from scheduler.engine.engine import Engine
from scheduler.engine.model import Job, JobState, NodeSpec, Reason, Settings
from scheduler.engine.sharing import best_fit_key
from scheduler.engine.state import PoolState, arrival_key

POLICIES = ("corral", "fifo", "strict-quota", "las", "best-fit-fractions")
MARGIN = 1e-3  # seconds: far above the float rounding between two ways of computing one band crossing


class FifoEngine(Engine):
    """One global queue per pool in submit order; the first job that does not fit blocks the ones behind it.

    Limits still hold (a job over its queue's limit is passed over, it does not block); quotas, fair share,
    priorities and preemption play no part.
    """

    preemption = False
    arrival_order = staticmethod(arrival_key)

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        i = 0
        while i < len(ps.arrivals):
            job: Job = ps.arrivals[i]
            q = self.tree[job.spec.queue]
            if ps.over_limit(q, job.request) is not None:
                i += 1
                continue
            nodes = ps.pool.place(job.spec)
            if nodes is None:
                return  # head-of-line blocking: that is what FIFO means
            out.append(self._start(ps, job, nodes, now))  # removes it from arrivals: i stays


class BestFitFractionsEngine(Engine):
    """Corral's rules, but a fractional job goes to the shared GPU with the least room left that fits (plain best
    fit, blind to the pending mix), else opens a GPU on the node with the fewest free GPUs: what FGD compares
    against (docs/scheduling.md, GPU sharing). Whole-GPU jobs are placed exactly as by Corral."""

    def share_key(self, room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
        return best_fit_key(room, fraction, mix)


class StrictQuotaEngine(Engine):
    """Each queue capped at its quota: no borrowing, hence no preemption. Quota 0 in a pool means no access."""

    preemption = False

    def __init__(
        self,
        tree: QueueTree,
        nodes: Iterable[NodeSpec],
        domains: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        settings: Settings | None = None,
    ):
        nodes = list(nodes)
        pools = sorted({n.pool for n in nodes})
        capped = [
            QueueSpec(
                s.name,
                s.parent,
                s.quota,
                {p: min(s.limit.get(p, s.quota.get(p, 0)), s.quota.get(p, 0)) for p in pools},
                s.weight,
                s.default_weight,
            )
            for s in tree.specs
        ]
        super().__init__(QueueTree(capped, tree.capacity), nodes, domains, settings)


class LasEngine(Engine):
    """Least attained GPU-service first, with preemption (Tiresias' discretised 2D-LAS).

    Attained service is GPUs x seconds run, over all runs of a job. Jobs fall into bands at 1 and 10
    GPU-hours; within a band the earlier submission goes first and running jobs keep their GPUs. Bands, not
    raw service, keep two jobs of similar service from preempting each other back and forth.
    """

    bands = (3600.0, 36000.0)  # GPU-seconds

    def __init__(
        self,
        tree: QueueTree,
        nodes: Iterable[NodeSpec],
        domains: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        settings: Settings | None = None,
    ):
        self._attained: dict[str, float] = {}
        # Per pool, (instant a running job enters its next band, its admission, job id): see _first_crossing.
        self._marks: dict[str, SortedList] = {}
        self._clock = 0.0
        # Waiting jobs by (band, submit): a waiting job's attained service does not change.
        self.arrival_order = self._waiting_key
        super().__init__(tree, nodes, domains, settings)

    def _waiting_key(self, j: Job) -> tuple[float, ...]:
        return (self._band(self._attained.get(j.id, 0.0)), j.submit, j.seq)

    def _service(self, j: Job, now: float) -> float:
        run = (now - j.start) * j.request if j.state is JobState.RUNNING else 0.0
        return self._attained.get(j.id, 0.0) + run

    def _band(self, service: float) -> int:
        return bisect.bisect_right(self.bands, service)  # how many bands it has reached

    def _release(self, ps: PoolState, job: Job, moving: bool = False) -> None:
        self._attained[job.id] = self._service(job, self._clock)
        super()._release(ps, job, moving)

    def finish(self, job_id: str, now: float, failed: bool = False) -> bool:
        self._clock = now
        return super().finish(job_id, now, failed)

    def cancel(self, job_id: str, now: float) -> bool:
        self._clock = now
        return super().cancel(job_id, now)

    def node_down(self, name: str, now: float) -> list[Decision]:
        self._clock = now
        return super().node_down(name, now)

    def schedule(self, now: float) -> list[Decision]:
        self._clock = now
        out = super().schedule(now)
        # Wake up when a running job crosses into the next band: it may then give way.
        first: float | None = None
        for ps in self.pools.values():
            if ps.pending:
                c = self._first_crossing(ps, now)
                if c is not None and (first is None or c < first):
                    first = c
        if first is not None:
            self._wakeups.at(first)
        return out

    def _start(self, ps: PoolState, job: Job, nodes: list[str], now: float) -> Started:
        started = super()._start(ps, job, nodes, now)
        r, attained = job.request, self._attained.get(job.id, 0.0)
        if r > 0:
            marks = self._marks.setdefault(ps.name, SortedList())
            for b in self.bands:
                if b > attained:
                    marks.add((job.start + (b - attained) / r, job.admitted, job.id))
        return started

    def _crossing(self, j: Job, now: float) -> float | None:
        """When running job j enters its next band: the formula of _service and _band, float for float."""
        s = self._attained.get(j.id, 0.0) + (now - j.start) * j.request
        for b in self.bands:
            if s < b:
                return now + (b - s) / j.request
        return None

    def _first_crossing(self, ps: PoolState, now: float) -> float | None:
        """The earliest band crossing among the pool's running jobs, without computing every job's.

        Each run's crossings are marked at its start (start + (band - attained) / GPUs): the same instants
        up to float rounding, far below MARGIN. Marks are read in time order and the exact crossing is computed
        for each job met, until the marks are past the best one found by more than MARGIN: no job further on
        can come first. Marks of runs that ended, or of bands crossed, are dropped on the way."""
        marks = self._marks.get(ps.name)
        if not marks:
            return None
        best: float | None = None
        seen: set[str] = set()
        stale = []
        for mark in marks:
            at, admitted, job_id = mark
            j = self.jobs[job_id]
            if j.state is not JobState.RUNNING or j.admitted != admitted or at < now - MARGIN:
                stale.append(mark)
                continue
            if best is not None and at > best + MARGIN:
                break
            if job_id in seen:
                continue
            seen.add(job_id)
            c = self._crossing(j, now)
            if c is not None and (best is None or c < best):
                best = c
        for mark in stale:
            marks.remove(mark)
        return best

    def _fill(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        """Start waiting jobs in (band, submit) order wherever they fit."""
        assert ps.arrivals is not None
        i = 0
        # Shapes that found no room: starts only take room away, so they find none for the rest of this fill.
        no_room: set[tuple[int, float, float, float, str | None]] = set()
        waiting: int | None = None  # how many shapes wait, counted once one found no room
        while i < len(ps.arrivals) and ps.pool.free_gpus + ps.pool.loose >= ps.min_need():
            j: Job = ps.arrivals[i]
            nodes = None
            shape = (j.spec.workers, j.spec.gpus, j.spec.cpus, j.spec.memory_gb, j.spec.mig)
            if shape not in no_room and ps.over_limit(self.tree[j.spec.queue], j.request) is None:
                nodes = ps.pool.place(j.spec)
                if nodes is None:
                    no_room.add(shape)
                    if waiting is None:
                        waiting = len({(*s[:4], s[6]) for shapes in ps.pending_shapes.values() for s in shapes})
                    if len(no_room) == waiting:
                        break  # every waiting shape found no room: the rest of the backlog can only repeat that
            if nodes is None:
                i += 1
            else:
                out.append(self._start(ps, j, nodes, now))  # leaves arrivals: i stays

    def _may_displace(self, ps: PoolState, now: float) -> bool:
        """Whether the first waiting job is in a lower band than some preemptible running job. Only those can
        displace anyone, and waiting jobs come in band order: most calls stop here, before the band of every
        running job is computed and sorted."""
        assert ps.arrivals is not None
        if not ps.arrivals:
            return False
        wband = self._band(self._attained.get(ps.arrivals[0].id, 0.0))
        attained, top = self._attained, self.bands[wband:][:1]
        if not top:
            return False  # already in the highest band
        for js in ps.running.values():
            for j in js:
                if j.spec.preemptible and attained.get(j.spec.id, 0.0) + (now - j.start) * j.spec.request >= top[0]:
                    return True  # same float operations as _service
        return False

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        self._fill(ps, now, out)
        if self.settings.min_runtime <= 0 and not self._may_displace(ps, now):
            return  # what the loop below would find at its first waiting job (it has no side effect then)
        # Then a waiting job may displace running jobs of a higher band (most served first), only as many
        # as it needs to fit. Non-preemptible jobs and jobs younger than min_runtime keep their GPUs.
        # Waiting jobs come in band order, and a job displaces only jobs of a higher band than its own: jobs of
        # the first one's band or lower are never taken, and waiting jobs from the top victim's band on never
        # displace anyone.
        attained, bands = self._attained, self.bands
        lowest = self._band(attained.get(ps.arrivals[0].id, 0.0)) if ps.arrivals else len(bands)
        band: dict[str, int] = {}
        order: list[tuple[int, float, int, Job]] = []  # most served first, then latest submitted
        for js in ps.running.values():
            for j in js:
                if j.spec.preemptible and not self._young(j, now):
                    # _band(_service(j, now)), inlined: this runs over every running job
                    b = bisect.bisect_right(bands, attained.get(j.spec.id, 0.0) + (now - j.start) * j.spec.request)
                    if b > lowest:
                        band[j.spec.id] = b
                        order.append((-b, -j.submit, -j.seq, j))  # seq is unique: jobs are never compared
        order.sort()
        victims = [j for *_, j in order]
        if not victims:
            return
        for w in ps.arrivals[: ps.arrivals.bisect_key_left((band[victims[0].id],))]:
            wband = self._band(self._attained.get(w.id, 0.0))
            if not victims or wband >= band[victims[0].id]:
                break  # waiting jobs come in band order: nobody further on outranks a running job
            self._displace(ps, w, wband, victims, band, now, out)

    def _displace(
        self,
        ps: PoolState,
        w: Job,
        wband: int,
        victims: list[Job],
        band: Mapping[str, int],
        now: float,
        out: list[Decision],
    ) -> None:
        """Start waiting job `w` in band `wband` if taking victims of a higher band, in order, makes room; the
        victims taken leave `victims`."""
        if w.id in self._preempted_now or ps.over_limit(self.tree[w.spec.queue], w.request) is not None:
            return
        taken: list[Job] = []
        freed = Freed()
        nodes = None
        for v in victims:
            if band[v.id] <= wband:
                break
            taken.append(v)
            freed.add(v.workers, v.spec)
            nodes = ps.pool.place(w.spec, freed=freed)
            if nodes is not None:
                break
        if nodes is None:
            return
        for v in taken:
            victims.remove(v)
            self._stop(ps, v)
            self._preempted_now.add(v.id)
            out.append(
                Preempted(
                    v.id,
                    "priority",
                    w.id,
                    Reason(
                        "las",
                        f"{v.id} has attained {self._service(v, now):.0f} GPU-seconds, more than {w.id}: "
                        f"jobs with less go first",
                        {"attained": self._attained.get(v.id, 0.0)},
                    ),
                )
            )
        out.append(self._start(ps, w, ps.pool.place(w.spec) or nodes, now))


def make_policy(
    name: str,
    tree: QueueTree,
    nodes: Iterable[NodeSpec],
    domains: Mapping[str, Mapping[str, Iterable[str]]],
    settings: Settings,
) -> Engine:
    """The engine for a policy name: `corral` (SCHEDULING.md) or one of the baselines."""
    engines: dict[str, type[Engine]] = {
        "corral": Engine,
        "fifo": FifoEngine,
        "strict-quota": StrictQuotaEngine,
        "las": LasEngine,
        "best-fit-fractions": BestFitFractionsEngine,
    }
    if name not in engines:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return engines[name](tree, nodes, domains, settings)
