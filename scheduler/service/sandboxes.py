"""Notebook sandboxes: non-preemptible jobs that start now within the team's guarantee, or are refused now."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from scheduler.backends.base import KnowsAddresses, server_port
from scheduler.service import store
from scheduler.service.auth import Principal
from scheduler.service.core import FINISHED, Core
from scheduler.service.culler import IDLE_TIMEOUT_LABEL
from scheduler.service.errors import Conflict, Forbidden, Invalid
from scheduler.service.specs import MAX_NAME, JobSubmit, Strict, engine_id


class SandboxRequest(Strict):
    """A sandbox as the JupyterHub spawner (or a user) asks for it."""

    name: str = Field("sandbox", min_length=1, max_length=MAX_NAME)
    queue: str = Field(min_length=1, max_length=MAX_NAME)
    pool: str | None = None
    gpus: int = Field(1, ge=0, le=64)
    cpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.0, ge=0)
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    image: str | None = None
    profile: str | None = Field(None, max_length=MAX_NAME)
    idle_timeout_s: float | None = Field(None, gt=0, description="Stop after this long with idle GPUs.")
    owner: str | None = Field(None, max_length=MAX_NAME, description="On behalf of this user (admins only).")


def open_sandbox(core: Core, who: Principal, req: SandboxRequest) -> dict[str, Any]:
    """Start a sandbox now, inside the queue's guarantee, or refuse at once saying what is free there."""
    if req.owner is not None and req.owner != who.user:
        if not who.admin:
            raise Forbidden(f"{who.user} ({who.role}) may not open sandboxes for other users", "owner")
        who = Principal(req.owner, who.role, who.scope)
    pool = core.pool_of(req.pool)
    with core.lock:
        if not who.may_submit(core.tree, req.queue):
            raise Forbidden(f"{who.user} ({who.role}) may not open sandboxes in queue {req.queue}", "queue")
        if req.queue not in core.tree or pool not in core.engine.pools:
            raise Invalid(f"queue {req.queue!r} or pool {pool!r} does not exist", "queue")
        ps, q = core.engine.pools[pool], core.tree[req.queue]
        used, quota = ps.usage[q.name], q.quota_of(pool)
        if used + req.gpus > quota:
            raise Conflict(
                f"queue {q.name} has {max(0, quota - used)} of its {quota} guaranteed GPUs of {pool} free "
                f"({used} in use); this sandbox asks {req.gpus}. Sandboxes run only within the guarantee: close "
                f"another sandbox or job of {q.name}, or pick a smaller profile.", "gpus",
                {"queue": q.name, "pool": pool, "quota": quota, "usage": used, "free_in_guarantee": quota - used,
                 "request": req.gpus})
    # Labels keep what the culler needs with the job, so it survives a restart.
    labels = {"corral.sandbox/profile": req.profile} if req.profile else {}
    if req.idle_timeout_s is not None:
        labels[IDLE_TIMEOUT_LABEL] = f"{req.idle_timeout_s:g}"
    sub = JobSubmit(name=req.name, queue=req.queue, pool=pool, gpus=req.gpus, cpus=req.cpus,
                    memory_gb=req.memory_gb, preemptible=False, command=req.command, env=req.env,
                    workdir=req.workdir, image=req.image, labels=labels, kind="sandbox",
                    max_runtime=None)
    job, _ = core.submit(who, sub)
    core.tick()  # admit it now: a sandbox within the guarantee may take back GPUs others borrowed
    with core.lock:
        live = core.engine.jobs.get(engine_id(job["id"]))
        why = core.engine.explain(engine_id(job["id"]), core.clock()) if live is not None else None
    with core.db.connect() as conn:
        row = store.job_row(conn, job["id"])
    assert row is not None
    if row["state"] in ("starting", "running"):
        return sandbox_view(core, row)
    if row["state"] not in FINISHED:
        core.cancel(who, job["id"])
    msg = why.message if why is not None else f"the sandbox ended at once ({row['state']})"
    raise Conflict(f"the sandbox cannot start now: {msg}", "gpus", store.reason_json(why))


def sandbox_view(core: Core, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A sandbox as the API shows it: the job, and once it runs where its server listens (`address`, `url`: what
    the hub's proxy connects to); both None until then."""
    view, where = store.job_view(row), address(core, row)
    if where is None:
        return {**view, "address": None, "url": None}
    host, port = where
    in_url = f"[{host}]" if ":" in host else host  # an IPv6 pod IP
    return {**view, "address": {"host": host, "port": port}, "url": f"http://{in_url}:{port}"}


def address(core: Core, row: Mapping[Any, Any]) -> tuple[str, int] | None:
    """Where a running sandbox's server listens: the executor knows (Kubernetes: its pod's IP), or it is a process
    on its node (that node's address; this machine: 127.0.0.1) at the port the hub gave it."""
    if row["state"] != "running":
        return None
    if isinstance(core.executor, KnowsAddresses):
        return core.executor.address(str(row["id"]), row["attempt"])
    with core.db.connect() as conn:
        a = store.current_attempt(conn, row["id"], row["attempt"])
    node = core.nodes.get(a["placement"][0][0]) if a is not None and a["placement"] else None
    env: Mapping[str, str] = row["spec"].get("env", {})
    return (node.address if node is not None else None) or "127.0.0.1", server_port(env)
