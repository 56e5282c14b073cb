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
    cause: str  # reclaim | fair_share | priority | node_down
    by: str | None
    reason: Reason


@dataclass(frozen=True)
class Rejected:
    job: str
    reason: Reason


Decision = Started | Preempted | Rejected
