"""The starvation guard's reservation: what it holds back for a starving head job, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from scheduler.engine.decisions import GUARANTEE, LIMIT, QUEUE_MATE
from scheduler.engine.model import Job


class Held(NamedTuple):
    """The reservation as the free-room answers read it (PoolState.reserved)."""

    queue: str | None  # its job's queue (None: no reservation)
    nodes: frozenset[str]  # the nodes it keeps from other jobs
    within_quota: bool  # its job is within its queue's quota (a job within quota may use them, see excludes)


NOT_HELD = Held(None, frozenset(), False)


@dataclass(frozen=True)
class Reservation:
    """What the starvation guard holds back for a starving head job; only what would delay its start.

    Waiting for room (`cause` None): the nodes closest to holding it, and every younger job of its queue.
    Waiting on its own guarantee or on a limit, no node is held (free room is not what it lacks): only the jobs
    that would eat what it waits for wait (see `holds`)."""

    job: Job
    nodes: frozenset[str]
    within_quota: bool
    cause: str | None = None  # None: it waits for room; GUARANTEE or LIMIT: what blocks it instead
    # Leaf queues some of whose jobs it may hold: its own, and with a limit, every leaf under the limiting queue.
    affected: frozenset[str] = frozenset()

    def excludes(self, job: Job, within_quota: bool) -> frozenset[str]:
        """Nodes `job` may not use. Guarantees beat the guard: a job within quota may use nodes held for a
        borrower."""
        if job is self.job or (within_quota and not self.within_quota):
            return frozenset()
        return self.nodes

    def holds(self, job: Job) -> str | None:
        """Why `job` (of a queue in `affected`) may not start now, or None when it may.

        Waiting for room, its queue-mates that ask for a resource it needs wait (they would take its room, and with
        GPUs raise its queue's usage). Waiting on its
        guarantee, only non-preemptible queue-mates wait: they alone count against it. Waiting on a limit, the jobs
        under that limit wait, except the queue-mates it could take back by tier 3 (preemptible, lower priority).
        A job without GPUs moves neither a guarantee nor a limit."""
        s = self.job
        if job is s:
            return None
        if self.cause is None:
            return QUEUE_MATE if job.spec.queue == s.spec.queue and competes(job, s) else None
        if job.request == 0:
            return None
        if self.cause == GUARANTEE:
            return GUARANTEE if job.spec.queue == s.spec.queue and not job.spec.preemptible else None
        if job.spec.queue == s.spec.queue and job.spec.preemptible and job.spec.priority < s.spec.priority:
            return None
        return LIMIT

    def key(self, queue: str) -> tuple[str, str | None] | None:
        """What a stuck queue's answer read of the reservation: which job holds which of its jobs back."""
        return (self.job.id, self.cause) if queue in self.affected else None


def competes(job: Job, starving: Job) -> bool:
    """Does `job` ask for any resource (GPUs, CPUs, memory) that `starving` needs?"""
    a, b = job.spec, starving.spec
    return (a.gpus > 0 and b.gpus > 0) or (a.cpus > 0 and b.cpus > 0) or (a.memory_gb > 0 and b.memory_gb > 0)
