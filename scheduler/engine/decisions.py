"""What the engine decides: start a job on GPUs, preempt one, reject one; each with its reason."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.engine.model import Reason


@dataclass(frozen=True)
class Started:
    job: str
    placement: dict[str, list[int]]  # node -> GPU indices
    reason: Reason
    workers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # per worker: (node, GPU indices)


@dataclass(frozen=True)
class Preempted:
    job: str
    cause: str  # reclaim | fair_share | priority | node_down | node_drained
    by: str | None
    reason: Reason


@dataclass(frozen=True)
class Rejected:
    job: str
    reason: Reason


Decision = Started | Preempted | Rejected

# Why the starvation guard held a job back (Hold.cause): kept off the nodes held for the starving job; a queue-mate
# of a starving job that waits for room; a non-preemptible queue-mate of one that waits on its guarantee; a job
# that would raise the usage of the limit a starving job waits on.
HELD_NODES, QUEUE_MATE, GUARANTEE, LIMIT = "held_nodes", "queue_mate", "guarantee", "limit"


@dataclass(frozen=True)
class Hold:
    """The starvation guard kept `job` from starting at `at`, for the starving job `starving` (not a decision:
    a record the simulator's report and the property tests read)."""

    at: float
    job: str
    starving: str
    cause: str
