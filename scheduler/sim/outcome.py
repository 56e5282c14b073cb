"""What `corral sim report` keeps of each replay: per policy (PolicyRun), per queue alone (Private), and the whole
comparison (Report)."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.sim.fragmentation import Fragmentation
from scheduler.sim.metrics import Metrics
from scheduler.sim.waste import Waste


@dataclass
class PolicyRun:
    """One policy's replay of the shared cluster, reduced to what the report shows."""

    policy: str
    metrics: Metrics
    series: tuple[list[float], dict[str, list[float]]]
    waste: Waste
    fragmentation: Fragmentation


@dataclass
class Private:
    """A leaf queue replayed alone on a private cluster the size of its quota (nodes rounded up)."""

    queue: str
    quota: int  # GPUs, over all pools
    gpus: int  # GPUs of the private cluster: quota rounded up to whole nodes
    jobs: int
    rejected: int  # jobs larger than the private cluster
    mean_wait: float | None  # None: no private cluster (quota 0), or no job started there


@dataclass
class Report:
    """Every policy's replay of the shared cluster and every queue's replay alone."""

    runs: list[PolicyRun]
    private: list[Private]
    jobs: int
    capacity: int
