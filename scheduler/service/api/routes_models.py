"""/v1/models: the registry, promotions with their gates, approvals, rollback, the audit chain, manifests, ROI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from pydantic import Field, field_validator

from scheduler.registry import audit as chain
from scheduler.registry import mlflow_export
from scheduler.registry.manifests import deployment, inference_service, to_yaml
from scheduler.service.api import models_registry as api
from scheduler.service.api.deps import TEXT_OK, Caller, CoreDep, DbId
from scheduler.service.api.edge import Body
from scheduler.service.api.errors import Forbidden, Invalid, NotFound, Unavailable
from scheduler.service.core import queries, registry

router = APIRouter(tags=["models"])
NAME = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# Literal routes beside /models/{name}: a model of that name could never be read back.
RESERVED_NAMES = frozenset({"audit"})


class NewModel(Body):
    name: str = NAME
    queue: str = Field(description="The owning team's queue: its roles decide who registers and who promotes.")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved (GET /v1/models/{name} is another route)")
        return name


class NewVersion(Body):
    job_id: DbId = Field(description="The finished (completed) job that produced the artifact.")
    artifact_uri: str = Field(
        min_length=1,
        max_length=4096,
        description=(
            "A path (or file:// URI) inside the job's output directory, relative to it or absolute; its sha256 is "
            "computed now."
        ),
    )
    # Refused when given (TYPED_IN): the job records them itself. They stay in the model so that an old client
    # is told where they went instead of "extra fields not permitted".
    metrics: dict[str, float] | None = Field(None, description="Refused: the job writes metrics.json.")
    eval_set: str | None = Field(None, description="Refused: the job records it in lineage.json.")
    code_ref: str | None = Field(None, description="Refused: the job records code digests in lineage.json.")
    dataset_ref: str | None = Field(None, description="Refused: the job records data digests in lineage.json.")
    lineage_jobs: list[DbId] = Field(default_factory=list, description="Other jobs that led here (sweeps, data prep).")


class Policy(Body):
    document: dict[str, Any]


class Promotion(Body):
    version: DbId
    stage: Literal["staging", "production"] = "production"


TYPED_IN = (
    "{field} is not accepted: gates use only what the job itself recorded in its output directory "
    "($CORRAL_OUTPUT_DIR): metrics in metrics.json (a JSON object of names to numbers), the eval set and the "
    "digests of code and data in lineage.json; notebooks.outputs.log_metrics() and record_lineage() write "
    "them (docs/models.md)"
)


class MlflowExport(Body):
    tracking_uri: str = Field(
        min_length=1,
        description=("MLflow tracking/registry URI; one of the server's mlflow_tracking_uris (an admin's allow-list)."),
    )


class Rollback(Body):
    stage: Literal["staging", "production"] = "production"


@router.post("/models", status_code=201, response_model=api.ModelCreated)
def create(body: NewModel, who: Caller, core: CoreDep) -> dict[str, Any]:
    return registry.create(core, who, body.name, body.queue, body.description)


@router.get("/models", response_model=api.ModelList)
def list_models(who: Caller, core: CoreDep) -> dict[str, Any]:
    with core.db.connect() as conn:
        return {
            "models": [
                {**r, "aliases": registry.aliases(conn, r["name"])} for r in queries.model_rows(conn, who, core.tree)
            ]
        }


@router.get("/models/audit", response_model=api.ModelAudit, response_model_exclude_unset=True)
def audit(
    who: Caller,
    core: CoreDep,
    model: str | None = None,
    verify: bool = False,
    head: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9a-f]{64}$",
            description=(
                "A head hash kept earlier (logs, /metrics): the chain must still contain it, as its newest entry "
                "or before (only with verify)."
            ),
        ),
    ] = None,
) -> dict[str, Any]:
    """The hash-chained history (of one model, or all the caller may see); with verify, every broken link, every
    stage alias the chain's moves do not lead to, and, given `head`, a chain that no longer holds that head."""
    with core.db.connect() as conn:
        if model is not None:
            registry.model_row(conn, core, who, model)
        elif not who.admin:
            raise Invalid("name a model (only platform admins read the whole chain)", "model")
        rows = registry.audit_rows(conn)
        table, versions = registry.alias_rows(conn), registry.version_rows(conn)
    out: dict[str, Any] = {"entries": [r for r in rows if model is None or r["model"] == model]}
    if rows:
        out["head"] = {"seq": rows[-1]["seq"], "hash": rows[-1]["hash"]}
    if verify:
        # Always the whole chain: a link is checked against its neighbours, and the head against the last row.
        problems = (
            chain.verify(rows, head=head) + chain.alias_problems(rows, table) + chain.version_problems(rows, versions)
        )
        # Other teams' rows stay private: a team sees whether the chain holds, the details are for admins.
        shown = (
            problems
            if who.admin
            else [f"{len(problems)} broken link(s); a platform admin sees where"][: 1 if problems else 0]
        )
        out["verified"] = {"intact": not problems, "problems": shown, "entries": len(rows)}
    return out


@router.get("/promotions", response_model=api.PromotionList)
def list_promotions(
    who: Caller, core: CoreDep, model: str | None = None, state: Literal["open", "promoted", "rejected"] | None = None
) -> dict[str, Any]:
    """Promotion requests of models the caller may see (an approver finds what waits for it here)."""
    with core.db.connect() as conn:
        return {"promotions": queries.promotion_rows(conn, who, core.tree, model, state)}


@router.get("/promotions/{promotion_id}", response_model=api.PromotionDetail)
def get_promotion(promotion_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    with core.db.connect() as conn:
        p = queries.promotion_row(conn, promotion_id)
        if p is None:
            raise NotFound(f"promotion {promotion_id} not found")
        registry.model_row(conn, core, who, p["model"])
        done = queries.approvals_of(conn, promotion_id)
    return {**p, "approvals": done}


@router.get("/models/{name}", response_model=api.ModelDetail)
def show(name: str, who: Caller, core: CoreDep) -> dict[str, Any]:
    with core.db.connect() as conn:
        return registry.show(conn, core, who, name)


@router.put("/models/{name}/policy", response_model=api.PolicyApplied)
def put_policy(name: str, body: Policy, who: Caller, core: CoreDep) -> dict[str, Any]:
    return registry.apply_policy(core, who, name, body.document)


@router.post("/models/{name}/versions", status_code=201, response_model=api.VersionRegistered)
def register(name: str, body: NewVersion, who: Caller, core: CoreDep) -> dict[str, Any]:
    """A version from a completed job's output directory: the artifact is hashed on the hashing pool (503 when
    it is full or too slow), metrics and lineage digests are read from the job's metrics.json and lineage.json."""
    for field in ("metrics", "eval_set", "code_ref", "dataset_ref"):
        if getattr(body, field):  # an old client's empty {} is no claim
            raise Invalid(TYPED_IN.format(field=field), field)
    return registry.register(core, who, name, body.job_id, body.artifact_uri, body.lineage_jobs)


@router.post("/models/{name}/promotions", status_code=201, response_model=api.PromotionAnswer)
def promote(name: str, body: Promotion, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Ask to promote a version: every gate is evaluated now and shown with its evidence; it is promoted at once
    when all pass, otherwise it waits for approvals (or is rejected when a gate fails)."""
    return registry.request_promotion(core, who, name, body.version, body.stage)


@router.post("/promotions/{promotion_id}/approve", response_model=api.PromotionAnswer)
def approve(promotion_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    return registry.approve(core, who, promotion_id)


@router.post("/models/{name}/rollback", response_model=api.RolledBack)
def rollback(name: str, body: Rollback, who: Caller, core: CoreDep) -> dict[str, Any]:
    return registry.rollback(core, who, name, body.stage)


@router.get("/models/{name}/roi", response_model=api.Roi, response_model_exclude_unset=True)
def roi(name: str, who: Caller, core: CoreDep) -> dict[str, Any]:
    with core.db.connect() as conn:
        return registry.roi(conn, core, who, name)


@router.get("/models/{name}/deploy", response_class=Response, responses=TEXT_OK)
def deploy(
    name: str,
    who: Caller,
    core: CoreDep,
    stage: Literal["staging", "production"] = "production",
    kind: Literal["kserve", "deployment"] = "kserve",
    namespace: str = "default",
    image: str = "kserve/huggingfaceserver:latest",
    model_format: str = "pytorch",
    gpus: Annotated[int, Query(ge=0)] = 1,
) -> PlainTextResponse:
    """The manifest serving the version at `stage`: a KServe InferenceService, or a plain Deployment."""
    with core.db.connect() as conn:
        registry.model_row(conn, core, who, name)
        version = registry.aliases(conn, name).get(stage, {}).get("version")
        if version is None:
            raise NotFound(f"{name} has no {stage} version yet")
        v = registry.version_row(conn, name, version)
    where = registry.artifact_location(core, v["artifact_uri"])  # the path on this server now
    if kind == "kserve":
        doc = inference_service(name, version, where, v["digest"], namespace, model_format, gpus)
    else:
        doc = deployment(name, version, image, where, v["digest"], namespace, gpus)
    return PlainTextResponse(to_yaml(doc))


@router.post("/models/{name}/export/mlflow", response_model=api.MlflowExported)
def export_mlflow(name: str, body: MlflowExport, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Mirror the model's versions and stage aliases into an MLflow registry (model owners; needs mlflow), at a
    tracking URI the admin allowed, within mlflow_timeout_s."""
    allowed = core.settings.mlflow_tracking_uris
    if not allowed:
        raise Forbidden(
            "MLflow export is off: a platform admin lists the tracking URIs it may reach in the "
            "setting mlflow_tracking_uris",
            "tracking_uri",
        )
    if body.tracking_uri not in allowed:
        # The URI decides what the server writes (sqlite:, file:) or calls (http:): only an admin names them.
        # The list itself is not shown: an allowed URI may carry credentials.
        raise Forbidden(
            f"tracking URI {body.tracking_uri!r} is not one of the server's mlflow_tracking_uris (ask "
            "a platform admin for the URI to use)",
            "tracking_uri",
        )
    if not mlflow_export.available():
        raise Unavailable("mlflow is not installed on the Corral server (pip install 'corral[mlflow]')")
    with core.db.connect() as conn:
        shown = registry.show(conn, core, who, name)
    if not who.may_promote(core.tree, shown["queue"]):
        raise Forbidden(f"{who.user} ({who.role}) may not export {name}: model owners do")
    stages = {s: a for s, a in shown["aliases"].items() if s != "candidate"}  # MLflow has no use for candidate
    try:
        versions = [
            {**v, "artifact_uri": registry.artifact_location(core, v["artifact_uri"])} for v in shown["versions"]
        ]
        exported = mlflow_export.export_aliases(
            name, versions, stages, body.tracking_uri, core.settings.mlflow_timeout_s
        )
    except mlflow_export.ExportFailed as e:
        raise Unavailable(str(e), "tracking_uri") from e
    return {"model": name, "aliases": exported}
