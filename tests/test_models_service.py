"""The golden path through the API: a finished job's artifact becomes a version, passes its gates and approvals
into production, and rolls back; every gate fails on its own with its reason; the audit chain catches tampering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient

from scheduler.registry import mlflow_export
from scheduler.registry.mlflow_export import MlflowClient
from scheduler.service.api.auth import Role
from scheduler.service.store.db import model_audit
from tests.service_kit import Service

POLICY = {
    "stages": {
        "production": {
            "metrics": [{"metric": "accuracy", "min": 0.9}, {"metric": "accuracy", "vs_production": True}],
            "approvals": 1,
        },
        "staging": {"metrics": [{"metric": "accuracy", "min": 0.9}]},
    }
}


def reject_hook(request: dict[str, Any]) -> str | None:
    """A policy hook for the tests: refuses anything trained on an unapproved dataset."""
    return None if request["model"] != "vetoed" else "dataset not cleared by legal"


def output_dir(svc: Service, job: int, attempt: int = 1) -> Path:
    """The job's output directory, as the executor gives it ($CORRAL_OUTPUT_DIR)."""
    out: Path = svc.executor.output_dir(str(job), attempt)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finished_job(
    svc: Service, api: TestClient, code: int = 0, hours: float = 1.0, outputs: dict[str, bytes] | None = None
) -> int:
    """A job that ran `hours` and exited with `code`, having written `outputs` (name -> bytes) in its output
    directory as its process would."""
    jid: int = api.post("/v1/jobs", json={"queue": "nlp", "gpus": 2, "command": ["train"]}).json()["id"]
    svc.tick()
    for name, content in (outputs or {}).items():
        (output_dir(svc, jid) / name).write_bytes(content)
    svc.clock.advance(hours * 3600)
    svc.executor.exit(jid, code)
    svc.tick()
    return jid


def trained(
    svc: Service,
    api: TestClient,
    accuracy: float | None = 0.9,
    name: str = "w.pt",
    content: bytes = b"weights",
    eval_set: str | None = "imdb-test",
    hours: float = 1.0,
) -> tuple[int, str]:
    """A finished job that wrote an artifact, its metrics.json (accuracy) and lineage.json (eval set):
    (job id, artifact path)."""
    outputs = {name: content, "lineage.json": json.dumps({"eval_set": eval_set}).encode()}
    if accuracy is not None:
        outputs["metrics.json"] = json.dumps({"accuracy": accuracy}).encode()
    job = finished_job(svc, api, hours=hours, outputs=outputs)
    return job, str(output_dir(svc, job) / name)


@pytest.fixture
def team(svc: Service) -> dict[str, TestClient]:
    return {
        "alice": svc.client("alice", Role.MEMBER, "nlp"),
        "olga": svc.client("olga", Role.MODEL_OWNER, "nlp"),
        "owen": svc.client("owen", Role.MODEL_OWNER, "nlp"),
        "bob": svc.client("bob", Role.MODEL_OWNER, "ranking"),
        "vic": svc.client("vic", Role.VIEWER, "nlp"),
    }


def register(
    svc: Service,
    api: TestClient,
    model: str,
    accuracy: float | None = 0.9,
    name: str = "w.pt",
    content: bytes = b"weights",
    eval_set: str | None = "imdb-test",
    hours: float = 1.0,
) -> dict[str, Any]:
    """Train (trained()) and register the job's artifact by its name in the output directory."""
    job, _ = trained(svc, api, accuracy, name, content, eval_set, hours)
    r = api.post(f"/v1/models/{model}/versions", json={"job_id": job, "artifact_uri": name})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_from_a_finished_job_to_production_and_back(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice, olga, owen = team["alice"], team["olga"], team["owen"]
    assert alice.post("/v1/models", json={"name": "sentiment", "queue": "nlp"}).status_code == 201
    assert olga.put("/v1/models/sentiment/policy", json={"document": POLICY}).status_code == 200
    v1 = register(svc, alice, "sentiment", 0.91, "v1.pt")
    assert v1["lineage"]["queue"] == "nlp" and len(v1["digest"]) == 64

    ask = olga.post("/v1/models/sentiment/promotions", json={"version": 1}).json()
    assert ask["state"] == "open"
    assert [(g["gate"], g["status"]) for g in ask["gates"]] == [
        ("metric accuracy >= 0.9", "pass"),
        ("metric accuracy no worse than production", "pass"),
        ("approvals 0/1", "pending"),
        ("digest", "pass"),
    ]
    waiting = owen.get("/v1/promotions", params={"state": "open"}).json()["promotions"]
    assert [p["id"] for p in waiting] == [ask["promotion"]]
    assert team["bob"].get(f"/v1/promotions/{ask['promotion']}").status_code == 404  # another team's
    own = olga.post(f"/v1/promotions/{ask['promotion']}/approve")
    assert own.status_code == 403 and "someone else" in own.json()["error"]["message"]
    assert owen.post(f"/v1/promotions/{ask['promotion']}/approve").json()["state"] == "promoted"

    v2 = register(svc, alice, "sentiment", 0.95, "v2.pt", b"better", hours=2)
    ask2 = owen.post("/v1/models/sentiment/promotions", json={"version": 2}).json()
    assert olga.post(f"/v1/promotions/{ask2['promotion']}/approve").json()["state"] == "promoted"
    shown = alice.get("/v1/models/sentiment").json()
    assert shown["aliases"]["production"] == {**shown["aliases"]["production"], "version": 2, "previous": 1}

    manifest = yaml.safe_load(alice.get("/v1/models/sentiment/deploy").text)
    assert manifest["kind"] == "InferenceService"
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == str(output_dir(svc, v2["lineage"]["job"]) / "v2.pt")
    assert (
        yaml.safe_load(alice.get("/v1/models/sentiment/deploy", params={"kind": "deployment"}).text)["kind"]
        == "Deployment"
    )
    assert alice.get("/v1/models/sentiment/roi").json()["production"] == {"version": 2, "gpu_hours": 4.0}

    back = owen.post("/v1/models/sentiment/rollback", json={}).json()
    assert (back["version"], back["previous"]) == (1, 2)
    entries = olga.get("/v1/models/audit", params={"model": "sentiment", "verify": True}).json()
    assert [e["action"] for e in entries["entries"]] == [
        "model.create",
        "policy.apply",
        "version.register",
        "promotion.request",
        "promotion.approve",
        "model.promote",
        "version.register",
        "promotion.request",
        "promotion.approve",
        "model.promote",
        "model.rollback",
    ]
    assert entries["verified"]["intact"] is True


@pytest.mark.parametrize(
    ("stage", "accuracy", "eval_set", "failing", "evidence"),
    [
        ("staging", 0.85, "imdb-test", "metric accuracy >= 0.9", "0.85"),
        ("production", 0.92, "imdb-test", "metric accuracy no worse than production", "0.93"),
        ("production", 0.99, "other-set", "metric accuracy no worse than production", "other-set"),
    ],
)
def test_each_metric_gate_fails_on_its_own(
    svc: Service,
    team: dict[str, TestClient],
    tmp_path: Path,
    stage: str,
    accuracy: float,
    eval_set: str,
    failing: str,
    evidence: str,
) -> None:
    alice, olga, owen = team["alice"], team["olga"], team["owen"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    olga.put("/v1/models/m/policy", json={"document": POLICY})
    register(svc, alice, "m", 0.93, "a")
    first = olga.post("/v1/models/m/promotions", json={"version": 1}).json()
    owen.post(f"/v1/promotions/{first['promotion']}/approve")
    register(svc, alice, "m", accuracy, "b", b"b", eval_set)
    ask = olga.post("/v1/models/m/promotions", json={"version": 2, "stage": stage}).json()
    assert ask["state"] == "rejected"
    failed = [g for g in ask["gates"] if g["status"] == "fail"]
    assert [g["gate"] for g in failed] == [failing]
    assert evidence in failed[0]["evidence"]


def test_a_changed_artifact_is_refused_at_promotion(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice, olga, owen = team["alice"], team["olga"], team["owen"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    v = register(svc, alice, "m", 0.95)
    ask = olga.post("/v1/models/m/promotions", json={"version": 1}).json()  # default policy: one approval
    (output_dir(svc, v["lineage"]["job"]) / "w.pt").write_bytes(b"tampered")
    done = owen.post(f"/v1/promotions/{ask['promotion']}/approve").json()
    assert done["state"] == "rejected"
    (digest,) = [g for g in done["gates"] if g["gate"] == "digest"]
    assert digest["status"] == "fail"


def test_a_policy_hook_may_reject_with_its_reason(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice, olga = team["alice"], team["olga"]
    alice.post("/v1/models", json={"name": "vetoed", "queue": "nlp"})
    hooked = {"stages": {"staging": {"hook": {"python": "tests.test_models_service:reject_hook"}}}}
    assert olga.put("/v1/models/vetoed/policy", json={"document": hooked}).status_code == 200
    register(svc, alice, "vetoed", 0.99, "x")
    ask = olga.post("/v1/models/vetoed/promotions", json={"version": 1, "stage": "staging"}).json()
    assert ask["state"] == "rejected"
    (hook,) = [g for g in ask["gates"] if g["gate"] == "hook"]
    assert "dataset not cleared by legal" in hook["evidence"]


def test_versions_only_from_completed_jobs(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice = team["alice"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    failed = finished_job(svc, alice, code=1, outputs={"a": b"w"})
    for job, words in ((failed, "is failed"), (9999, "not found")):
        r = alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "a"})
        assert r.status_code == 422 and words in r.json()["error"]["message"]
    missing = alice.post("/v1/models/m/versions", json={"job_id": finished_job(svc, alice), "artifact_uri": "nope"})
    assert missing.status_code == 422 and "nope" in missing.json()["error"]["message"]


def test_roles_members_register_model_owners_promote(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice, olga, bob, vic = team["alice"], team["olga"], team["bob"], team["vic"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    job, _ = trained(svc, alice, name="a")
    assert vic.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "a"}).status_code == 403
    assert alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "a"}).status_code == 201
    assert alice.post("/v1/models/m/promotions", json={"version": 1}).status_code == 403
    assert alice.put("/v1/models/m/policy", json={"document": POLICY}).status_code == 403
    assert bob.get("/v1/models/m").status_code == 404  # another team's model, like a missing one
    assert bob.post("/v1/models/m/promotions", json={"version": 1}).status_code == 404
    ask = olga.post("/v1/models/m/promotions", json={"version": 1}).json()
    assert alice.post(f"/v1/promotions/{ask['promotion']}/approve").status_code == 403
    assert olga.post("/v1/models/m/rollback", json={}).status_code == 409  # nothing to roll back to


def test_a_changed_audit_row_is_detected(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice = team["alice"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    register(svc, alice, "m", 0.9, "a")
    with svc.core.db.begin() as conn:
        conn.execute(sa.update(model_audit).where(model_audit.c.seq == 2).values(actor="mallory"))
    verified = svc.admin.get("/v1/models/audit", params={"verify": True}).json()["verified"]
    assert verified["intact"] is False
    assert any("2" in p for p in verified["problems"])


def test_bad_policy_is_refused_with_where(svc: Service, team: dict[str, TestClient]) -> None:
    team["alice"].post("/v1/models", json={"name": "m", "queue": "nlp"})
    r = team["olga"].put("/v1/models/m/policy", json={"document": {"stages": {"prod": {}}}})
    assert r.status_code == 422
    assert "unknown stage 'prod'" in r.json()["error"]["message"]


@pytest.mark.skipif(not mlflow_export.available(), reason="mlflow-skinny is not installed")
def test_aliases_export_to_mlflow(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice, olga, owen = team["alice"], team["olga"], team["owen"]
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    v = register(svc, alice, "m", 0.93, "a")
    ask = olga.post("/v1/models/m/promotions", json={"version": 1}).json()
    owen.post(f"/v1/promotions/{ask['promotion']}/approve")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    svc.core.settings.mlflow_tracking_uris = [uri]  # the admin's allow-list
    svc.core.settings.mlflow_timeout_s = 120  # a new sqlite store runs MLflow's migrations first: slow machines
    assert alice.post("/v1/models/m/export/mlflow", json={"tracking_uri": uri}).status_code == 403
    out = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": uri}).json()
    assert out["aliases"] == {"production": 1}
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("m", "production")
    assert (mv.source, mv.tags["corral.version"]) == (str(output_dir(svc, v["lineage"]["job"]) / "a"), "1")


def test_a_model_may_not_take_a_route_s_name(svc: Service, team: dict[str, TestClient]) -> None:
    """GET /v1/models/audit is the audit chain: a model named audit could never be read back, so none may be."""
    r = team["alice"].post("/v1/models", json={"name": "audit", "queue": "nlp"})
    assert r.status_code == 422 and "reserved" in r.text
    assert all(m["name"] != "audit" for m in svc.admin.get("/v1/models").json()["models"])
