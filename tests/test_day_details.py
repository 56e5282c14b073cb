"""Issue 24's small things, each seen as a user sees it: events as readable text, commands with their quoting,
`corral top`'s last line, admission policy problems all at once, `corral logs` on a job that never started,
usage capacity only from the service's first record, the dashboard's documented port."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from scheduler.cli import client as cli_client
from scheduler.cli.main import app
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import create_token
from scheduler.service.core.settings import ServiceSettings
from tests.service_kit import Service, make_service
from tests.test_cli_service import Corral, submit


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)


@pytest.fixture
def corral(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Corral:
    """`corral ARGS...` against `service` as its platform admin (as in test_cli_service); asserts the exit status."""
    for var in ("CORRAL_URL", "CORRAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "cli-data"))

    def client(url: str, token: str | None) -> TestClient:
        c = TestClient(service.admin.app)
        c.headers.update(service.admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)

    def run(*args: str, code: int = 0) -> Result:
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
        assert r.exit_code == code, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{r.exception!r}"
        return r

    return run


ROOT = Path(__file__).resolve().parent.parent
LOOP = ["sh", "-c", 'for i in $(seq 3); do echo "$i"; done']


def test_the_started_event_reads_as_text_not_a_python_dict(corral: Corral, service: Service) -> None:
    jid = submit(corral, "nlp", 2)
    service.tick()
    service.tick()
    (started,) = [e for e in service.admin.get(f"/v1/jobs/{jid}/events").json()["events"] if e["kind"] == "started"]
    assert "{" not in started["message"] and "'" not in started["message"], started["message"]
    node, gpus = next(iter(started["data"]["gpus"].items()))
    assert f"on {node} GPUs {','.join(str(g) for g in gpus)}" in started["message"]


def test_the_job_page_shows_the_command_with_its_quoting(service: Service) -> None:
    jid = service.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 1, "command": LOOP}).json()["id"]
    web = service.client("boss", Role.PLATFORM_ADMIN)
    web.post("/ui/login", data={"token": create_token(service.core, "boss", Role.PLATFORM_ADMIN), "next": "/ui/jobs"})
    page = web.get(f"/ui/jobs/{jid}").text
    assert shlex.join(LOOP) in html.unescape(page)  # sh -c 'for i in $(seq 3); do echo "$i"; done'
    assert "It never started" not in page


def test_top_ends_with_a_newline(corral: Corral, service: Service) -> None:
    submit(corral, "nlp", 1)
    service.tick()
    for args in (["top"], ["top", "-o", "json"], ["top", "-o", "yaml"]):
        out = corral(*args).stdout
        assert out.endswith("\n") and not out.endswith("\n\n"), args


def test_admission_policy_problems_are_reported_all_at_once(corral: Corral, service: Service, tmp_path: Path) -> None:
    document = {
        "rules": [
            {"name": "a", "defaults": {"queue": "nlp", "colour": "red"}, "allowed_images": [""]},
            {"name": "a", "max_gpus_per_job": -1},
            {"name": "b", "scope": {"queues": ["reserch"]}},
        ]
    }
    r = service.admin.post("/v1/admission/apply", json={"document": document})
    assert r.status_code == 422
    problems = {(d["where"], d["problem"]) for d in r.json()["error"]["detail"]}
    text = " | ".join(f"{w}: {p}" for w, p in sorted(problems))
    for expected in (
        "defaults may not set 'queue'",
        "defaults names 'colour'",
        "empty prefix",
        "rules.1.max_gpus_per_job",
        "repeated: a",
        "rules.2.scope.queues: queue 'reserch' does not exist",
    ):
        assert expected in text, (expected, text)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    err = corral("policy", "apply", "-f", str(policy), "--yes", code=1).stderr
    assert "repeated: a" in err and "'reserch' does not exist" in err and "defaults names 'colour'" in err


def test_logs_of_a_job_cancelled_before_it_started(corral: Corral, service: Service) -> None:
    jid = submit(corral, "nlp", 1)
    corral("cancel", str(jid))
    err = corral("logs", str(jid), code=1).stderr
    assert "never ran" in err and "not started yet" not in err
    waiting = submit(corral, "nlp", 1)
    assert "has not started yet" in corral("logs", str(waiting), code=1).stderr


def test_usage_counts_capacity_from_the_services_first_record(corral: Corral, service: Service) -> None:
    """The service was made at t0: a day's range counts 8 GPUs x 1 h of capacity, not 8 x 24 h."""
    t0 = service.clock.t
    service.clock.advance(3600)
    data = json.loads(corral("usage", "--since", str(t0 - 86400), "-o", "json").stdout)
    assert data["pools"][0]["capacity_gpu_hours"] == 8.0
    assert data["pools"][0]["idle_gpu_hours"] == 8.0
    later = json.loads(corral("usage", "--since", str(t0 + 1800), "-o", "json").stdout)
    assert later["pools"][0]["capacity_gpu_hours"] == 4.0  # a range inside the service's life: all of it


def test_the_dashboard_doc_gives_the_default_port() -> None:
    text = (ROOT / "docs" / "dashboard.md").read_text()
    port = ServiceSettings.model_fields["port"].default
    assert f":{port}/ui/" in text and ":8080" not in text
