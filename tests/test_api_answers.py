"""Every JSON route and the `corral` commands that read them, driven once; each answer's keys must stay as recorded."""

# A response model drops the fields it does not list: this catches it. `CORRAL_RECORD_ANSWERS=DIR` writes the whole
# (normalised) answers and CLI outputs to DIR/answers.json, to compare before and after a change, and the key sets
# to DIR/api_answers.json (copy it over tests/api_answers.json when a change of the answers is meant).

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler.cli import client as cli_client
from scheduler.cli.main import app
from scheduler.service.api.auth import Role
from tests.service_kit import Service, make_service
from tests.test_models_service import POLICY as MODEL_POLICY
from tests.test_models_service import trained

RECORDED = Path(__file__).with_name("api_answers.json")
ADMISSION = {
    "rules": [
        {
            "name": "research-gpus",
            "scope": {"queues": ["research"]},
            "max_gpus_per_job": 4,
            "defaults": {"max_runtime": 600},
        }
    ]
}
Cli = Callable[..., str]


def shape(x: Any, at: str = "") -> set[str]:
    """The key paths of a JSON value: `jobs[].reason.rule`; a list's items are merged."""
    if isinstance(x, dict):
        out = {at} if at else set()
        for k, v in x.items():
            out |= shape(v, f"{at}.{k}" if at else str(k))
        return out
    if isinstance(x, list):
        return set().union(*(shape(v, f"{at}[]") for v in x)) if x else {f"{at}[]"}
    return {at}


def normalise(x: Any) -> Any:
    """Random parts out: token secrets."""
    if isinstance(x, dict):
        return {k: "<secret>" if k == "token" and isinstance(v, str) else normalise(v) for k, v in x.items()}
    if isinstance(x, list):
        return [normalise(v) for v in x]
    return x


class Driver:
    """Calls routes and keeps each answer under "METHOD path" (a second call of one route gets "#2")."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.answers: dict[str, Any] = {}

    def call(self, client: TestClient, method: str, path: str, label: str, **kw: Any) -> Any:
        r = client.request(method, path, **kw)
        assert r.status_code in (200, 201), f"{method} {path}: {r.status_code} {r.text}"
        key, n = f"{method} {label}", 1
        while key in self.answers:
            n += 1
            key = f"{method} {label}#{n}"
        self.answers[key] = r.json()
        return r.json()


def drive(svc: Service, corral: Cli) -> dict[str, Any]:
    """One pass over every JSON route (and the CLI's reading commands) with jobs, sandboxes, models and policies."""
    d, admin = Driver(svc), svc.admin
    alice = svc.client("alice", Role.MEMBER, "nlp")
    olga, owen = svc.client("olga", Role.MODEL_OWNER, "nlp"), svc.client("owen", Role.MODEL_OWNER, "nlp")
    job = {
        "name": "train",
        "queue": "nlp",
        "gpus": 2,
        "command": ["python", "train.py"],
        "labels": {"team": "x"},
        "env": {"API_TOKEN": "s", "MODE": "fast"},
    }
    first = d.call(alice, "POST", "/v1/jobs", "/v1/jobs", json=job)["id"]
    second = d.call(alice, "POST", "/v1/jobs", "/v1/jobs", json={**job, "idempotency_key": "k1"})["id"]
    big = d.call(admin, "POST", "/v1/jobs", "/v1/jobs", json={**job, "queue": "ranking", "gpus": 8})["id"]
    svc.tick()
    d.call(alice, "GET", "/v1/jobs", "/v1/jobs")
    d.call(admin, "GET", "/v1/jobs", "/v1/jobs", params={"state": ["pending"], "label": ["team=x"]})
    d.call(alice, "GET", f"/v1/jobs/{first}", "/v1/jobs/{job_id}")
    d.call(admin, "GET", f"/v1/jobs/{big}", "/v1/jobs/{job_id}")
    d.call(alice, "GET", f"/v1/jobs/{first}/events", "/v1/jobs/{job_id}/events")
    d.call(alice, "GET", f"/v1/jobs/{first}/explain", "/v1/jobs/{job_id}/explain")
    d.call(admin, "GET", f"/v1/jobs/{big}/explain", "/v1/jobs/{job_id}/explain")
    d.call(alice, "GET", "/v1/queues", "/v1/queues")
    d.call(admin, "GET", "/v1/pools", "/v1/pools")
    d.call(alice, "GET", "/v1/pools", "/v1/pools")
    cli = {
        "ps": corral("ps"),
        "ps -o json": corral("ps", "-o", "json"),
        "queue ls": corral("queue", "ls"),
        "top": corral("top"),
        "explain": corral("explain", str(big)),
        "explain -o json": corral("explain", str(big), "-o", "json"),
    }
    svc.clock.advance(3600)
    d.call(alice, "POST", f"/v1/jobs/{first}/cancel", "/v1/jobs/{job_id}/cancel")
    d.call(admin, "DELETE", f"/v1/jobs/{big}", "/v1/jobs/{job_id}")
    svc.tick()
    cli["cancel"] = corral("cancel", str(second))
    box = d.call(
        alice,
        "POST",
        "/v1/sandboxes",
        "/v1/sandboxes",
        json={"name": "lab", "queue": "nlp", "command": ["jupyterhub-singleuser"], "idle_timeout_s": 600},
    )
    svc.tick()
    d.call(alice, "GET", "/v1/sandboxes", "/v1/sandboxes")
    d.call(alice, "GET", f"/v1/sandboxes/{box['id']}", "/v1/sandboxes/{job_id}")
    d.call(alice, "DELETE", f"/v1/sandboxes/{box['id']}", "/v1/sandboxes/{job_id}")
    svc.tick()

    latest = admin.get("/v1/queues/history").json()["versions"][-1]
    tree = latest["document"]
    d.call(
        admin,
        "POST",
        "/v1/queues/apply",
        "/v1/queues/apply",
        json={"document": {"queues": [*tree["queues"], {"name": "speech", "parent": "research"}]}, "dry_run": True},
    )
    d.call(
        admin,
        "POST",
        "/v1/queues/apply",
        "/v1/queues/apply",
        json={"document": {"queues": [*tree["queues"], {"name": "speech", "parent": "research"}]}, "comment": "speech"},
    )
    d.call(admin, "POST", "/v1/queues/rollback", "/v1/queues/rollback", json={"version": latest["version"]})
    d.call(admin, "GET", "/v1/queues/history", "/v1/queues/history")
    d.call(alice, "GET", "/v1/queues/history", "/v1/queues/history")
    cli["queue history"] = corral("queue", "history")

    d.call(admin, "GET", "/v1/admission", "/v1/admission")
    d.call(admin, "POST", "/v1/admission/apply", "/v1/admission/apply", json={"document": ADMISSION, "dry_run": True})
    d.call(admin, "POST", "/v1/admission/apply", "/v1/admission/apply", json={"document": ADMISSION, "comment": "a"})
    d.call(admin, "POST", "/v1/admission/apply", "/v1/admission/apply", json={"document": {"rules": []}})
    d.call(admin, "POST", "/v1/admission/rollback", "/v1/admission/rollback", json={"version": 1})
    d.call(admin, "GET", "/v1/admission/history", "/v1/admission/history")
    d.call(admin, "GET", "/v1/admission", "/v1/admission")
    d.call(alice, "POST", "/v1/admission/test", "/v1/admission/test", json={**job, "gpus": 1})
    d.call(alice, "POST", "/v1/admission/test", "/v1/admission/test", json={**job, "gpus": 8})
    cli["policy ls"] = corral("policy", "ls")
    cli["policy history"] = corral("policy", "history")

    made = d.call(admin, "POST", "/v1/tokens", "/v1/tokens", json={"user": "bob", "role": "member", "scope": "nlp"})
    d.call(admin, "DELETE", f"/v1/tokens/{made['id']}", "/v1/tokens/{token_id}")
    d.call(admin, "GET", "/v1/usage", "/v1/usage")
    d.call(alice, "GET", "/v1/usage", "/v1/usage")
    d.call(admin, "GET", "/v1/usage/export", "/v1/usage/export")
    d.call(alice, "GET", "/v1/usage/export", "/v1/usage/export")
    cli["usage"] = corral("usage")

    d.call(alice, "POST", "/v1/models", "/v1/models", json={"name": "sentiment", "queue": "nlp", "description": "r"})
    d.call(olga, "PUT", "/v1/models/sentiment/policy", "/v1/models/{name}/policy", json={"document": MODEL_POLICY})
    for n, accuracy in ((1, 0.91), (2, 0.95)):
        jid, _ = trained(svc, alice, accuracy, f"v{n}.pt", b"w%d" % n)
        d.call(
            alice,
            "POST",
            "/v1/models/sentiment/versions",
            "/v1/models/{name}/versions",
            json={"job_id": jid, "artifact_uri": f"v{n}.pt"},
        )
        ask = d.call(
            olga, "POST", "/v1/models/sentiment/promotions", "/v1/models/{name}/promotions", json={"version": n}
        )
        d.call(owen, "POST", f"/v1/promotions/{ask['promotion']}/approve", "/v1/promotions/{promotion_id}/approve")
    d.call(alice, "GET", "/v1/models", "/v1/models")
    d.call(alice, "GET", "/v1/models/sentiment", "/v1/models/{name}")
    d.call(alice, "GET", "/v1/promotions", "/v1/promotions")
    d.call(alice, "GET", "/v1/promotions/1", "/v1/promotions/{promotion_id}")
    d.call(alice, "GET", "/v1/models/sentiment/roi", "/v1/models/{name}/roi")
    cli |= {
        "models ls": corral("models", "ls"),
        "models show": corral("models", "show", "sentiment"),
        "models roi": corral("models", "roi", "sentiment"),
    }
    d.call(owen, "POST", "/v1/models/sentiment/rollback", "/v1/models/{name}/rollback", json={})
    d.call(olga, "GET", "/v1/models/audit", "/v1/models/audit", params={"model": "sentiment", "verify": True})
    d.call(admin, "GET", "/v1/models/audit", "/v1/models/audit")
    d.call(admin, "GET", "/v1/audit", "/v1/audit")
    cli["models audit"] = corral("models", "audit", "--model", "sentiment", "--verify")
    return {"api": normalise(d.answers), "cli": cli}


@pytest.fixture
def corral(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Service, Cli]:
    svc = make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)
    for var in ("CORRAL_URL", "CORRAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "cli-data"))

    def client(url: str, token: str | None) -> TestClient:
        c = TestClient(svc.admin.app)
        c.headers.update(svc.admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)
    runner = CliRunner()

    def run(*args: str) -> str:
        r = runner.invoke(app, list(args), env={"COLUMNS": "200"})
        assert r.exit_code == 0, f"corral {' '.join(args)}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    return svc, run


def test_answers_keep_their_keys(corral: tuple[Service, Cli]) -> None:
    done = drive(*corral)
    shapes = {route: sorted(shape(answer)) for route, answer in done["api"].items()}
    where = os.environ.get("CORRAL_RECORD_ANSWERS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / "answers.json").write_text(json.dumps(done, indent=1, sort_keys=True))
        (Path(where) / "api_answers.json").write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    assert shapes == json.loads(RECORDED.read_text())


def test_openapi_describes_every_json_answer(corral: tuple[Service, Cli]) -> None:
    """No JSON route answers a bare object: each names its model in the OpenAPI document."""
    doc = corral[0].admin.get("/openapi.json").json()
    bare = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            for code, answer in op.get("responses", {}).items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if code.startswith("2") and schema is not None and "$ref" not in yaml.safe_dump(schema):
                    bare.append(f"{method.upper()} {path}")
    assert bare == []
