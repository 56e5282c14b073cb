"""Logging in and out of the dashboard: an API token (or a JupyterHub token) in a form, kept in a cookie."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from scheduler.service.api.deps import UI_COOKIE, CoreDep, resolve_token
from scheduler.service.api.errors import ServiceError
from scheduler.service.api.web.common import HOME, LOGIN, Viewer, check_csrf, error_page, page, safe_next

router = APIRouter()
SESSION_S = 12 * 3600  # a working day: the browser forgets the token after it, the token itself lives on


@router.get("/", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "") -> HTMLResponse:
    return page(request, None, "login.html", next=safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse, response_model=None)
async def login(
    request: Request, core: CoreDep, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
) -> Response:
    target = safe_next(next)
    if not _same_origin(request):
        return page(
            request,
            None,
            "login.html",
            status=403,
            next=target,
            error="this form was sent from another site; open the login page here and try again",
        )
    try:
        await resolve_token(core, token.strip())  # the API's own lookup: Corral tokens, then the hub
    except ServiceError as e:
        return page(request, None, "login.html", status=e.status, next=target, error=e.message)
    out = RedirectResponse(target, status_code=303)
    # The cookie is the session: HttpOnly (no script reads it), SameSite=Strict (no other site's form or link
    # sends it), Secure behind HTTPS, and sent to the dashboard only (path /ui), never to /v1.
    out.set_cookie(
        UI_COOKIE,
        token.strip(),
        max_age=SESSION_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return out


@router.post("/logout", response_class=HTMLResponse, response_model=None)
def logout(request: Request, who: Viewer, csrf: Annotated[str, Form()] = "") -> Response:
    try:
        check_csrf(request, csrf)
    except ServiceError as e:
        return error_page(request, who, e)
    out = RedirectResponse(LOGIN, status_code=303)
    out.delete_cookie(UI_COOKIE, path="/ui", httponly=True, samesite="strict")
    return out


def _same_origin(request: Request) -> bool:
    """A browser says where a form came from; a login posted from another site is refused (the login form has
    no session yet, so it cannot carry a CSRF token)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser (or an old one): nothing to forge a session into
    return origin.rstrip("/") == f"{request.url.scheme}://{request.url.netloc}"
