"""/v1/admission: the admission policy in force, apply (platform admins), history, rollback, and test a job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from scheduler.service.api import models as api
from scheduler.service.api.deps import Caller, CoreDep, DbId
from scheduler.service.api.edge import Body
from scheduler.service.core import admission
from scheduler.service.core.specs import JobSubmit

router = APIRouter()


class Apply(Body):
    document: dict[str, Any] = Field(description="The whole policy: {rules: [...], hook: ...}, as in policy.yaml.")
    comment: str = ""
    dry_run: bool = Field(False, description="Validate and show the diff without applying it.")
    expected_version: int | None = Field(None, description="Apply only if the policy is still at this version.")


class Rollback(Body):
    version: DbId


@router.get("/admission", tags=["admission"], response_model=api.AdmissionPolicyView)
def policy(who: Caller, core: CoreDep) -> dict[str, Any]:
    """The policy in force and its version (0: none applied yet)."""
    number, doc = admission.current(core)
    return {"version": number, "document": doc.model_dump(mode="json", exclude_defaults=True)}


@router.post("/admission/apply", tags=["admission"], response_model=api.AdmissionApplied)
def apply(body: Apply, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Replace the policy after validating it as a whole (platform admins); answers the diff."""
    return admission.apply(core, who, body.document, body.comment, body.dry_run, body.expected_version)


@router.get("/admission/history", tags=["admission"], response_model=api.History)
def history(who: Caller, core: CoreDep) -> dict[str, Any]:
    """Every version with author, time and comment."""
    with core.db.connect() as conn:
        return {"versions": admission.history(conn)}


@router.post("/admission/rollback", tags=["admission"], response_model=api.AdmissionApplied)
def rollback(body: Rollback, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Apply an earlier version again (as a new version, so history only grows)."""
    return admission.rollback(core, who, body.version)


@router.post("/admission/test", tags=["admission"], response_model=api.AdmissionTest)
def test(body: JobSubmit, who: Caller, core: CoreDep) -> dict[str, Any]:
    """What the policy would do to this job spec: allowed, the job with defaults, changes, the rejection.
    Nothing is submitted."""
    return admission.preview(core, who, body)
