"""Fuzzing the HTTP API with schemathesis: requests generated from the service's own OpenAPI document, sent as each
role's bearer token to an in-process service over SQLite. Every answer must be free of 5xx and must conform to the
schema: a documented status code, the documented content type, a body (and headers) of the documented shape.

Each role fuzzes a fresh service (what an admin's requests change must not decide what a viewer sees), seeded with
jobs (pending, running, completed) in its own team's queue and another team's, and a model with a version, so that
small generated ids and the name "m" reach real objects as well as missing ones. Failures are collected over the
whole run and reported together, each with the request that reproduces it.

GET /v1/jobs/{id}/logs is sent with follow=false only: the scripted executor's running jobs never end, so a followed
log would stream for ever. Nothing here starts a process: the executor only records launches."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scheduler.backends.base import Handle, Launch
from scheduler.service.api.auth import Role
from scheduler.service.api.routes_models import RESERVED_NAMES
from scheduler.service.core.assemble import create_token
from tests.service_kit import ScriptedExecutor, Service, make_service

CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Examples per operation. Operations without parameters run out of distinct inputs after one; the rest make up a
# role's total, which the test asserts (MIN_REQUESTS_PER_ROLE).
EXAMPLES_PER_OPERATION = 40
MIN_REQUESTS_PER_ROLE = 1000
SCOPES: dict[Role, str | None] = {
    Role.PLATFORM_ADMIN: None,
    Role.TEAM_ADMIN: "research",
    Role.MEMBER: "nlp",
    Role.MODEL_OWNER: "nlp",
    Role.VIEWER: "nlp",
}
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # failures are collected, not shrunk
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@dataclass
class LoggingExecutor(ScriptedExecutor):
    """The kit's executor, with log files that exist for launched attempts: /logs answers 200 with text."""

    root: Path = Path(".")

    def launch(self, launch: Launch) -> Handle:
        for stream in ("stdout", "stderr"):
            path = Path(self._path(launch.job_id, launch.attempt, stream))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{stream} of job {launch.job_id}\n")
        return super().launch(launch)

    def _path(self, job_id: str, attempt: int, stream: str) -> str:
        return str(self.root / job_id / str(attempt) / stream)

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        return self._path(job_id, attempt, "stdout"), self._path(job_id, attempt, "stderr")


def seed(svc: Service, tmp: Path) -> None:
    """Jobs in nlp (the fuzzing teams' queue) and ranking (another team's): running, completed, pending; a model
    in nlp with one version from the completed job."""
    alice, bob = svc.client("alice", Role.MEMBER, "nlp"), svc.client("bob", Role.MEMBER, "ranking")
    ids = [
        api.post("/v1/jobs", json={"queue": q, "command": ["train"], "gpus": g}).json()["id"]
        for api, q, g in ((alice, "nlp", 1), (alice, "nlp", 1), (bob, "ranking", 2), (alice, "nlp", 8))
    ]
    svc.tick()
    out = svc.executor.output_dir(str(ids[1]), 1)  # what the job wrote: its weights and metrics
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"weights")
    (out / "metrics.json").write_text('{"accuracy": 0.9}')
    svc.executor.exit(ids[1], 0)
    svc.tick()
    assert alice.post("/v1/models", json={"name": "m", "queue": "nlp"}).status_code == 201
    r = alice.post("/v1/models/m/versions", json={"job_id": ids[1], "artifact_uri": "weights.bin"})
    assert r.status_code == 201, r.text


def fuzz(svc: Service, token: str) -> tuple[int, list[str]]:
    """Every operation of the schema, EXAMPLES_PER_OPERATION generated cases each: (requests sent, failures)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.admin.app)
    headers = {"Authorization": f"Bearer {token}"}
    sent, failures = 0, []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal sent
            if case.path.endswith("/logs") and case.query:
                case.query["follow"] = False
            if case.path == "/v1/models/{name}" and (case.path_parameters or {}).get("name") in RESERVED_NAMES:
                return  # GET /v1/models/audit is the audit route (matched first); no model may take that name
            sent += 1
            try:
                response = case.call(headers=headers)
            except Exception as e:  # the in-process client re-raises what the app raised: a 500 when served
                failures.append(f"{case.as_curl_command()} -> raised {e.__class__.__name__}: {e}")
                return
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as group:  # one per failing check
                what = "; ".join(f"{f.title}: {' '.join(f.message.split())[:300]}" for f in group.exceptions)
                failures.append(f"{case.as_curl_command()} -> {response.status_code}: {what}")

        run()
    return sent, failures


@pytest.mark.slow  # a thousand generated requests per role
@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_generated_requests_get_no_5xx_and_conform_to_the_schema(tmp_path: Path, role: Role) -> None:
    svc = make_service(f"sqlite:///{tmp_path / 'corral.db'}", tmp_path, LoggingExecutor(root=tmp_path / "logs"))
    seed(svc, tmp_path)
    token = create_token(svc.core, f"fuzz-{role.value}", role, SCOPES[role])
    started = time.monotonic()
    sent, failures = fuzz(svc, token)
    print(f"{role.value}: {sent} requests in {time.monotonic() - started:.1f} s, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {sent} requests failed:\n" + "\n".join(failures)
    assert sent >= MIN_REQUESTS_PER_ROLE


def test_the_fuzzed_schema_is_the_served_one(tmp_path: Path) -> None:
    """The fuzzer reads /openapi.json from the app itself: the document clients see, not a copy in the repo."""
    svc = make_service(f"sqlite:///{tmp_path / 'corral.db'}", tmp_path)
    served = TestClient(svc.admin.app).get("/openapi.json").json()
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.admin.app)
    assert schema.raw_schema["paths"].keys() == served["paths"].keys()
