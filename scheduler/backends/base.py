"""The small interface between the scheduling service and whatever runs jobs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from scheduler.engine.model import NodeSpec


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU, as NVML or nvidia-smi -L lists it: CUDA_VISIBLE_DEVICES=<uuid> selects it."""

    uuid: str  # "MIG-<uuid>"
    profile: str  # "1g.10gb"
    memory_mb: int = 0


@dataclass(frozen=True)
class GPUInfo:
    """One GPU of a node as discovered (NVML) or declared. A GPU in MIG mode is not usable whole: its instances
    (`mig`, as the admin made them; Corral never changes a GPU's MIG mode or layout) are scheduled by profile."""

    index: int
    model: str
    memory_mb: int = 0
    uuid: str | None = None
    mig_mode: bool = False
    mig: tuple[MigDevice, ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    """A node as a backend found it (this machine, a Ray node, a Kubernetes node): its pool and GPUs."""

    name: str
    pool: str
    gpus: list[GPUInfo]
    cpus: float | None = None
    memory_gb: float | None = None
    address: str | None = None  # how the backend reaches it (a Ray node's IP); None for this machine
    # Cordoned (Kubernetes: spec.unschedulable): nothing new is placed there, what runs there stays. Not part of
    # its shape (spec()): cordoning or uncordoning changes no pool's size.
    cordoned: bool = False
    # GPU index -> a reading now (NVML: a sandbox.culling.GpuSample), for metrics and idle culling; None where
    # nothing can be measured from here (declared GPUs, remote nodes).
    sample: Callable[[], Mapping[int, Any] | None] | None = None

    # How the node's GPUs are shared as it advertises them (Kubernetes: the NVIDIA device plugin's time-slicing and
    # MIG resources; Ray: mig-<profile> custom resources); None: whole GPUs, MIG read from `gpus` (this machine).
    sharing: GpuSharing | None = None

    def whole(self) -> list[GPUInfo]:
        """The GPUs usable whole (or by fractions), in order: engine GPU index k is whole()[k]. GPUs in MIG mode
        are left out: they are offered as their MIG instances, by profile."""
        return [g for g in self.gpus if not g.mig_mode]

    def mig_counts(self) -> dict[str, int]:
        """MIG instances per profile, over all GPUs of the node (Kubernetes: as the device plugin advertises)."""
        if self.sharing is not None and self.sharing.mig:
            return dict(self.sharing.mig)
        out: dict[str, int] = {}
        for g in self.gpus:
            for m in g.mig if g.mig_mode else ():
                out[m.profile] = out.get(m.profile, 0) + 1
        return dict(sorted(out.items()))

    def spec(self) -> NodeSpec:
        return NodeSpec(self.name, self.pool, len(self.whole()), self.cpus, self.memory_gb, mig=self.mig_counts())


@dataclass(frozen=True)
class GpuSharing:
    """GPU sharing a node advertises: the NVIDIA device plugin's on Kubernetes (kubernetes/sharing.gpu_sharing),
    MIG custom resources on Ray."""

    resource: str = "nvidia.com/gpu"  # what a whole or shared GPU is requested as ("nvidia.com/gpu.shared" renamed)
    replicas: int = 1  # time-slicing replicas per physical GPU (label nvidia.com/gpu.replicas); 1: not shared
    mig: Mapping[str, int] = field(default_factory=dict)  # MIG profile -> instances advertised
    mig_single: bool = False  # MIG strategy "single": the instances are advertised as nvidia.com/gpu


@dataclass(frozen=True)
class Launch:
    """What an executor needs to start one attempt of a job on GPUs the engine chose."""

    job_id: str
    attempt: int  # 1 for the first start, +1 after each preemption or requeue: its own run directory
    command: Sequence[str]  # argv; a single string is run by /bin/sh -c
    gpus: Mapping[str, Sequence[int]]  # node -> GPU indices (the local executor has one node)
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    image: str | None = None  # for Kubernetes and Ray; the local executor ignores it
    cpus: float | None = None  # per worker, as submitted; None: not asked (Kubernetes: the pod's requests)
    memory_gb: float | None = None  # per worker, GiB; None: not asked (Kubernetes: request and limit)
    owner: str = ""  # the submitting user: the local executor runs the attempt as that user's own account
    # A share of one GPU (one worker): the fraction of the GPU in `gpus` it holds, in (0, 1); None: whole GPUs.
    gpu_fraction: float | None = None
    # A MIG instance of this profile ("1g.10gb") on the node in `gpus` (whose GPU list is then empty): the
    # executor picks a free instance of that profile; None: no MIG.
    mig: str | None = None


def server_port(env: Mapping[str, str], default: int = 8888) -> int:
    """The port a sandbox's server listens on: the one in the URL the hub gave it (JupyterHub's bind URL), else
    jupyter-server's default."""
    url = env.get("JUPYTERHUB_SERVICE_URL")
    return (urlsplit(url).port if url else None) or default


@dataclass(frozen=True)
class Exit:
    """An attempt that ended: its exit code (negative: killed by that signal; None: vanished, no code)."""

    job_id: str
    attempt: int
    code: int | None
    detail: str = ""
    # Ended by the cluster, not by the job: its node is being drained (cordoned, its pods evicted). The job waits
    # again, keeping its place, as if preempted.
    drained: bool = False


@dataclass(frozen=True)
class Handle:
    """What the service stores to find a running attempt again after a restart."""

    job_id: str
    attempt: int
    pid: int | None
    started_at: float  # the process's own start time, so a reused pid is never mistaken for the job


class Executor(Protocol):
    """Runs attempts; the service owns all scheduling state and asks the executor only to act and report."""

    def launch(self, launch: Launch) -> Handle: ...

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        """Ask the attempt to stop (SIGTERM); it is killed (SIGKILL) once `grace_s` has passed (see poll)."""

    def poll(self, now: float) -> list[Exit]:
        """Attempts that ended since the last poll; also escalates terminations whose grace has passed."""

    def adopt(self, handle: Handle) -> Exit | None:
        """After a restart: take back a live attempt (None), or say how it ended while nobody watched."""

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        """Paths of the attempt's stdout and stderr files."""

    def alive(self, job_id: str, attempt: int) -> bool: ...


OUTPUT_ENV = "CORRAL_OUTPUT_DIR"  # where a job writes what it produced: artifacts, metrics.json, lineage.json


@runtime_checkable
class KeepsOutputs(Protocol):
    """An executor whose attempts write their outputs where the service can read them (this machine). Model
    versions are registered only from a job's own output directory, and their gate metrics read from it."""

    def output_dir(self, job_id: str, attempt: int) -> Path:
        """The attempt's output directory (also $CORRAL_OUTPUT_DIR in its environment)."""


@runtime_checkable
class ReportsPids(Protocol):
    """An executor whose attempts are processes of this machine (the local one): the idle culler judges a sandbox
    on a shared GPU by its own processes' NVML readings, not the whole GPU's."""

    def pids(self, job_id: str, attempt: int) -> set[int] | None:
        """The attempt's host pids now; None when it does not run here."""


@runtime_checkable
class ChecksWorkdirs(Protocol):
    """An executor that runs jobs on this machine, so it can tell at submission whether a job's working directory
    would work (the local one: a directory the owner's account may enter)."""

    def may_use_workdir(self, owner: str, workdir: str) -> bool: ...


@runtime_checkable
class KnowsAddresses(Protocol):
    """An executor whose attempts run where the service cannot tell (Kubernetes: at a pod's IP). Without it, a
    sandbox's server listens on its node's address (this machine: 127.0.0.1) at the port the hub gave it."""

    def address(self, job_id: str, attempt: int) -> tuple[str, int] | None:
        """Where worker 0 of a running attempt listens (host, port); None while not known yet (or gone)."""


@dataclass(frozen=True)
class NodeChange:
    """A node that went down (info None: not ready, or `deleted`) or is there (info: what it offers now, and whether
    it is cordoned)."""

    name: str
    info: NodeInfo | None
    deleted: bool = False


@dataclass(frozen=True)
class Held:
    """What pods Corral did not place hold on a node (Kubernetes: a DaemonSet's, kube-scheduler's): out of its room."""

    gpus: int
    cpus: float
    memory_gb: float


@runtime_checkable
class SharesNodes(Protocol):
    """An executor whose nodes also run work Corral did not place (Kubernetes): the service counts it on each node
    before placing anything there, and asks before another scheduler's bind onto one of Corral's nodes."""

    def held(self, now: float) -> dict[str, Held]:
        """Every node whose outside work changed since the last call: what it holds there now. The first call
        knows the whole cluster (it may block on a list); later ones never block for long."""

    def binding(self, namespace: str, pod: str) -> tuple[str, Held] | None:
        """The pod's UID and what it would hold, for a bind of another scheduler's (None: Corral schedules it
        itself, or it is gone)."""

    def admit(self, uid: str, node: str, held: Held) -> None:
        """A bind of that pod to `node` was allowed: count it on the node now."""


@runtime_checkable
class WatchesNodes(Protocol):
    """An executor whose cluster's nodes change while Corral runs (Kubernetes): the service asks every cycle."""

    def node_changes(self, now: float) -> list[NodeChange]:
        """Changes since the last call, oldest first; never blocks for long (a cycle waits on it)."""


CLUSTER_OWNER = "system:cluster"  # owner of the jobs the cluster brought (Arrival): give no API token this user name


@dataclass(frozen=True)
class Arrival:
    """Work the cluster brought rather than the API (pods another controller made for Corral to schedule), or,
    with spec None, such work withdrawn before it was admitted (its pods were deleted)."""

    key: str  # the backend's name for it, the same after a restart: the job's idempotency key
    spec: Mapping[str, Any] | None  # a job spec (JobSubmit's fields) whose env names the key for launch()
    # The queue subtree it may use, as if a member of that team submitted it; None: any queue (the executor vouches).
    scope: str | None = None


@runtime_checkable
class TakesArrivals(Protocol):
    """An executor whose cluster brings work of its own. Such a job is not requeued when preempted: its pods are
    deleted, and the new ones their owner makes arrive as new work."""

    def arrivals(self, now: float) -> list[Arrival]:
        """Arrivals and withdrawals since the last call; after a (re)start, every waiting one again."""

    def refuse(self, key: str, why: str) -> None:
        """Tell the arrival's owner that Corral will not run it, and why (it is not offered again)."""

    def settled(self) -> bool:
        """False while some waiting work could not be looked at yet (it is offered once it can be)."""


@runtime_checkable
class LaunchesInParallel(Protocol):
    """An executor whose launch() may run in several threads at once (its work is waiting on a cluster's API, not
    this machine): the service starts up to launch_parallelism admitted attempts together."""

    launch_parallelism: int
