"""The web dashboard under /ui: server-rendered pages over the same service functions as the /v1 API.

`router` holds every page (mount it at /ui); `STATIC` is the folder to serve at /ui/static. See docs/dashboard.md.
"""

from __future__ import annotations

from fastapi import APIRouter

from scheduler.service.api.web import jobs, pages, sandboxes, session, whatif_pages
from scheduler.service.api.web.common import WEB_DIR

STATIC = WEB_DIR / "static"

router = APIRouter(include_in_schema=False)  # pages, not API: kept out of the OpenAPI document
for part in (session.router, pages.router, jobs.router, sandboxes.router, whatif_pages.router):
    router.include_router(part)

__all__ = ["STATIC", "router"]
