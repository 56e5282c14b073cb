"""The model registry's answers (/v1/models, /v1/promotions) as pydantic models, beside models (api/models.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from scheduler.service.api.models import Answer, Json
from scheduler.service.core.states import PromotionState


class Alias(Answer):
    version: int
    previous: int | None = Field(description="What a rollback restores.")
    updated_at: float


class ModelCreated(Answer):
    name: str
    queue: str
    description: str


class ModelView(ModelCreated):
    created_at: float
    created_by: str
    aliases: dict[str, Alias] = Field(description="Stage (candidate, staging, production) -> its version.")


class ModelList(Answer):
    models: list[ModelView]


class VersionView(Answer):
    model: str
    version: int
    job_id: int
    lineage: Json
    metrics: dict[str, Any]
    eval_set: str | None
    artifact_uri: str
    digest: str
    registered_at: float
    registered_by: str


class PolicyView(Answer):
    version: int
    document: Json


class ModelDetail(ModelView):
    versions: list[VersionView]
    policy: PolicyView


class PolicyApplied(Answer):
    model: str
    policy_version: int


class VersionRegistered(Answer):
    model: str
    version: int
    digest: str
    lineage: Json


class Gate(Answer):
    gate: str
    status: Literal["pass", "fail", "pending"]
    evidence: str


class PromotionAnswer(Answer):
    """A promotion request after its gates were evaluated (at the request or at an approval)."""

    promotion: int
    model: str
    version: int
    stage: str
    state: PromotionState
    gates: list[Gate]


class PromotionView(Answer):
    id: int
    model: str
    version: int
    stage: str
    requester: str
    created_at: float
    state: PromotionState
    gates: list[Gate]
    decided_at: float | None


class PromotionList(Answer):
    promotions: list[PromotionView]


class Approval(Answer):
    promotion_id: int
    approver: str
    at: float


class PromotionDetail(PromotionView):
    approvals: list[Approval]


class RolledBack(Answer):
    model: str
    stage: str
    version: int
    previous: int


class VersionRoi(Answer):
    version: int
    jobs: list[int]
    gpu_hours: float


class ProductionRoi(Answer):
    version: int
    gpu_hours: float


class Roi(Answer):
    """GPU-hours of the jobs in each version's lineage; production: only once a version is in production."""

    model: str
    versions: list[VersionRoi]
    production: ProductionRoi | None = None


class ChainEntry(Answer):
    seq: int
    at: float
    actor: str
    action: str
    model: str
    detail: Json
    prev_hash: str
    hash: str


class ChainHead(Answer):
    seq: int
    hash: str


class Verified(Answer):
    intact: bool
    problems: list[str]
    entries: int


class ModelAudit(Answer):
    """The chain's entries; head once there is one; verified only when asked."""

    entries: list[ChainEntry]
    head: ChainHead | None = None
    verified: Verified | None = None


class MlflowExported(Answer):
    model: str
    aliases: dict[str, int]
