"""What every dashboard page shares: the caller from the session cookie, CSRF tokens, templates and error pages.

The session cookie holds the API token itself (HttpOnly, SameSite=Strict, path /ui): each page resolves it with
the same `resolve_token` as the API's bearer header, so a revoked token stops working on the next page and no
second session store has to be kept (or shared between replicas, or lost at a restart).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import shlex
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from scheduler.service.api.auth import Principal
from scheduler.service.api.deps import UI_COOKIE, cookie_principal
from scheduler.service.api.errors import Forbidden, ServiceError, Unauthorized

WEB_DIR = Path(__file__).parent
LOGIN = "/ui/login"
HOME = "/ui/queues"
templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))


def when(t: float | None) -> str:
    """Epoch seconds as UTC text; the dashboard shows one time zone so that pages compare."""
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.{digits}f}"


def shell(command: str | list[str] | None) -> str:
    """A job's command as a shell would take it: one string as given (run by /bin/sh -c), an argv quoted
    (shlex.join), so `sh -c 'for i in $(seq 3); do ...'` shows with its quotes."""
    if command is None:
        return ""
    return command if isinstance(command, str) else shlex.join(str(a) for a in command)


templates.env.filters["when"] = when
templates.env.filters["shell"] = shell
templates.env.filters["num"] = num


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a dashboard path, never another site (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return HOME


async def viewer(request: Request) -> Principal:
    """The logged-in caller; anyone else is sent (303) to the login form, which brings them back here."""
    try:
        return await cookie_principal(request)
    except Unauthorized:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first", headers={"Location": f"{LOGIN}?next={quote(here)}"}) from None


Viewer = Annotated[Principal, Depends(viewer)]


def csrf_token(request: Request) -> str:
    """The session's CSRF token: an HMAC of a fixed label keyed by the session's secret. It is per session, needs
    no storage, and cannot be forged without the cookie (which scripts cannot read); it gives the secret away to
    nobody who sees the page."""
    secret = request.cookies.get(UI_COOKIE, "")
    return hmac.new(secret.encode(), b"corral-dashboard-csrf", hashlib.sha256).hexdigest()


def check_csrf(request: Request, sent: str | None) -> None:
    """Every form that changes state carries the token in a hidden field; SameSite=Strict is the second lock."""
    if not sent or not hmac.compare_digest(sent, csrf_token(request)):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again", "csrf")


def page(request: Request, who: Principal | None, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    """A page from its template, with what the layout needs: the caller, the CSRF token, the current section."""
    context = {"who": who, "csrf": csrf_token(request), "section": name.removesuffix(".html"), **ctx}
    return templates.TemplateResponse(request, name, context, status_code=status)


def error_page(request: Request, who: Principal, e: ServiceError) -> HTMLResponse:
    """The service's refusal (the same message the API gives), as a page with the same status."""
    return page(request, who, "error.html", status=e.status, error=e)
