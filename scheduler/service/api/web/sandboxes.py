"""The sandboxes page: notebooks (mine, or for admins everyone's), their GPUs and utilisation, how long before the
idle culler stops them, a link that opens them, and a Stop button.

The rows are GET /v1/sandboxes's (the same visibility rule), each with sandbox_view's `idle` and address; stopping
is DELETE /v1/sandboxes/{id}'s Core.cancel with the caller's Principal.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from scheduler.service.api import routes_sandboxes
from scheduler.service.api.auth import Role
from scheduler.service.api.deps import CoreDep
from scheduler.service.api.errors import ServiceError
from scheduler.service.api.web.common import Viewer, check_csrf, error_page, page
from scheduler.service.api.web.pages import _utilisation
from scheduler.service.core.loop import Core
from scheduler.service.core.sandboxes import sandbox_view
from scheduler.service.store import rows as store

router = APIRouter()


def server_name(name: str, owner: str) -> str | None:
    """The hub's server name of a sandbox the spawner named (`jupyter-<user>` is the default server ""), else None."""
    if name == f"jupyter-{owner}":
        return ""
    prefix = f"jupyter-{owner}-"
    return name[len(prefix) :] if name.startswith(prefix) else None


def open_link(core: Core, view: dict[str, Any]) -> str | None:
    """Where its user opens it: the hub's URL for the server (the hub authenticates), else its own address."""
    server = server_name(view["name"], view["owner"])
    hub = core.settings.hub_url
    if hub and server is not None:
        return f"{hub.rstrip('/')}/user/{quote(view['owner'], safe='')}/" + (
            f"{quote(server, safe='')}/" if server else ""
        )
    url: str | None = view.get("url")
    return url


def _rows(core: Core, who: Any, everyone: bool) -> list[dict[str, Any]]:
    listed = routes_sandboxes.list_sandboxes(who, core)["sandboxes"]
    rows = []
    with core.db.connect() as conn:
        for item in listed:
            if not everyone and item["owner"] != who.user:
                continue
            row = store.job_row(conn, item["id"])
            if row is None:
                continue
            view = {**sandbox_view(core, row), "reason": item["reason"], "spec": item["spec"]}
            attempt = store.current_attempt(conn, row["id"], row["attempt"])
            utils: list[float] = []
            placement: list[Any] = (attempt["placement"] if attempt is not None else None) or []
            for node, gpus in placement:
                sampled = _utilisation(core, node)
                utils += [sampled[g] for g in gpus if g in sampled]
            view["util"] = sum(utils) / len(utils) if utils else None
            view["profile"] = (row["spec"].get("labels") or {}).get("corral.sandbox/profile")
            view["open"] = open_link(core, view) if view["owner"] == who.user else None
            view["may_stop"] = who.may_cancel(core.tree, view["queue"], view["owner"])
            rows.append(view)
    return rows


@router.get("/sandboxes", response_class=HTMLResponse)
def sandboxes_page(request: Request, who: Viewer, core: CoreDep, show: str = "mine") -> HTMLResponse:
    admin = who.role in (Role.PLATFORM_ADMIN, Role.TEAM_ADMIN)  # all they may read: everyone's, or their teams'
    everyone = show == "all" and admin
    return page(
        request,
        who,
        "sandboxes.html",
        sandboxes=_rows(core, who, everyone),
        show="all" if everyone else "mine",
        may_see_all=admin,
    )


@router.post("/sandboxes/{job_id}/stop", response_class=HTMLResponse, response_model=None)
def stop(
    request: Request,
    who: Viewer,
    core: CoreDep,
    job_id: int,
    csrf: Annotated[str, Form()] = "",
    show: Annotated[str, Form()] = "mine",
) -> Response:
    try:
        check_csrf(request, csrf)
        routes_sandboxes.close(job_id, who, core)
    except ServiceError as e:
        return error_page(request, who, e)
    return RedirectResponse(f"/ui/sandboxes?show={'all' if show == 'all' else 'mine'}", status_code=303)
