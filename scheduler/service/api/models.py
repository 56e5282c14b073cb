"""The API's answers as pydantic models: routes declare them, OpenAPI shows them, the SDK and CLI read them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.service.core.states import AttemptState, JobState

Json = dict[str, Any]  # a document kept as given (a job spec, a queue tree, an audit entry's detail)


class Answer(BaseModel):
    """Every answer: its fields as listed; the clients read answers of newer servers, so they ignore extra ones."""

    model_config = ConfigDict(extra="ignore")


# ----- jobs -----


class Reason(Answer):
    """Why a job is where it is: the engine's rule, its message and the numbers it compared (job ids a caller may
    not read are redacted: "hidden")."""

    model_config = ConfigDict(extra="allow")  # stored with the job: kept whole

    rule: str
    message: str
    numbers: dict[str, Any] = Field(default_factory=dict)


class JobView(Answer):
    """A job (or a sandbox: kind "sandbox") as the API shows it."""

    id: int
    name: str
    owner: str
    queue: str
    pool: str
    state: JobState
    gpus: int | float = Field(
        description="The whole gang's GPUs: workers x GPUs per worker; a share of one GPU (0.25) or a MIG slice's "
        "fraction (compute slices / 7)."
    )
    workers: int
    priority: int
    preemptible: bool
    submitted_at: float
    started_at: float | None = Field(description="The first start (admission): the wait ends here.")
    ended_at: float | None
    attempt: int = Field(description="The latest attempt; 0: never started.")
    exit_code: int | None
    reason: Reason | None = Field(description="For a pending job, what blocks it now; else the last decision's.")
    labels: dict[str, str]
    idempotency_key: str | None
    kind: Literal["job", "sandbox"]
    spec: Json = Field(description="The spec as submitted, with defaults; secret-looking env values are hidden.")


class AttemptView(Answer):
    """One attempt of a job: where it was placed and how it went."""

    job_id: int
    attempt: int
    state: AttemptState
    placement: list[tuple[str, list[int]]] = Field(
        description="[node, [GPU indices]] per worker; a MIG slice: [node, []] (its profile is in the job's spec)."
    )
    gpus: int | float
    pid: int | None
    proc_started: float | None
    admitted_at: float
    started_at: float | None = Field(description="Its process launched: GPUs held from here.")
    ended_at: float | None
    stop_deadline: float | None
    exit_code: int | None
    outcome: str | None = Field(description="How it ended (states.AttemptOutcome); None while it lives.")
    admission: int | None


class JobDetail(JobView):
    """GET /v1/jobs/{id}: the job and its attempts, oldest first."""

    attempts: list[AttemptView]


class JobList(Answer):
    jobs: list[JobView]


class Event(Answer):
    id: int
    at: float
    job_id: int | None
    kind: str
    message: str
    data: Json


class EventList(Answer):
    events: list[Event]


class Preemption(Reason):
    """A preemption the job suffered: the reason, when, by which job (None: the cluster) and the cause."""

    at: float
    by: Any
    cause: str | None


class Explanation(Answer):
    job: int
    state: JobState
    reason: Reason | None
    preemptions: list[Preemption]


# ----- sandboxes -----


class Idle(Answer):
    """A running sandbox's idle stretch (the culler's)."""

    idle_since: float
    stop_at: float
    seconds_left: float
    stop_in: str
    stop_at_text: str
    warning: str | None


class Address(Answer):
    host: str
    port: int


class SandboxView(JobView):
    """A sandbox, with its idle stretch and where its server listens once it runs (None until then)."""

    idle: Idle | None
    address: Address | None
    url: str | None


class SandboxList(Answer):
    sandboxes: list[JobView]


# ----- queues, pools, usage -----


class QueuePoolView(Answer):
    """One queue in one pool: its settings and the live numbers, in GPUs (usage counts the whole subtree)."""

    quota: int = Field(description="Guaranteed GPUs.")
    limit: int | None = Field(description="The most GPUs the queue may hold; None: no limit.")
    weight: float = Field(description="Its weight in the fair-share split among its siblings.")
    fair_share: float = Field(description="The GPUs the queue is due now (weighted water-filling of demand).")
    usage: int | float = Field(description="GPUs its running jobs hold (shares of GPUs count their fraction).")
    np_usage: int | float = Field(
        description=(
            "GPUs its non-preemptible running jobs hold (sandboxes, preemptible: false): what the guarantee rule "
            "counts against quota, since preemptible jobs can always be taken back."
        )
    )
    borrowed: int | float = Field(description="usage above quota: the GPUs a reclaim takes back first.")
    pending_jobs: int
    pending_gpus: int | float = Field(description="GPUs the pending jobs ask.")
    running_jobs: int


class QueueView(Answer):
    """A queue of the tree with its numbers per pool."""

    name: str
    parent: str | None
    leaf: bool
    pools: dict[str, QueuePoolView]


class QueueTreeView(Answer):
    """The answer of GET /v1/queues: the tree's version and the queues the caller may see."""

    version: int
    queues: list[QueueView]


class DocumentVersion(Answer):
    """A version of a document kept with its history (the queue tree, the admission policy)."""

    version: int
    author: str
    created_at: float
    comment: str
    document: Json


class History(Answer):
    versions: list[DocumentVersion]


class QueueChange(Answer):
    """A queue added (after), removed (before) or changed (fields: name -> before, after)."""

    queue: str
    change: Literal["added", "removed", "changed"]
    before: Json | None = None
    after: Json | None = None
    fields: dict[str, Json] | None = None


class QueuesApplied(Answer):
    """What an apply (or a rollback) of the tree changes; applied is false on a dry run or when nothing changes."""

    version: int
    diff: list[QueueChange]
    applied: bool


class GpuShare(Answer):
    job: int | Literal["hidden"] = Field(description="A job holding a share of the GPU; hidden: not the caller's.")
    fraction: float = Field(description="The share of the GPU it holds, in (0, 1).")


class GpuView(Answer):
    index: int
    model: str | None
    uuid: str | None
    memory_mb: int | None
    job: int | Literal["hidden"] | None = Field(
        description="The job holding it (a shared GPU: its first share's); hidden: one the caller may not see."
    )
    shares: list[GpuShare] = Field(
        default_factory=list, description="A shared GPU: every job's share of it (they sum to at most 1)."
    )


class MigView(Answer):
    profile: str = Field(description="A MIG profile the node advertises (1g.10gb).")
    slices: int = Field(description="Slices of that profile on the node.")
    free: int
    jobs: list[int | Literal["hidden"]] = Field(description="The jobs holding one slice each.")


class NodeView(Answer):
    name: str
    up: bool
    cordoned: bool
    gpus: list[GpuView]
    mig: list[MigView] = Field(default_factory=list, description="Its MIG slices, by profile (a static layout).")


class PoolView(Answer):
    name: str
    capacity: int | float
    free: int
    nodes: list[NodeView]


class PoolList(Answer):
    pools: list[PoolView]


class QueueHours(Answer):
    queue: str
    gpu_hours: float


class UserHours(Answer):
    user: str
    gpu_hours: float


class PoolHours(Answer):
    pool: str
    capacity_gpu_hours: float
    held_gpu_hours: float
    idle_gpu_hours: float


class Usage(Answer):
    """GPU-hours per queue, user and pool over [since, until]."""

    since: float
    until: float
    queues: list[QueueHours]
    users: list[UserHours]
    pools: list[PoolHours]


class Demand(Answer):
    """What one leaf queue asked of one pool over the range (scheduler.sim.recorded.Demand)."""

    queue: str
    pool: str
    used_gpu_hours: float
    waiting_gpu_hours: float
    jobs: int
    started: int
    mean_wait_s: float
    p95_wait_s: float
    largest_nonpreemptible: int


class UsageExport(Answer):
    """The range as simulator inputs: the trace (CSV), the cluster document and the recorded demand."""

    format: Literal["trace"]
    since: float
    until: float
    jobs: int
    skipped: dict[str, int]
    trace: str
    cluster: Json
    warnings: list[str]
    demand: list[Demand]
    scope: str | None


# ----- tokens and audit -----


class TokenCreated(Answer):
    id: int
    user: str
    role: str
    scope: str | None
    token: str = Field(description="The secret: shown in this answer only.")
    expires_at: float | None


class TokenRevoked(Answer):
    id: int
    revoked: bool


class AuditEntry(Answer):
    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: Json


class AuditLog(Answer):
    entries: list[AuditEntry]


# ----- admission -----


class AdmissionPolicyView(Answer):
    version: int = Field(description="0: no policy applied yet.")
    document: Json


class RuleChange(Answer):
    rule: str
    change: Literal["added", "removed", "changed"]
    before: Json | None
    after: Json | None


class AdmissionApplied(Answer):
    version: int
    diff: list[RuleChange]
    applied: bool


class RuleApplied(Answer):
    rule: str
    change: str


class Rejection(Answer):
    rule: str
    field: str
    value: Any
    message: str


class AdmissionTest(Answer):
    """What the policy would do to a job: allowed, the job with defaults, the changes, the rejection."""

    policy_version: int
    allowed: bool
    job: Json
    applied: list[RuleApplied]
    rejected: Rejection | None


# ----- health -----


class Readiness(Answer):
    """GET /readyz (200 ready, 503 not): why not, and this instance's role (single, leader, follower)."""

    ready: bool
    role: Literal["single", "leader", "follower"] | None = None
    why: str | None = None
    leader: str | None = Field(None, description="A follower's leader: the URL it forwards to.")
