"""OpenTelemetry traces of API requests and scheduling cycles; JSON logs carrying job, queue and request ids."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import IO, Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.engine.decisions import Decision, Preempted, Rejected, Started
from scheduler.service.api.auth import Principal
from scheduler.service.core.settings import ServiceSettings

TRACER = "corral"
REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 200  # a caller's id longer than this (or not printable ASCII) is replaced, not logged
access_log = logging.getLogger("corral.api")


class _Request:
    """What the logs and the span of one request learn while it runs (the caller is known only after auth)."""

    def __init__(self, request_id: str):
        self.id = request_id
        self.user: str | None = None


_REQUEST: ContextVar[_Request | None] = ContextVar("corral_request", default=None)


def request_id() -> str | None:
    """The id of the API request being handled here, if any."""
    r = _REQUEST.get()
    return r.id if r is not None else None


# ----- traces -----


def exporter(settings: ServiceSettings) -> SpanExporter | None:
    """The span exporter the settings name; None when tracing is off."""
    if settings.otel_exporter == "none":
        return None
    if settings.otel_exporter == "console":
        return ConsoleSpanExporter()
    try:
        # An optional extra (corral[otel]): imported only when asked for, so a missing package is named here.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(
            "otel_exporter otlp needs the OTLP exporter: pip install 'corral[otel]' "
            "(opentelemetry-exporter-otlp-proto-http)"
        ) from e
    return OTLPSpanExporter(endpoint=settings.otel_endpoint)


def make_tracer(settings: ServiceSettings) -> Tracer:
    """The service's tracer: its own provider when an exporter is configured, else the global one (a no-op unless
    something such as opentelemetry-instrument set a provider up)."""
    found = exporter(settings)
    if found is None:
        return trace.get_tracer(TRACER)
    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    provider.add_span_processor(BatchSpanProcessor(found))
    return provider.get_tracer(TRACER)


class HasTracer(Protocol):
    tracer: Tracer


C = TypeVar("C", bound=HasTracer)


def traced_cycle(tick: Callable[[C], list[Decision]]) -> Callable[[C], list[Decision]]:
    """A span around each scheduling cycle, with how many jobs it admitted, preempted and rejected."""

    @functools.wraps(tick)
    def cycle(core: C) -> list[Decision]:
        with core.tracer.start_as_current_span("corral.scheduling_cycle") as span:
            decisions = tick(core)
            span.set_attributes(
                {
                    "corral.decisions": len(decisions),
                    "corral.admitted": sum(isinstance(d, Started) for d in decisions),
                    "corral.preempted": sum(isinstance(d, Preempted) for d in decisions),
                    "corral.rejected": sum(isinstance(d, Rejected) for d in decisions),
                }
            )
            return decisions

    return cycle


def identified(who: Principal) -> Principal:
    """Note the authenticated caller on the request's span and log line (auth dependencies call this)."""
    r = _REQUEST.get()
    if r is not None:
        r.user = who.user
    span = trace.get_current_span()
    span.set_attribute("enduser.id", who.user)
    span.set_attribute("enduser.role", who.role.value)
    return who


# Generated request ids: this process's random prefix and a counter. uuid4 per request read the kernel's random
# source every time, about a tenth of the API's CPU under load; unique per process is what a log needs.
_ids = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:12]


def _new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


def _request_id(scope: Scope) -> str:
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            text: str = v.decode("latin-1")
            if 0 < len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable():
                return text
    return _new_request_id()


def _route_template(scope: Scope) -> str | None:
    """The matched route's path template with the prefix of the router it was included under: FastAPI versions that
    keep included routers as such give the route's own path ("/jobs/{job_id}"), and the prefix is what precedes
    the part of the request's path that the route matches."""
    route = scope.get("route")
    template, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
    if not isinstance(template, str) or regex is None:
        return None
    path: str = scope["path"]
    for i, c in enumerate(path):
        if c == "/" and regex.match(path[i:]):
            return path[:i] + template
    return template


class RequestTelemetry:
    """ASGI middleware: each request gets an id (the caller's X-Request-ID, else a new one) that its logs carry
    and its answer returns, a server span (route, status, caller), and an access log line at info level."""

    def __init__(self, app: ASGIApp, tracer: Callable[[], Tracer]):
        self.app, self.tracer = app, tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        req = _Request(_request_id(scope))
        token = _REQUEST.set(req)
        method, path, status = scope["method"], scope["path"], 500
        began = time.perf_counter()
        span = self.tracer().start_span(
            f"{method} {path}",
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "corral.request_id": req.id},
        )

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, req.id)
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False):
                await self.app(scope, receive, answer)
        finally:
            with trace.use_span(span, end_on_exit=True):  # the access line carries the request's trace id
                route = _route_template(scope)
                if route:  # the template (/v1/jobs/{job_id}): one span name per route, not per job
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                access_log.info(
                    "%s %s %d",
                    method,
                    path,
                    status,
                    extra={
                        "http_status": status,
                        "duration_ms": round(1000 * (time.perf_counter() - began), 3),
                        "user": req.user,
                    },
                )
            _REQUEST.reset(token)


# ----- logs -----

# Attributes every LogRecord has: anything else on a record came from `extra=` and goes into the JSON.
# uvicorn adds color_message, its message with terminal colours: noise in JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request id and trace id when there are, and
    whatever the call passed in `extra` (job_id, queue, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id()
        if rid is not None:
            out["request_id"] = rid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"], out["span_id"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(settings: ServiceSettings, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of the process, at log_level and up, to stderr (or `stream`) as text or JSON lines;
    the handler is returned so that a caller (a test) can remove it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler
