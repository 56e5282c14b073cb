"""The FastAPI application: authentication, error answers, health, metrics; the /v1 routes live beside it."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.registry import mlflow_export
from scheduler.service.api import models as api
from scheduler.service.api import routes_admission, routes_cluster, routes_jobs, routes_models, routes_sandboxes, web
from scheduler.service.api.bodylimit import BodyLimit
from scheduler.service.api.deps import TEXT_OK
from scheduler.service.api.errors import ServiceError, http_error_body
from scheduler.service.api.hubprefix import HubPrefix, hub_prefixes
from scheduler.service.api.views import live_metrics
from scheduler.service.api.web.whatif import MAX_FORM, WHATIF_PATH
from scheduler.service.api.webhook import BindingWebhook
from scheduler.service.core import ha, registry
from scheduler.service.core.forward import ToLeader
from scheduler.service.core.loop import Core
from scheduler.service.core.telemetry import RequestTelemetry


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable: not_found, forbidden, invalid, conflict, unavailable, ...")
    message: str
    where: str | None = Field(None, description="The field or parameter at fault, when there is one.")
    detail: Any = None


class ErrorBody(BaseModel):
    """Every error answer of the API (ServiceError.body and the validation handler below)."""

    error: ErrorDetail


# Documented on every /v1 route, so that clients (and the schema fuzzing in tests/test_fuzz_api.py) know them.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "No valid, unrevoked API token"),
        (403, "The caller's role does not allow it"),
        (404, "Not found, or not visible to the caller"),
        (409, "Conflicts with the current state"),
        (400, "The body is not one JSON object that can be read"),
        (413, "The body is over max_request_bytes"),
        (422, "Invalid input"),
        (503, "A dependency (database, JupyterHub, an optional package) is unavailable"),
    )
}


def create_app(core: Core, run_loop: bool = True, own_url: str = "") -> FastAPI:
    """The API over `core`. With run_loop, the scheduling loop runs in a thread for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        leadership = core.leadership
        if leadership is None:
            loop = threading.Thread(target=core.run, args=(stop,), name="corral-scheduler", daemon=True)
        else:  # one instance among several: schedules only once it leads
            leadership.start()
            loop = threading.Thread(
                target=ha.lead_then_run, args=(core, leadership, stop), name="corral-scheduler", daemon=True
            )
        if run_loop:
            loop.start()
        webhook = None
        settings = core.settings
        if settings.k8s_binding_webhook_port is not None and settings.k8s_binding_webhook_tls_dir is not None:
            # Before the app says it is ready: the API server may ask as soon as the pod is Ready.
            webhook = BindingWebhook(core, settings.k8s_binding_webhook_port, settings.k8s_binding_webhook_tls_dir)
            webhook.start()
        app.state.ready = True
        try:
            yield
        finally:
            if webhook is not None:
                webhook.close()
            stop.set()
            core.wake.set()
            if run_loop:
                loop.join(timeout=10)
            if leadership is not None:
                leadership.close()
            close = getattr(core.executor, "close", None)  # an executor's background threads (cluster watches)
            if callable(close):
                close()

    app = FastAPI(
        title="Corral",
        version="0.1.0",
        lifespan=lifespan,
        description="GPU scheduler: queues with fair-share quotas, jobs, preemption, usage.",
    )
    app.state.core = core
    app.state.ready = False
    # Once, before any request: MLflow reads its HTTP timeout from the process environment only.
    mlflow_export.configure(core.settings.mlflow_timeout_s)
    # Inside the telemetry, so a refused body is still traced and logged with its request id.
    # The what-if form takes uploaded traces (MAX_UPLOAD each), which are bounded per file there.
    app.add_middleware(
        BodyLimit, limit=lambda path: MAX_FORM if path == WHATIF_PATH else core.settings.max_request_bytes
    )
    app.add_middleware(RequestTelemetry, tracer=lambda: core.tracer)
    to_leader: ToLeader | None = None
    if core.leadership is not None:  # outermost: a follower forwards before anything else reads the request
        elected = core.leadership

        def leads() -> bool:
            return elected.acting() and core.started

        app.add_middleware(
            ToLeader,
            leads=leads,
            leader_url=elected.fence.leader_url,
            own_url=own_url,
            max_body=max(MAX_FORM, core.settings.max_request_bytes),
        )
        to_leader = ToLeader(None, leads, elected.fence.leader_url, own_url)  # readyz asks it who leads
    # Outermost of all: through JupyterHub's proxy every path comes under the hub service's prefix.
    app.add_middleware(HubPrefix, prefixes=hub_prefixes(core.settings.hub_service_prefix, core.settings.hub_api_url))
    core.metrics.add_gauges(lambda: live_metrics(core))
    core.metrics.add_gauges(lambda: registry.audit_metrics(core))  # the audit head, for auditors to keep

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, e: ServiceError) -> JSONResponse:
        return JSONResponse(
            e.body(), status_code=e.status, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        )

    @app.exception_handler(sa.exc.OperationalError)
    async def database_away(_: Request, e: sa.exc.OperationalError) -> JSONResponse:
        # The database is unreachable (stopped, restarting, network): say so, and when to come back.
        body = {
            "error": {
                "code": "unavailable",
                "message": "the database is unavailable; nothing was changed, try again shortly",
            }
        }
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        # FastAPI's own answers (a body it could not parse, an unknown path or method) in the API's error shape;
        # the web UI's redirects and pages keep theirs.
        if e.status_code < 400 or request.url.path.startswith("/ui"):
            return await http_exception_handler(request, e)
        return JSONResponse(http_error_body(e.status_code, str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [{"where": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]} for err in e.errors()]
        text = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        return JSONResponse({"error": {"code": "invalid", "message": text, "detail": problems}}, status_code=422)

    @app.get("/healthz", response_class=PlainTextResponse, tags=["health"])
    def healthz() -> str:
        return "ok"

    @app.get("/readyz", tags=["health"], responses={200: {"model": api.Readiness}, 503: {"model": api.Readiness}})
    async def readyz() -> Response:
        def database() -> str | None:
            try:
                with core.db.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except sa.exc.SQLAlchemyError as e:
                return e.__class__.__name__
            return None

        failed = await anyio.to_thread.run_sync(database)  # off the event loop: the database may hang
        if failed is not None:
            return JSONResponse({"ready": False, "why": f"database: {failed}"}, status_code=503)
        if not app.state.ready:
            return JSONResponse({"ready": False, "why": "starting"}, status_code=503)
        if to_leader is None:
            return JSONResponse({"ready": True, "role": "single"})
        if to_leader.leads():
            return JSONResponse({"ready": True, "role": "leader"})
        # A follower is ready once there is a leader to forward to; which one leads is for people to read.
        leader = await to_leader.leader()
        if leader is None:
            return JSONResponse({"ready": False, "role": "follower", "why": "no leader yet"}, status_code=503)
        return JSONResponse({"ready": True, "role": "follower", "leader": leader})

    @app.get("/metrics", tags=["health"], response_class=Response, responses=TEXT_OK)
    def metrics() -> Response:
        if core.settings.metrics_port is not None:  # served on its own port (metrics_server.py), not here
            return JSONResponse(
                http_error_body(404, f"metrics are served on port {core.settings.metrics_port}"), status_code=404
            )
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes_jobs.router, prefix="/v1", responses=ERRORS)
    app.include_router(routes_cluster.router, prefix="/v1", responses=ERRORS)
    app.include_router(routes_sandboxes.router, prefix="/v1", responses=ERRORS)
    app.include_router(routes_models.router, prefix="/v1", responses=ERRORS)
    app.include_router(routes_admission.router, prefix="/v1", responses=ERRORS)
    app.mount("/ui/static", StaticFiles(directory=web.STATIC), name="ui-static")  # before /ui: it must win
    app.include_router(web.router, prefix="/ui")
    return app
