"""The golden path in the service: models, versions from finished jobs, gated promotions, rollback, audit chain.

A version comes only from its job's own output directory (an executor that KeepsOutputs): the artifact must lie
there, and the gates' metrics and the lineage digests are what the job wrote there (metrics.json, lineage.json).
Artifacts are pre-walked and hashed on the hashing pool (scheduler/service/core/hashing.py), never on a request
thread and never inside a transaction; the digest is recomputed at promotion and at rollback. After each committed
change the audit chain's new head is logged, and /metrics shows it (corral_model_audit_head), so an auditor can
keep it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import sqlalchemy as sa
from prometheus_client.core import Metric
from sqlalchemy.engine import Connection, RowMapping

from scheduler.backends.base import KeepsOutputs
from scheduler.registry import audit as chain
from scheduler.registry.artifacts import ArtifactError, inside, resolve, walk
from scheduler.registry.hooks import run_hook
from scheduler.registry.outputs import Lineage, read_lineage, read_metrics
from scheduler.registry.policy import (
    GateResult,
    PolicyError,
    PromotionPolicy,
    VersionFacts,
    evaluate,
    load_policy,
    promotable,
)
from scheduler.service.api.auth import Principal
from scheduler.service.api.errors import Conflict, Forbidden, Invalid, NotFound
from scheduler.service.core.loop import Core
from scheduler.service.core.metrics import gauge
from scheduler.service.core.states import AttemptOutcome, JobState, PromotionState
from scheduler.service.store import rows as store
from scheduler.service.store.db import (
    approvals,
    attempts,
    model_aliases,
    model_audit,
    model_policies,
    model_versions,
    models,
    promotions,
)

STAGES = ("candidate", "staging", "production")
log = logging.getLogger("corral.models")
_HEAD = "corral.audit_head"  # conn.info key: the (seq, hash) this transaction appended last
OUTPUT_SCHEME = "corral-output"  # corral-output://JOB/ATTEMPT/PATH: an artifact inside an attempt's output dir
NO_OUTPUTS = (
    "this installation's backend keeps no job outputs the service can read, and versions are registered "
    "only from their job's own output directory (the local backend keeps one: $CORRAL_OUTPUT_DIR); "
    "jobs on Kubernetes or Ray cannot register versions until an output store the service can read is "
    "configured"
)


# ----- reads -----


def model_row(conn: Connection, core: Core, who: Principal, name: str) -> RowMapping:
    """The model, if `who` may see it (its team's queue); another team's model answers like a missing one."""
    row = conn.execute(sa.select(models).where(models.c.name == name)).mappings().first()
    if row is None or not who.covers(core.tree, row["queue"]):
        raise NotFound(f"model {name!r} not found")
    return row


def version_row(conn: Connection, model: str, version: int) -> RowMapping:
    row = (
        conn.execute(
            sa.select(model_versions).where(model_versions.c.model == model, model_versions.c.version == version)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"model {model!r} has no version {version}")
    return row


def aliases(conn: Connection, model: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(sa.select(model_aliases).where(model_aliases.c.model == model)).mappings()
    return {
        r["stage"]: {"version": r["version"], "previous": r["previous"], "updated_at": r["updated_at"]} for r in rows
    }


def policy(conn: Connection, model: str) -> tuple[int, PromotionPolicy]:
    row = (
        conn.execute(
            sa.select(model_policies)
            .where(model_policies.c.model == model)
            .order_by(model_policies.c.version.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return (0, PromotionPolicy()) if row is None else (row["version"], load_policy(row["document"]))


def facts(row: RowMapping) -> VersionFacts:
    return VersionFacts(
        row["model"],
        row["version"],
        row["metrics"],
        row["eval_set"],
        row["digest"],
        row["artifact_uri"],
        measured_by_job(row["lineage"]),
    )


def measured_by_job(lineage: Any) -> bool:
    """Whether the version's metrics came from its job's metrics.json: registration stores metrics_from_job in the
    lineage (versions registered just before it was added carry recorded_by_job); a version without either was
    registered with typed-in metrics, which no gate trusts."""
    return isinstance(lineage, dict) and (lineage.get("metrics_from_job") is True or "recorded_by_job" in lineage)


def show(conn: Connection, core: Core, who: Principal, name: str) -> dict[str, Any]:
    m = model_row(conn, core, who, name)
    versions = [
        dict(v)
        for v in conn.execute(
            sa.select(model_versions).where(model_versions.c.model == name).order_by(model_versions.c.version)
        ).mappings()
    ]
    number, pol = policy(conn, name)
    return {
        **dict(m),
        "aliases": aliases(conn, name),
        "versions": versions,
        "policy": {"version": number, "document": pol.model_dump(mode="json")},
    }


def roi(conn: Connection, core: Core, who: Principal, name: str) -> dict[str, Any]:
    """GPU-hours spent by the jobs in the lineage of the production version (and of every version)."""
    model_row(conn, core, who, name)
    out: dict[str, Any] = {"model": name, "versions": []}
    now = core.clock()
    prod = aliases(conn, name).get("production", {}).get("version")
    for v in conn.execute(
        sa.select(model_versions).where(model_versions.c.model == name).order_by(model_versions.c.version)
    ).mappings():
        job_ids = v["lineage"]["jobs"]
        hours = sum(
            a["gpus"] * ((a["ended_at"] or now) - a["started_at"]) / 3600
            for a in conn.execute(
                sa.select(attempts).where(attempts.c.job_id.in_(job_ids), attempts.c.started_at.is_not(None))
            ).mappings()
        )
        out["versions"].append({"version": v["version"], "jobs": job_ids, "gpu_hours": round(hours, 6)})
        if v["version"] == prod:
            out["production"] = {"version": prod, "gpu_hours": round(hours, 6)}
    return out


# ----- the audit chain -----


def _append(conn: Connection, now: float, actor: str, action: str, model: str, **detail: Any) -> None:
    row = conn.execute(sa.select(model_audit).order_by(model_audit.c.seq.desc()).limit(1)).mappings().first()
    last = None if row is None else dict(row)
    entry = chain.next_entry(last, at=now, actor=actor, action=action, model=model, detail=detail)
    conn.execute(model_audit.insert().values(**entry))
    conn.info[_HEAD] = (entry["seq"], entry["hash"])


@contextmanager
def _changing(core: Core) -> Iterator[Connection]:
    """One change: a transaction under the core's lock; once it has committed, the chain's new head is logged
    (never before: a rolled-back head would be a false record)."""
    with core.lock:
        with core.db.begin() as conn:
            try:
                yield conn
            finally:
                head = conn.info.pop(_HEAD, None)  # info outlives the transaction on a pooled connection
        if head is not None:
            log.info("model audit chain head: seq %d hash %s", head[0], head[1])


def head(conn: Connection) -> tuple[int, str] | None:
    """The newest audit entry's (seq, hash): what an auditor keeps to pass as `verify --head` later."""
    row = conn.execute(
        sa.select(model_audit.c.seq, model_audit.c.hash).order_by(model_audit.c.seq.desc()).limit(1)
    ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def audit_metrics(core: Core) -> list[Metric]:
    """corral_model_audit_head{hash} = seq, read at scrape time: a scraper's history is a record of heads kept
    outside the database, against which truncation or a rewrite shows."""
    try:
        with core.db.connect() as conn:
            now = head(conn)
    except sa.exc.OperationalError:
        return []  # the database is away: /metrics still answers with everything else
    return [
        gauge(
            "corral_model_audit_head",
            "The model audit chain's newest entry: seq as value, hash as label.",
            ["hash"],
            [] if now is None else [([now[1]], float(now[0]))],
        )
    ]


def alias_rows(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.select(model_aliases)).mappings()]


def version_rows(conn: Connection) -> list[dict[str, Any]]:
    """What the gates read of every version, for the audit's comparison with its registration entry."""
    cols = (
        model_versions.c.model,
        model_versions.c.version,
        model_versions.c.digest,
        model_versions.c.artifact_uri,
        model_versions.c.metrics,
        model_versions.c.eval_set,
    )
    return [dict(r) for r in conn.execute(sa.select(*cols)).mappings()]


def audit_rows(conn: Connection, model: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(model_audit).order_by(model_audit.c.seq)
    return [dict(r) for r in conn.execute(q).mappings() if model is None or r["model"] == model]


# ----- changes (each in one transaction, under the core's lock, with its audit entry) -----


def create(core: Core, who: Principal, name: str, queue: str, description: str) -> dict[str, Any]:
    if queue not in core.tree or not who.may_submit(core.tree, queue):
        raise Forbidden(f"{who.user} ({who.role}) may not create models for queue {queue}", "queue")
    now = core.clock()
    with _changing(core) as conn:
        if conn.execute(sa.select(models.c.name).where(models.c.name == name)).first() is not None:
            raise Conflict(f"model {name!r} already exists", "name")
        conn.execute(
            models.insert().values(name=name, queue=queue, description=description, created_at=now, created_by=who.user)
        )
        _append(conn, now, who.user, "model.create", name, queue=queue)
    return {"name": name, "queue": queue, "description": description}


def apply_policy(core: Core, who: Principal, name: str, document: dict[str, Any]) -> dict[str, Any]:
    try:
        load_policy(document)
    except PolicyError as e:
        raise Invalid(
            f"the promotion policy is not valid: {e}", "document", [{"where": w, "problem": p} for w, p in e.problems]
        ) from e
    now = core.clock()
    with _changing(core) as conn:
        m = model_row(conn, core, who, name)
        if not who.may_promote(core.tree, m["queue"]):
            raise Forbidden(f"{who.user} ({who.role}) may not set the promotion policy of {name}: model owners do")
        number = policy(conn, name)[0] + 1
        conn.execute(
            model_policies.insert().values(
                model=name, version=number, document=document, author=who.user, created_at=now
            )
        )
        _append(conn, now, who.user, "policy.apply", name, version=number, document=document)
    return {"model": name, "policy_version": number}


def _attempts(conn: Connection, job_id: int) -> list[int]:
    return list(
        conn.execute(
            sa.select(attempts.c.attempt).where(attempts.c.job_id == job_id).order_by(attempts.c.attempt)
        ).scalars()
    )


def _output_dirs(core: Core, conn: Connection, job_id: int) -> list[Path] | None:
    """The output directories of every attempt of the job (an artifact may be an earlier attempt's checkpoint),
    in attempt order; None when the executor keeps none the service can read."""
    if not isinstance(core.executor, KeepsOutputs):
        return None
    return [core.executor.output_dir(str(job_id), n) for n in _attempts(conn, job_id)]


def _portable(job_id: int, path: Path, roots: list[Path], numbers: list[int]) -> str:
    """The portable URI of `path` (a real path inside one of `roots`, the output directories of attempts
    `numbers`, in the same order)."""
    base = inside(path, roots)
    for root, attempt in zip(roots, numbers, strict=True):
        if base is not None and Path(os.path.realpath(root)) == base:
            rel = path.relative_to(base).as_posix()
            return portable_uri(job_id, attempt, "" if rel == "." else rel)
    return str(path)  # unreachable: resolve() put it inside one of them


def _completed_attempt(conn: Connection, job_id: int) -> int | None:
    return conn.execute(
        sa.select(sa.func.max(attempts.c.attempt)).where(
            attempts.c.job_id == job_id, attempts.c.outcome == AttemptOutcome.COMPLETED
        )
    ).scalar_one_or_none()


def portable_uri(job_id: int, attempt: int, rel: str) -> str:
    """What a version stores as its artifact: the job, the attempt and the path inside that attempt's output
    directory, not an absolute path, so it still names the artifact after data_dir moves."""
    return f"{OUTPUT_SCHEME}://{job_id}/{attempt}/{quote(rel)}"


def artifact_location(core: Core, uri: str) -> str:
    """The artifact's path on this server now: a portable URI resolved through the executor's output_dir; a
    version registered before (an absolute path) as it was stored. Manifests and MLflow exports point there."""
    parsed = urlsplit(uri)
    if parsed.scheme != OUTPUT_SCHEME or not isinstance(core.executor, KeepsOutputs):
        return uri
    attempt, _, rel = parsed.path.lstrip("/").partition("/")
    try:
        root = core.executor.output_dir(parsed.netloc, int(attempt))
    except ValueError:
        return uri  # a URI no registration wrote: hashing it again refuses it, saying why
    return str(root / unquote(rel)) if rel else str(root)


def _hash(core: Core, uri: str, roots: list[Path]) -> tuple[Path, str]:
    """The artifact's real path, resolved inside `roots` here (a few path lookups), and its digest, walked within
    the bounds and hashed on the pool under its timeout (ArtifactError, OSError, Unavailable)."""
    s = core.settings
    path = resolve(uri, roots)
    base = inside(path, roots)
    # The walk and the hash open everything from the output directory down, following no symlink.
    return path, core.hashes.digest(
        lambda: walk(path, s.artifact_max_bytes, s.artifact_max_files, base=base), str(path)
    )


def _digest_now(core: Core, v: RowMapping) -> tuple[str | None, str]:
    """The version's artifact digest computed again (from where it was registered, with the same checks), or
    None and why not. Unavailable (the pool is full, or it took too long) comes through: nothing is decided on
    a digest that could not be computed."""
    with core.db.connect() as conn:
        roots = _output_dirs(core, conn, v["job_id"])
    if roots is None:
        return None, NO_OUTPUTS
    try:
        return _hash(core, artifact_location(core, v["artifact_uri"]), roots)[1], ""
    except (ValueError, OSError) as e:  # ArtifactError is a ValueError, as is a bad URI
        return None, str(e)


def register(
    core: Core, who: Principal, name: str, job_id: int, artifact_uri: str, lineage_jobs: list[int]
) -> dict[str, Any]:
    """A new version from a finished job's outputs: the artifact from its output directory, hashed now (before
    anything is written), the gates' metrics from its metrics.json, code and data digests from its
    lineage.json."""
    with core.db.connect() as conn:
        m = model_row(conn, core, who, name)
        if not who.may_submit(core.tree, m["queue"]):
            raise Forbidden(f"{who.user} ({who.role}) may not register versions of {name}")
        for j in [job_id, *lineage_jobs]:
            job = store.job_row(conn, j)
            if job is None or not who.may_read_job(core.tree, job["queue"], job["owner"]):
                raise Invalid(f"job {j} not found: a version comes from a job you can see", "job_id")
            if job["state"] != JobState.COMPLETED:
                raise Invalid(f"job {j} is {job['state']}: versions come only from jobs that completed", "job_id")
        source = store.job_row(conn, job_id)
        assert source is not None
        roots = _output_dirs(core, conn, job_id)
        attempt_numbers = _attempts(conn, job_id)
        done = _completed_attempt(conn, job_id)
    if roots is None:
        raise Invalid(NO_OUTPUTS, "job_id")
    metrics: dict[str, float] = {}
    recorded: Lineage | None = None
    if done is not None and isinstance(core.executor, KeepsOutputs):
        out = core.executor.output_dir(str(job_id), done)
        try:
            metrics = read_metrics(out) or {}
            recorded = read_lineage(out)
        except ArtifactError as e:
            raise Invalid(f"job {job_id}'s outputs: {e}", "job_id") from e
    try:
        path, digest = _hash(core, artifact_uri, roots)
    except (ValueError, OSError) as e:  # ArtifactError is a ValueError, as is a bad URI
        raise Invalid(f"artifact {artifact_uri}: {e}", "artifact_uri") from e
    # Stored portably (job, attempt, path inside its output directory); promotion and rollback hash it again
    # from the executor's output_dir of the day, whatever data_dir is then.
    artifact_uri = _portable(job_id, path, roots, attempt_numbers)
    eval_set = None if recorded is None else recorded.eval_set
    spec = source["spec"]
    lineage = {
        "job": job_id,
        "queue": source["queue"],
        "command": spec.get("command"),
        "image": spec.get("image"),
        "code": None if recorded is None or recorded.code is None else recorded.code.model_dump(),
        "data": [] if recorded is None else [d.model_dump() for d in recorded.data],
        "recorded_by_job": recorded is not None,
        "metrics_from_job": True,
        "jobs": sorted({job_id, *lineage_jobs}),
    }
    now = core.clock()
    with _changing(core) as conn:
        number = (
            conn.execute(
                sa.select(sa.func.max(model_versions.c.version)).where(model_versions.c.model == name)
            ).scalar_one()
            or 0
        ) + 1
        conn.execute(
            model_versions.insert().values(
                model=name,
                version=number,
                job_id=job_id,
                lineage=lineage,
                metrics=metrics,
                eval_set=eval_set,
                artifact_uri=artifact_uri,
                digest=digest,
                registered_at=now,
                registered_by=who.user,
            )
        )
        _move_alias(conn, name, "candidate", number, now)
        _append(
            conn,
            now,
            who.user,
            "version.register",
            name,
            version=number,
            job=job_id,
            digest=digest,
            artifact_uri=artifact_uri,
            metrics=metrics,
            eval_set=eval_set,
        )
    return {"model": name, "version": number, "digest": digest, "lineage": lineage}


def _move_alias(conn: Connection, model: str, stage: str, version: int, now: float) -> int | None:
    old = aliases(conn, model).get(stage)
    if old is None:
        conn.execute(
            model_aliases.insert().values(model=model, stage=stage, version=version, previous=None, updated_at=now)
        )
        return None
    conn.execute(
        model_aliases.update()
        .where(model_aliases.c.model == model, model_aliases.c.stage == stage)
        .values(version=version, previous=old["version"], updated_at=now)
    )
    previous: int = old["version"]
    return previous


def _gates(
    core: Core, name: str, version: int, stage: str, requester: str, approvers: list[str]
) -> tuple[list[GateResult], RowMapping]:
    """Evaluate every gate now: the digest is recomputed and the hook run (outside any transaction)."""
    with core.db.connect() as conn:
        v = version_row(conn, name, version)
        prod_version = aliases(conn, name).get("production", {}).get("version")
        prod = version_row(conn, name, prod_version) if prod_version is not None else None
        stage_policy = policy(conn, name)[1].for_stage(stage)
    digest_now: str | None = _digest_now(core, v)[0] if stage_policy.verify_digest else v["digest"]
    hook = None
    if stage_policy.hook is not None:
        hook = run_hook(
            stage_policy.hook,
            {
                "model": name,
                "version": version,
                "stage": stage,
                "requester": requester,
                "approvers": approvers,
                "metrics": v["metrics"],
                "eval_set": v["eval_set"],
                "digest": v["digest"],
                "artifact_uri": v["artifact_uri"],
            },
        )
    results = evaluate(
        stage_policy, facts(v), None if prod is None else facts(prod), approvers, requester, digest_now, hook
    )
    return results, v


def _view(results: list[GateResult]) -> list[dict[str, str]]:
    return [{"gate": r.gate, "status": r.status, "evidence": r.evidence} for r in results]


def request_promotion(core: Core, who: Principal, name: str, version: int, stage: str) -> dict[str, Any]:
    if stage not in ("staging", "production"):
        raise Invalid(f"stage {stage!r}: versions are promoted to staging or production", "stage")
    with core.db.connect() as conn:
        m = model_row(conn, core, who, name)
        version_row(conn, name, version)
    if not who.may_promote(core.tree, m["queue"]):
        raise Forbidden(f"{who.user} ({who.role}) may not promote {name}: model owners of {m['queue']} do")
    seen = _production(core, name)
    results, _ = _gates(core, name, version, stage, who.user, [])
    now = core.clock()
    with _changing(core) as conn:
        _still(conn, name, seen)
        pid = conn.execute(
            promotions.insert()
            .values(
                model=name,
                version=version,
                stage=stage,
                requester=who.user,
                created_at=now,
                state=PromotionState.OPEN,
                gates=_view(results),
            )
            .returning(promotions.c.id)
        ).scalar_one()
        _append(
            conn,
            now,
            who.user,
            "promotion.request",
            name,
            promotion=pid,
            version=version,
            stage=stage,
            gates=_view(results),
        )
        out = _decide(conn, core, pid, name, version, stage, results, now, who.user)
    return out


def approve(core: Core, who: Principal, promotion_id: int) -> dict[str, Any]:
    with core.db.connect() as conn:
        p = conn.execute(sa.select(promotions).where(promotions.c.id == promotion_id)).mappings().first()
        if p is None:
            raise NotFound(f"promotion {promotion_id} not found")
        m = model_row(conn, core, who, p["model"])
        done = [
            a["approver"]
            for a in conn.execute(sa.select(approvals).where(approvals.c.promotion_id == promotion_id)).mappings()
        ]
    if not who.may_promote(core.tree, m["queue"]):
        raise Forbidden(f"{who.user} ({who.role}) may not approve promotions of {p['model']}: model owners do")
    if p["state"] != PromotionState.OPEN:
        raise Conflict(f"promotion {promotion_id} is already {p['state']}")
    if who.user == p["requester"]:
        raise Forbidden(
            f"{who.user} requested promotion {promotion_id}; an approval must come from someone else", "approver"
        )
    if who.user in done:
        raise Conflict(f"{who.user} already approved promotion {promotion_id}")
    seen = _production(core, p["model"])
    results, _ = _gates(core, p["model"], p["version"], p["stage"], p["requester"], [*done, who.user])
    now = core.clock()
    with _changing(core) as conn:
        # The gates ran outside the lock: decide only on what they saw (another approval or promotion may
        # have landed meanwhile; deciding on stale facts could promote twice, or never).
        _still(conn, p["model"], seen)
        state = conn.execute(sa.select(promotions.c.state).where(promotions.c.id == promotion_id)).scalar_one()
        now_done = sorted(
            conn.execute(sa.select(approvals.c.approver).where(approvals.c.promotion_id == promotion_id)).scalars()
        )
        if state != PromotionState.OPEN or now_done != sorted(done):
            raise Conflict(f"promotion {promotion_id} changed while its gates ran; look at it and approve again")
        conn.execute(approvals.insert().values(promotion_id=promotion_id, approver=who.user, at=now))
        _append(conn, now, who.user, "promotion.approve", p["model"], promotion=promotion_id)
        return _decide(conn, core, promotion_id, p["model"], p["version"], p["stage"], results, now, who.user)


def _production(core: Core, model: str) -> dict[str, Any] | None:
    """The production alias as it is now (version, previous, when), before gates run outside the lock."""
    with core.db.connect() as conn:
        return aliases(conn, model).get("production")


def _still(conn: Connection, model: str, seen: dict[str, Any] | None) -> None:
    if aliases(conn, model).get("production") != seen:
        raise Conflict(f"{model}'s production version changed while the gates ran; ask again")


def _decide(
    conn: Connection,
    core: Core,
    pid: int,
    name: str,
    version: int,
    stage: str,
    results: list[GateResult],
    now: float,
    actor: str,
) -> dict[str, Any]:
    """Promote when every gate passes; a failed gate rejects the request; otherwise it stays open."""
    state = PromotionState.OPEN
    if promotable(results):
        state = PromotionState.PROMOTED
        previous = _move_alias(conn, name, stage, version, now)
        _append(conn, now, actor, "model.promote", name, promotion=pid, version=version, stage=stage, previous=previous)
    elif any(r.status == "fail" for r in results):
        state = PromotionState.REJECTED
        _append(
            conn,
            now,
            actor,
            "promotion.reject",
            name,
            promotion=pid,
            failed=[r.gate for r in results if r.status == "fail"],
        )
    conn.execute(
        promotions.update()
        .where(promotions.c.id == pid)
        .values(gates=_view(results), state=state, decided_at=None if state == PromotionState.OPEN else now)
    )
    return {
        "promotion": pid,
        "model": name,
        "version": version,
        "stage": stage,
        "state": state,
        "gates": _view(results),
    }


def rollback(core: Core, who: Principal, name: str, stage: str = "production") -> dict[str, Any]:
    """The stage's previous version comes back, once its artifact's digest, computed again (outside the
    transaction), still matches the one registered; the one rolled back from becomes `previous`."""
    with core.db.connect() as conn:
        m = model_row(conn, core, who, name)
        if not who.may_promote(core.tree, m["queue"]):
            raise Forbidden(f"{who.user} ({who.role}) may not roll back {name}: model owners do")
        alias = aliases(conn, name).get(stage)
        if alias is None or alias["previous"] is None:
            raise Conflict(f"{name} has no previous {stage} version to roll back to", "stage")
        restored = version_row(conn, name, alias["previous"])
    digest_now, why = _digest_now(core, restored)
    if digest_now != restored["digest"]:
        found = f"sha256 now {digest_now}" if digest_now is not None else f"it cannot be read ({why})"
        raise Conflict(
            f"not rolled back: {name} v{restored['version']}'s artifact {restored['artifact_uri']} is no "
            f"longer what was registered (sha256 {restored['digest']}; {found})",
            "stage",
        )
    now = core.clock()
    with _changing(core) as conn:
        if aliases(conn, name).get(stage) != alias:
            raise Conflict(f"{name}'s {stage} alias changed while the artifact was checked; ask again", "stage")
        _move_alias(conn, name, stage, alias["previous"], now)
        _append(
            conn,
            now,
            who.user,
            "model.rollback",
            name,
            stage=stage,
            version=alias["previous"],
            rolled_back=alias["version"],
        )
    return {"model": name, "stage": stage, "version": alias["previous"], "previous": alias["version"]}
