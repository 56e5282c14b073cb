"""Notebook sandboxes: non-preemptible, above batch priority, started now within the team's guarantee or refused now."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator

from quotas.tree import Queue
from scheduler.backends.base import KnowsAddresses, server_port
from scheduler.engine.model import mig_fraction
from scheduler.engine.snapshots import PoolLoad
from scheduler.service.api.auth import Principal
from scheduler.service.api.edge import Amount
from scheduler.service.api.errors import Conflict, Forbidden, Invalid
from scheduler.service.api.redact import Redactor
from scheduler.service.core.culler import IDLE_TIMEOUT_LABEL, idle_view
from scheduler.service.core.loop import Core
from scheduler.service.core.specs import (
    MAX_NAME,
    Argv,
    Env,
    GpuCount,
    Image,
    JobSubmit,
    Name,
    PoolName,
    Strict,
    Workdir,
    engine_id,
)
from scheduler.service.core.states import FINISHED, PLACED, JobState
from scheduler.service.store import rows as store

GUARANTEE = "guarantee"  # the rule a refusal names when the team's non-preemptible GPUs fill its quota


class SandboxRequest(Strict):
    """A sandbox as the JupyterHub spawner (or a user) asks for it."""

    name: Name = "sandbox"
    queue: Name
    pool: PoolName = None
    gpus: GpuCount = Field(
        1, ge=0, le=64, description="Whole GPUs, or a share of one below 1 (0.25: a quarter of a GPU)."
    )
    mig: str | None = Field(None, min_length=1, max_length=MAX_NAME, description="A MIG profile (1g.10gb).")
    cpus: Amount = 0.0
    memory_gb: Amount = 0.0
    command: Argv
    env: Env = Field(default_factory=dict)
    workdir: Workdir = None
    image: Image = None
    profile: str | None = Field(None, max_length=MAX_NAME)
    idle_timeout_s: float | None = Field(None, gt=0, description="Stop after this long with idle GPUs.")
    owner: str | None = Field(None, max_length=MAX_NAME, description="On behalf of this user (admins only).")

    @field_validator("mig")
    @classmethod
    def _mig(cls, v: str | None) -> str | None:
        if v is not None:
            mig_fraction(v)  # ValueError: not a MIG profile, said as such
        return v


def open_sandbox(core: Core, who: Principal, req: SandboxRequest) -> dict[str, Any]:
    """Start a sandbox now, inside the queue's guarantee (counting its non-preemptible GPUs), taking GPUs back
    where the rules allow; or refuse at once, saying whether the guarantee or the room was short."""
    if req.owner is not None and req.owner != who.user:
        if not who.admin:
            raise Forbidden(f"{who.user} ({who.role}) may not open sandboxes for other users", "owner")
        who = Principal(req.owner, who.role, who.scope)
    pool = core.pool_of(req.pool)
    with core.lock:
        if not who.may_submit(core.tree, req.queue):
            raise Forbidden(f"{who.user} ({who.role}) may not open sandboxes in queue {req.queue}", "queue")
        load = core.engine.pool_load(pool)
        if req.queue not in core.tree or load is None:
            raise Invalid(f"queue {req.queue!r} or pool {pool!r} does not exist", "queue")
        _check_guarantee(load, core.tree[req.queue], mig_fraction(req.mig) if req.mig is not None else req.gpus)
    # Labels keep what the culler needs with the job, so it survives a restart.
    labels = {"corral.sandbox/profile": req.profile} if req.profile else {}
    if req.idle_timeout_s is not None:
        labels[IDLE_TIMEOUT_LABEL] = f"{req.idle_timeout_s:g}"
    # Above batch jobs' default priority, so the engine's tier 3 takes the team's own batch GPUs back for it.
    try:  # the job spec's own limits (command size, env, workdir) hold for a sandbox's too
        sub = JobSubmit(
            name=req.name,
            queue=req.queue,
            pool=pool,
            cpus=req.cpus,
            memory_gb=req.memory_gb,
            priority=core.settings.sandbox_priority,
            preemptible=False,
            command=req.command,
            env=req.env,
            workdir=req.workdir,
            image=req.image,
            labels=labels,
            kind="sandbox",
            max_runtime=None,
            # Given only when asked, so a MIG sandbox's gpus is its profile's fraction (JobSubmit's rule).
            **({"gpus": req.gpus} if req.mig is None else {"mig": req.mig}),
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise Invalid(f"{where}: {err['msg']}", where) from e
    job, _ = core.submit(who, sub)
    core.tick()  # admit it now: it may take back GPUs others borrowed, or its own team's lower-priority jobs hold
    with core.lock:
        live = core.engine.job_state(engine_id(job["id"])) is not None
        why = core.engine.explain(engine_id(job["id"]), core.clock()) if live else None
    with core.db.connect() as conn:
        row = store.job_row(conn, job["id"])
    assert row is not None
    if row["state"] in PLACED:
        return sandbox_view(core, row)
    if row["state"] not in FINISHED:
        core.cancel(who, job["id"])
    if why is None:
        msg = f"the sandbox ended at once ({row['state']})"
    elif why.rule == GUARANTEE:  # another non-preemptible job of the team started since the check above
        msg = why.message
    else:
        msg = f"no room can be made, even by preempting: {why.message}"
    with core.db.connect() as conn:  # the engine's reason names the jobs in the way: not those of other teams
        hide = Redactor(core, conn, who)
        msg, detail = hide.value(msg), hide.value(store.reason_json(why))
    raise Conflict(f"the sandbox cannot start now: {msg}", "gpus", detail)


def _check_guarantee(ps: PoolLoad, q: Queue, gpus: float) -> None:
    """Refuse (409) a sandbox that its team's non-preemptible GPUs leave no room for within the quota; the
    team's preemptible jobs do not count: they can be taken back (SCHEDULING.md, Admission)."""
    held, used, quota = ps.np_used(q.name), ps.used(q.name), q.quota_of(ps.name)
    if held + gpus <= quota:
        return
    raise Conflict(
        f"team {q.name} holds {held} non-preemptible GPUs of {ps.name} and this notebook needs {gpus}: "
        f"{held + gpus} > quota {quota}. Non-preemptible jobs run only within quota, counting the queue's "
        f"non-preemptible GPUs (its guarantee): close another notebook or non-preemptible job of {q.name}, or "
        "pick a smaller profile.",
        "gpus",
        {
            "rule": GUARANTEE,
            "queue": q.name,
            "pool": ps.name,
            "quota": quota,
            "np_usage": held,
            "usage": used,
            "free_in_guarantee": max(0, quota - held),
            "request": gpus,
        },
    )


def sandbox_view(core: Core, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A sandbox as the API shows it: the job, its idle stretch (`idle`, None while it works), and once it runs where
    its server listens (`address`, `url`: what the hub's proxy connects to); both None until then."""
    view, where = store.job_view(row), address(core, row)
    # Its idle stretch (the culler's): when it will be stopped, and the warning once given (the notebook shows it).
    view["idle"] = idle_view(core, row["id"], core.clock()) if row["state"] == JobState.RUNNING else None
    if where is None:
        return {**view, "address": None, "url": None}
    host, port = where
    in_url = f"[{host}]" if ":" in host else host  # an IPv6 pod IP
    return {**view, "address": {"host": host, "port": port}, "url": f"http://{in_url}:{port}"}


def address(core: Core, row: Mapping[Any, Any]) -> tuple[str, int] | None:
    """Where a running sandbox's server listens: the executor knows (Kubernetes: its pod's IP), or it is a process
    on its node (that node's address; this machine: 127.0.0.1) at the port the hub gave it."""
    if row["state"] != JobState.RUNNING:
        return None
    if isinstance(core.executor, KnowsAddresses):
        return core.executor.address(str(row["id"]), row["attempt"])
    with core.db.connect() as conn:
        a = store.current_attempt(conn, row["id"], row["attempt"])
    node = core.cluster.nodes.get(a["placement"][0][0]) if a is not None and a["placement"] else None
    env: Mapping[str, str] = row["spec"].get("env", {})
    return (node.address if node is not None else None) or "127.0.0.1", server_port(env)
