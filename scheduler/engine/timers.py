"""When the engine must look again though no input came: its jobs' timers (min_runtime, the guard), plain instants."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from scheduler.engine.model import Job, JobState


class Wakeups:
    """A job's timer is (when it ends, job id, the instant it began, whether it runs while the job does): the guard
    clock of a pending job (began at skipped_since) or min_runtime of a running preemptible one (began at its start).
    It is valid while the job still has that clock; the others are dropped when read. So the instants the engine
    wakes at follow from its jobs alone, and an engine rebuilt from them (restore, submit(overtaken_at=)) wakes when
    its twin that never restarted does. Plain instants are the baselines' own timers."""

    def __init__(self, jobs: Mapping[str, Job]) -> None:
        self.jobs = jobs
        self.plain: list[float] = []
        self.timers: list[tuple[float, str, float, bool]] = []

    def at(self, when: float) -> None:
        heapq.heappush(self.plain, when)

    def guard(self, job: Job, timeout: float) -> None:
        """The job's starvation-guard clock (skipped_since) ends after `timeout`."""
        assert job.skipped_since is not None
        heapq.heappush(self.timers, (job.skipped_since + timeout, job.id, job.skipped_since, False))

    def aging(self, job: Job, min_runtime: float) -> None:
        """A preemptible job becomes a possible victim once min_runtime has passed: look again then."""
        if min_runtime > 0 and job.spec.preemptible:
            heapq.heappush(self.timers, (job.start + min_runtime, job.id, job.start, True))

    def due(self, now: float) -> bool:
        """Has some timer or instant ended by `now`?"""
        timer = self._first_timer(None)
        return (bool(self.plain) and self.plain[0] <= now) or (timer is not None and timer <= now)

    def next(self, now: float) -> float | None:
        """The first instant after `now`; drops the ended ones."""
        plain = self.plain
        while plain and plain[0] <= now:
            heapq.heappop(plain)
        timer = self._first_timer(now)
        first = plain[0] if plain else None
        return first if timer is None else timer if first is None else min(first, timer)

    def _first_timer(self, after: float | None) -> float | None:
        """When the first valid timer ends after `after` (None: any); drops ended and stale ones on the way."""
        timers, jobs = self.timers, self.jobs
        while timers:
            until, job_id, began, running = timers[0]
            j = jobs.get(job_id)  # None: forgotten
            if (
                (after is None or until > after)
                and j is not None
                and (
                    (j.state is JobState.RUNNING and j.start == began)
                    if running
                    else (j.state is JobState.PENDING and j.skipped_since == began)
                )
            ):
                return until
            heapq.heappop(timers)
        return None
