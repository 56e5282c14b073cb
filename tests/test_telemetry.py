"""Observability: OpenTelemetry spans per API request and per scheduling cycle (into an in-memory exporter), and
JSON log lines carrying request, job and queue ids."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from scheduler.service.core import telemetry
from scheduler.service.core.settings import ServiceSettings
from tests.service_kit import Service, make_service

JOB = {"queue": "nlp", "gpus": 1, "command": ["python", "train.py"]}


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)


@pytest.fixture
def spans(svc: Service) -> InMemorySpanExporter:
    """The service's spans, kept in memory (its own provider: nothing global changes)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    svc.core.tracer = provider.get_tracer("corral")
    return exporter


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_a_span_per_request_with_route_status_caller_and_request_id(svc: Service, spans: InMemorySpanExporter) -> None:
    r = svc.admin.post("/v1/jobs", json=JOB, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 201 and r.headers["X-Request-ID"] == "req-42"
    job_id = r.json()["id"]
    got = svc.admin.get(f"/v1/jobs/{job_id}")
    fresh = got.headers["X-Request-ID"]
    refused = svc.admin.get("/v1/jobs/1", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    again = refused.headers["X-Request-ID"]
    assert fresh != "req-42" and again not in (fresh, "req-42")  # none given: a new one each time
    assert fresh.split("-")[0] == again.split("-")[0] and len(fresh.split("-")[0]) == 12  # this process's prefix
    assert svc.admin.get("/v1/jobs", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"] != "x" * 500

    (post,) = named(spans, "POST /v1/jobs")
    a = post.attributes or {}
    assert (a["http.route"], a["http.response.status_code"], a["corral.request_id"]) == ("/v1/jobs", 201, "req-42")
    assert (a["enduser.id"], a["enduser.role"], a["http.request.method"]) == ("root", "platform-admin", "POST")
    gets = named(spans, "GET /v1/jobs/{job_id}")  # the route's template: one name for every job
    assert [(s.attributes or {})["http.response.status_code"] for s in gets] == [200, 401]
    assert "enduser.id" not in (gets[1].attributes or {})
    assert (gets[0].attributes or {})["url.path"] == f"/v1/jobs/{job_id}"


def test_a_span_per_scheduling_cycle(svc: Service, spans: InMemorySpanExporter) -> None:
    for _ in range(2):
        assert svc.admin.post("/v1/jobs", json={**JOB, "gpus": 4, "queue": "ranking"}).status_code == 201
    svc.tick()
    svc.tick()
    cycles = named(spans, "corral.scheduling_cycle")
    assert [(c.attributes or {})["corral.admitted"] for c in cycles] == [2, 0]
    first = cycles[0].attributes or {}
    assert (first["corral.decisions"], first["corral.preempted"], first["corral.rejected"]) == (2, 0, 0)
    assert cycles[0].parent is None  # the loop's own trace, not a request's


@pytest.fixture
def json_logs(tmp_path: Path) -> Iterator[io.StringIO]:
    """JSON log lines of the whole process at info level, into a buffer; the root logger is restored after."""
    root = logging.getLogger()
    level, out = root.level, io.StringIO()
    handler = telemetry.configure_logging(
        ServiceSettings(data_dir=tmp_path, log_format="json", log_level="info"), stream=out
    )
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_logs_carry_request_job_and_queue_ids(
    svc: Service, spans: InMemorySpanExporter, json_logs: io.StringIO
) -> None:
    r = svc.admin.post("/v1/jobs", json=JOB, headers={"X-Request-ID": "req-7"})
    job_id = r.json()["id"]
    svc.tick()
    logged = lines(json_logs)
    assert all({"time", "level", "logger", "message"} <= set(x) for x in logged)
    submitted = next(x for x in logged if x.get("job_id") == job_id and "submitted" in x["message"])
    assert (submitted["request_id"], submitted["queue"], submitted["level"]) == ("req-7", "nlp", "info")
    access = next(x for x in logged if x["logger"] == "corral.api" and x.get("http_status") == 201)
    assert (access["request_id"], access["user"], access["message"]) == ("req-7", "root", "POST /v1/jobs 201")
    assert access["duration_ms"] >= 0 and len(access["trace_id"]) == 32
    # The scheduler's decision, logged inside the cycle's span: job and queue, and the cycle's trace id.
    admitted = next(x for x in logged if x["logger"] == "corral.service" and x.get("job_id") == job_id)
    assert admitted["queue"] == "nlp" and "request_id" not in admitted and "started" in admitted["message"]
    (cycle,) = named(spans, "corral.scheduling_cycle")
    assert admitted["trace_id"] == f"{cycle.context.trace_id:032x}"


def test_log_errors_keep_their_traceback(json_logs: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("corral.service").exception("scheduling cycle failed", extra={"queue": "nlp"})
    (x,) = lines(json_logs)
    assert x["level"] == "error" and x["queue"] == "nlp" and "RuntimeError: boom" in x["exception"]


def test_exporter_from_settings(tmp_path: Path) -> None:
    def settings(**kw: Any) -> ServiceSettings:
        return ServiceSettings(data_dir=tmp_path, **kw)

    assert telemetry.exporter(settings()) is None  # off by default
    assert isinstance(telemetry.exporter(settings(otel_exporter="console")), ConsoleSpanExporter)
    otlp = settings(otel_exporter="otlp", otel_endpoint="http://127.0.0.1:1/v1/traces")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        with pytest.raises(ValueError, match=r"corral\[otel\]"):
            telemetry.exporter(otlp)
    else:
        assert type(telemetry.exporter(otlp)).__name__ == "OTLPSpanExporter"
    with pytest.raises(ValueError):
        settings(otel_exporter="jaeger")
