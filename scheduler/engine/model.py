"""What the engine reasons about: pools and nodes, job specs and their live state, settings."""

from __future__ import annotations

import enum
import functools
import math
import re
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


# A MIG profile as NVIDIA names it: compute slices (of 7) "g.", memory "gb", optionally "+me" (media engines).
MIG_PROFILE = re.compile(r"([1-7])g\.([1-9][0-9]*)gb(\+me)?")
MIG_SLICES = 7  # compute slices of a MIG-capable GPU (A100, H100, H200)


def mig_fraction(profile: str) -> float | int:
    """What a MIG slice of `profile` counts in quotas, fair share and usage: its compute slices over 7, to a
    millionth (1g.10gb: 0.142857; 3g.40gb: 0.428571; 7g.80gb: 1). ValueError for a name that is no MIG profile."""
    m = MIG_PROFILE.fullmatch(profile)
    if m is None:
        raise ValueError(f"{profile!r} is not a MIG profile (such as 1g.10gb, 3g.40gb, 7g.80gb)")
    return gpu_amount(int(m.group(1)) / MIG_SLICES)


def gpu_amount(amount: float) -> float | int:
    """GPUs as the engine counts them: whole amounts as ints (so that whole-GPU jobs read and log exactly as
    before), fractions to a millionth (model.exact). Every sum of GPU amounts goes through this."""
    if type(amount) is int:
        return amount
    amount = exact(amount)
    return int(amount) if amount.is_integer() else amount


class Amounts(dict[str, float]):
    """GPUs per name (a queue's usage), 0 for a name not there, as a Counter reads, but typed for fractions."""

    def __missing__(self, key: str) -> float:
        return 0


def add_gpus(a: float, b: float) -> float:
    """a + b GPUs: ints added as ints (the whole-GPU path costs one type test), fractions through gpu_amount, so
    that usage that returns to a whole amount is that int again and compares exactly with whole quotas."""
    if type(a) is int and type(b) is int:
        return a + b
    return gpu_amount(a + b)


def check_gpus(gpus: object, workers: int, where: str) -> float | int:
    """A job's GPUs per worker, checked: a whole number (0 or more), or a fraction in (0, 1) of one GPU for a
    one-worker job. ValueError naming `where` otherwise; the value as gpu_amount writes it."""
    if not is_number(gpus):
        raise ValueError(f"{where}: gpus is {gpus!r}: a number of GPUs per worker")
    assert isinstance(gpus, int | float)
    if gpus < 0:
        raise ValueError(f"{where}: gpus is {gpus}: it cannot be negative")
    amount = gpu_amount(gpus)
    if gpus > 0 and amount == 0:  # rounded to a millionth, it would be 0: a CPU-only job nobody asked for
        raise ValueError(f"{where}: gpus is {gpus}: a fraction must be at least 0.000001 of a GPU")
    if isinstance(amount, float):
        if amount > 1:
            raise ValueError(f"{where}: gpus is {gpus}: above 1 it must be a whole number (a fraction shares one GPU)")
        if workers != 1:
            raise ValueError(
                f"{where}: gpus is {gpus} with {workers} workers: a fraction of a GPU is for one worker only"
            )
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
    """A node as declared: its GPUs, optional CPUs and memory (None: not accounted), labels, topology domain.

    `mig`: the MIG slices the node advertises, profile -> count (a static layout, as NVML or the device plugin's
    node labels report it). The GPUs those slices are cut from are not in `gpus`: a MIG slice is its own
    resource, taken whole by a job that asks for its profile (JobSpec.mig)."""

    name: str
    pool: str
    gpus: int
    cpus: float | None = None
    memory_gb: float | None = None
    domain: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    mig: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for profile, count in self.mig.items():
            try:
                mig_fraction(profile)
            except ValueError as err:
                raise ValueError(f"node {self.name}: mig: {err}") from None
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"node {self.name}: mig {profile}: {count!r} slices; a whole number, 0 or more")
        if self.cpus is not None:
            object.__setattr__(self, "cpus", exact(finite(self.cpus, f"node {self.name}: cpus")))
        if self.memory_gb is not None:
            object.__setattr__(self, "memory_gb", exact(finite(self.memory_gb, f"node {self.name}: memory_gb")))


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for: a gang of `workers` x `gpus` GPUs on one pool (CPUs and memory per worker).

    GPU sharing (docs/scheduling.md, "GPU sharing"): `gpus` may be a fraction in (0, 1) for a one-worker job,
    which then shares one physical GPU with other fractional jobs (never with a whole-GPU job), the fractions
    on a GPU summing to at most 1. `mig`: a MIG profile ("1g.10gb"): the job takes one MIG slice of that profile
    (NodeSpec.mig), one worker, and `gpus` becomes the profile's fraction (mig_fraction: compute slices / 7),
    which is what it counts in quotas, limits, fair share and usage. Whole amounts stay ints, fractions are
    rounded to a millionth (gpu_amount)."""

    id: str
    queue: str
    pool: str
    gpus: float = 1
    workers: int = 1
    cpus: float = 0.0
    memory_gb: float = 0.0
    priority: int = 0
    preemptible: bool = True
    checkpoint: bool = False
    mig: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", exact(finite(self.cpus, f"job {self.id}: cpus")))
        object.__setattr__(self, "memory_gb", exact(finite(self.memory_gb, f"job {self.id}: memory_gb")))
        if type(self.gpus) is not int or self.mig is not None:  # a negative int is the engine's to reject
            self._check_sharing()

    def _check_sharing(self) -> None:
        where = f"job {self.id}"
        if self.mig is not None:
            try:
                fraction = mig_fraction(self.mig)
            except ValueError as err:
                raise ValueError(f"{where}: mig: {err}") from None
            if self.workers != 1:
                raise ValueError(f"{where}: mig {self.mig} with {self.workers} workers: a MIG slice is for one worker")
            object.__setattr__(self, "gpus", fraction)
            return
        object.__setattr__(self, "gpus", check_gpus(self.gpus, self.workers, where))

    @functools.cached_property
    def shared(self) -> bool:
        """Shares a GPU: a fraction of one physical GPU, or a MIG slice."""
        return type(self.gpus) is float or self.mig is not None

    @functools.cached_property
    def request(self) -> float:
        """GPUs of the whole gang (an int for whole GPUs; a MIG slice counts its fraction)."""
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
    # Per worker: (node, GPU indices on it). A fractional job: [(node, [the GPU it shares])], holding spec.gpus
    # of it; a MIG job: [(node, [])], holding one slice of spec.mig there (slices are counted per profile, not
    # numbered: which one is the executor's, as the device plugin's on Kubernetes).
    workers: list[tuple[str, list[int]]] = field(default_factory=list)
    within_quota: bool = False
    reason: Reason | None = None
    skipped_since: float | None = None  # starvation guard: first time a younger job started past it

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def request(self) -> float:
        return self.spec.request

    def shape(self) -> tuple[int, float, float, float, bool, int, str | None]:
        """What admission reads of the job itself: two jobs of one queue with the same shape get the same answer."""
        s = self.spec
        return (s.workers, s.gpus, s.cpus, s.memory_gb, s.preemptible, s.priority, s.mig)

    def order_key(self) -> tuple[int, float, int]:
        """Queue order: priority (high first), then submit time, then submission order."""
        return (-self.spec.priority, self.submit, self.seq)

    def placement(self) -> dict[str, list[int]]:
        """GPU indices per node, all workers on a node merged."""
        out: dict[str, list[int]] = {}
        for node, gpus in self.workers:
            out.setdefault(node, []).extend(gpus)
        return {n: sorted(g) for n, g in sorted(out.items())}
