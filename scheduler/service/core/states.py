"""The states the service stores for jobs and their attempts: StrEnums whose values are the stored strings."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """A job's state, as the jobs table and the API keep it (a sandbox is a job of kind sandbox: the same states)."""

    PENDING = "pending"  # waiting for the engine to admit it
    STARTING = "starting"  # admitted: GPUs reserved, its process not launched yet
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED)
LIVE = (JobState.PENDING, JobState.STARTING, JobState.RUNNING)  # job states the engine knows about
PLACED = (JobState.STARTING, JobState.RUNNING)  # admitted and not ended: holding (or about to hold) GPUs


class AttemptState(StrEnum):
    """An attempt's state, as the attempts table keeps it."""

    STARTING = "starting"  # admitted, its process not launched yet
    RUNNING = "running"
    STOPPING = "stopping"  # signalled (SIGTERM), its process not gone yet
    ENDED = "ended"


HOLDING = (AttemptState.RUNNING, AttemptState.STOPPING)  # attempt states whose process may still hold its GPUs


class PromotionState(StrEnum):
    """A model promotion request's state (promotions.state)."""

    OPEN = "open"  # gates pending (approvals, a hook)
    PROMOTED = "promoted"
    REJECTED = "rejected"  # a gate failed


class AttemptOutcome(StrEnum):
    """How an attempt ended (attempts.outcome)."""

    COMPLETED = "completed"
    FAILED = "failed"
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"
    LAUNCH_FAILED = "launch_failed"
    MAX_RUNTIME = "max_runtime"
    NEVER_STARTED = "never_started"
