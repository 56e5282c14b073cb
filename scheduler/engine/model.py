"""What the engine reasons about: pools and nodes, job specs and their live state, settings."""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


def exact(amount: float) -> float:
    """CPUs or memory to a millionth. Requests and node sizes are rounded so, and free amounts after every sum: float
    adds do not undo (2.0 - 0.1 - 0.3 - 0.2 - 0.7 + 0.1 + 0.3 + 0.2 + 0.7 is 1.9999999999999998), and a node whose
    jobs have all left must hold a job of its full size, a victim put back must leave exactly what it found."""
    return round(amount, 6)


def non_finite(value: object) -> str | None:
    """How `value` is written in JSON when it is a float that is not finite ("NaN", "Infinity", "-Infinity"), None
    for anything else. The one test of finiteness in Corral (the request edge, metrics files, the SDK, stored
    values shown in responses use it; migration 0007 keeps a frozen copy): Python's JSON reads these as floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return None


def is_number(value: object) -> bool:
    """An int or a finite float, and not a bool (Python's True == 1, but `true` is no measurement)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and non_finite(value) is None


def finite(amount: float, what: str) -> float:
    """`amount` if it is a finite number; else ValueError. Free CPUs and memory are sums of requests: one infinite
    request makes a node's free amount inf - inf = NaN, which no comparison satisfies, so nothing fits there again."""
    if non_finite(float(amount)) is not None:
        raise ValueError(f"{what} is {amount}: CPUs and memory must be finite numbers")
    return amount


@dataclass(frozen=True)
class Settings:
    """Engine settings. Times are seconds on the caller's clock (virtual in the simulator, wall in the service)."""

    # A running job is not a preemption victim before it has run this long: a restart costs its warm-up,
    # so very young jobs are protected from churn. 0 in the simulator unless a scenario sets it.
    min_runtime: float = 0.0
    # The head job of a queue that younger jobs of its pool have skipped for this long gets a reservation
    # (see docs/scheduling.md). An hour: long enough that ordinary backfill is never disturbed.
    starvation_timeout: float = 3600.0


@dataclass(frozen=True)
class NodeSpec:
    """A node as declared: its GPUs, optional CPUs and memory (None: not accounted), labels, topology domain."""

    name: str
    pool: str
    gpus: int
    cpus: float | None = None
    memory_gb: float | None = None
    domain: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cpus is not None:
            object.__setattr__(self, "cpus", exact(finite(self.cpus, f"node {self.name}: cpus")))
        if self.memory_gb is not None:
            object.__setattr__(self, "memory_gb", exact(finite(self.memory_gb, f"node {self.name}: memory_gb")))


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for: a gang of `workers` x `gpus` GPUs on one pool (CPUs and memory per worker)."""

    id: str
    queue: str
    pool: str
    gpus: int = 1
    workers: int = 1
    cpus: float = 0.0
    memory_gb: float = 0.0
    priority: int = 0
    preemptible: bool = True
    checkpoint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", exact(finite(self.cpus, f"job {self.id}: cpus")))
        object.__setattr__(self, "memory_gb", exact(finite(self.memory_gb, f"job {self.id}: memory_gb")))

    @functools.cached_property
    def request(self) -> int:
        """GPUs of the whole gang."""
        return self.workers * self.gpus


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def finished(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class Reason:
    """Why a job waits, was rejected or was preempted: the rule, a sentence with the numbers, and the numbers."""

    rule: str
    message: str
    numbers: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(eq=False)
class Job:
    """A job and its live state inside the engine."""

    spec: JobSpec
    submit: float
    seq: int  # submission order: the last tie-break everywhere
    state: JobState = JobState.PENDING
    start: float = math.nan
    admitted: int = -1  # admission counter at the last start: "admitted later" ties at one instant
    # Per worker: (node, GPU indices on it).
    workers: list[tuple[str, list[int]]] = field(default_factory=list)
    within_quota: bool = False
    reason: Reason | None = None
    skipped_since: float | None = None  # starvation guard: first time a younger job started past it

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def request(self) -> int:
        return self.spec.request

    def shape(self) -> tuple[int, int, float, float, bool, int]:
        """What admission reads of the job itself: two jobs of one queue with the same shape get the same answer."""
        s = self.spec
        return (s.workers, s.gpus, s.cpus, s.memory_gb, s.preemptible, s.priority)

    def order_key(self) -> tuple[int, float, int]:
        """Queue order: priority (high first), then submit time, then submission order."""
        return (-self.spec.priority, self.submit, self.seq)

    def placement(self) -> dict[str, list[int]]:
        """GPU indices per node, all workers on a node merged."""
        out: dict[str, list[int]] = {}
        for node, gpus in self.workers:
            out.setdefault(node, []).extend(gpus)
        return {n: sorted(g) for n, g in sorted(out.items())}
