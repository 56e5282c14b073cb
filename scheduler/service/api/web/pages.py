"""Read-only dashboard pages: the queue tree, pools with their GPU map, usage over time, the model registry.

Every number comes from the same functions the /v1 API answers with (called in-process, with the caller's
Principal), so a page shows exactly what that caller's token would read from the API, and nothing more.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from scheduler.service.api import routes_cluster, routes_jobs, routes_models
from scheduler.service.api.deps import CoreDep
from scheduler.service.api.errors import ServiceError
from scheduler.service.api.web.common import Viewer, error_page, page
from scheduler.service.api.web.usage_chart import RANGES, usage_over_time
from scheduler.service.core import registry
from scheduler.service.core.states import JobState
from scheduler.service.store import rows as store

router = APIRouter()
PENDING_SHOWN = 50  # pending jobs listed with their reasons on the queue page; the jobs page pages through more


def _depths(queues: list[dict[str, Any]]) -> dict[str, int]:
    parents = {q["name"]: q["parent"] for q in queues}
    out: dict[str, int] = {}
    for name in parents:
        d, p = 0, parents[name]
        while p is not None and p in parents:  # a scoped caller may not see the parent: it starts there
            d, p = d + 1, parents[p]
        out[name] = d
    return out


def _tree_order(queues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parents before their children, siblings by name: the page reads like the tree."""
    names = {q["name"] for q in queues}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for q in queues:
        kids.setdefault(q["parent"] if q["parent"] in names else None, []).append(q)
    out: list[dict[str, Any]] = []

    def walk(parent: str | None) -> None:
        for q in sorted(kids.get(parent, []), key=lambda q: q["name"]):
            out.append(q)
            walk(q["name"])

    walk(None)
    return out


@router.get("/queues", response_class=HTMLResponse)
def queues_page(request: Request, who: Viewer, core: CoreDep) -> HTMLResponse:
    tree = routes_cluster.queue_tree(who, core).model_dump()
    depth = _depths(tree["queues"])
    ordered = _tree_order(tree["queues"])
    capacity = core.capacity
    pools = []
    for pool in sorted(capacity):
        rows = []
        for q in ordered:
            p = q["pools"].get(pool)
            if p is None:
                continue
            scale = max(capacity[pool], p["usage"], p["quota"], 1)  # borrowing can exceed nothing but capacity
            rows.append({"name": q["name"], "depth": depth[q["name"]], "leaf": q["leaf"], "scale": scale, **p})
        pools.append({"name": pool, "capacity": capacity[pool], "rows": rows})
    # The listing's reason is explain's (views.live_reasons), computed for the whole page under one lock.
    pending = [
        {**j, "why": j["reason"]}
        for j in routes_jobs.list_jobs(who, core, state=[JobState.PENDING], limit=PENDING_SHOWN)["jobs"]
    ]
    return page(
        request,
        who,
        "queues.html",
        version=tree["version"],
        pools=pools,
        pending=pending,
        more=len(pending) >= PENDING_SHOWN,
    )


@router.get("/pools", response_class=HTMLResponse)
def pools_page(request: Request, who: Viewer, core: CoreDep) -> HTMLResponse:
    shown = routes_cluster.pools(who, core)["pools"]  # ids of jobs the caller may not read are "hidden" there
    holders: dict[int, dict[str, Any]] = {}
    with core.db.connect() as conn:
        for job in sorted(_jobs_shown(shown)):
            row = store.job_row(conn, job)
            if row is not None:
                holders[job] = {
                    "name": row["name"],
                    "kind": row["spec"].get("kind", "job"),
                    "queue": row["queue"],
                    "owner": row["owner"],
                }
    for p in shown:
        for n in p["nodes"]:
            util = _utilisation(core, n["name"])
            for g in n["gpus"]:
                g["holder"] = holders.get(g["job"]) if isinstance(g["job"], int) else None
                g["util"] = util.get(g["index"])
                for s in g["shares"]:
                    s["holder"] = holders.get(s["job"]) if isinstance(s["job"], int) else None
                g["free_share"] = max(0.0, round(1 - sum(s["fraction"] for s in g["shares"]), 6))
            for m in n["mig"]:
                m["held"] = [{"job": j, "holder": holders.get(j) if isinstance(j, int) else None} for j in m["jobs"]]
    return page(request, who, "pools.html", pools=shown)


def _jobs_shown(shown: list[dict[str, Any]]) -> set[int]:
    """The readable job ids the GPU map names: whole GPUs' holders, shares of shared GPUs, MIG slices' holders."""
    out: set[int] = set()
    for p in shown:
        for n in p["nodes"]:
            for g in n["gpus"]:
                out |= {x for x in (g["job"], *(s["job"] for s in g["shares"])) if isinstance(x, int)}
            out |= {j for m in n["mig"] for j in m["jobs"] if isinstance(j, int)}
    return out


def _utilisation(core: Any, node: str) -> dict[int, float]:
    """Utilisation per GPU where the node can sample it (NVML); a failing sample leaves the map without it."""
    info = core.cluster.nodes.get(node)
    if info is None or info.sample is None:
        return {}
    try:
        samples = info.sample() or {}
    except Exception:  # a driver hiccup must not take the page down; the map just shows "unknown"
        return {}
    return {i: s.util_pct for i, s in samples.items()}


@router.get("/usage", response_class=HTMLResponse)
def usage_page(request: Request, who: Viewer, core: CoreDep, period: str = "24h") -> HTMLResponse:
    if period not in RANGES:
        period = "24h"
    try:
        data = usage_over_time(who, core, period)
    except ServiceError as e:
        return error_page(request, who, e)
    return page(request, who, "usage.html", periods=list(RANGES), period=period, **data)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, who: Viewer, core: CoreDep) -> HTMLResponse:
    listed = routes_models.list_models(who, core)["models"]
    promos = routes_models.list_promotions(who, core)["promotions"]
    details = []
    with core.db.connect() as conn:
        for m in listed:
            shown = registry.show(conn, core, who, m["name"])
            shown["promotions"] = [
                routes_models.get_promotion(p["id"], who, core) for p in promos if p["model"] == m["name"]
            ]
            details.append(shown)
    return page(request, who, "models.html", models=details)
