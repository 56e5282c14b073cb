"""Issue 21, the golden path's integrity: each test makes hostile requests (counted with attack_kit.attempt) and
checks that every one fails, for the items (3, artifact paths: tests/test_attack_artifacts.py)

5. typed-in metrics: gates read the job's metrics.json, code and data lineage come from its lineage.json;
6. rollback digest and audit truncation: rollback re-checks the digest, `verify --head` catches removed newest
   rows and a rewritten chain, and a direct change to model_aliases is reported;
7. mlflow uri: exports go only to an admin's allow-list, within a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from notebooks.outputs import log_metrics, record_lineage, tree_digest
from scheduler.backends.local import LocalExecutor
from scheduler.registry import audit as chain
from scheduler.registry import mlflow_export
from scheduler.service.api.auth import Role
from scheduler.service.store.db import model_aliases, model_audit, model_versions
from tests import attack_kit
from tests.service_kit import ScriptedExecutor, Service, make_service
from tests.test_models_service import finished_job, output_dir, register, trained
from tests.test_service_local import state, until


@pytest.fixture
def team(svc: Service) -> dict[str, TestClient]:
    alice = svc.client("alice", Role.MEMBER, "nlp")
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    return {
        "alice": alice,
        "olga": svc.client("olga", Role.MODEL_OWNER, "nlp"),
        "owen": svc.client("owen", Role.MODEL_OWNER, "nlp"),
        "bob": svc.client("bob", Role.MEMBER, "ranking"),
    }


def refused(api: TestClient, job: int, uri: str, status: int = 422) -> str:
    r = api.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": uri})
    assert r.status_code == status, r.text
    message: str = r.json()["error"]["message"]
    return message


# ----- 5: typed-in metrics -----


@pytest.mark.parametrize(
    "field",
    [
        {"metrics": {"accuracy": 0.999}},
        {"code_ref": "git:abc123"},
        {"dataset_ref": "imdb@2024"},
        {"eval_set": "imdb-test"},
    ],
)
def test_typed_in_metrics_and_lineage_are_refused(
    svc: Service, team: dict[str, TestClient], field: dict[str, Any]
) -> None:
    job, _ = trained(svc, team["alice"], accuracy=0.053)
    attack_kit.attempt("5 typed-in metrics")
    r = team["alice"].post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "w.pt", **field})
    assert r.status_code == 422 and "metrics.json" in r.json()["error"]["message"]


def test_gates_check_what_the_job_measured(svc: Service, team: dict[str, TestClient]) -> None:
    alice, olga = team["alice"], team["olga"]
    olga.put(
        "/v1/models/m/policy",
        json={"document": {"stages": {"staging": {"metrics": [{"metric": "accuracy", "min": 0.9}]}}}},
    )
    v = register(svc, alice, "m", accuracy=0.053)
    assert v["lineage"]["recorded_by_job"] is True
    attack_kit.attempt("5 typed-in metrics")
    ask = olga.post("/v1/models/m/promotions", json={"version": 1, "stage": "staging"}).json()
    assert ask["state"] == "rejected"
    assert "0.053" in next(g["evidence"] for g in ask["gates"] if g["gate"].startswith("metric"))
    assert alice.get("/v1/models/m").json()["versions"][0]["metrics"] == {"accuracy": 0.053}


def test_metrics_typed_in_before_the_job_recorded_them_pass_no_gate(svc: Service, team: dict[str, TestClient]) -> None:
    """A version registered by an older Corral, with metrics typed in: its lineage carries no mark that the job
    measured them, so a metric gate fails it, saying how to get a version the gates can trust."""
    alice, olga = team["alice"], team["olga"]
    olga.put(
        "/v1/models/m/policy",
        json={"document": {"stages": {"staging": {"metrics": [{"metric": "accuracy", "min": 0.9}]}}}},
    )
    v = register(svc, alice, "m", accuracy=0.95)
    assert v["lineage"]["metrics_from_job"] is True
    stored = alice.get("/v1/models/m").json()["versions"][0]["lineage"]
    assert stored["metrics_from_job"] is True and stored["recorded_by_job"] is True  # kept, not only returned
    with svc.core.db.begin() as conn:  # the version as the old code stored it
        old = {k: x for k, x in stored.items() if k not in ("metrics_from_job", "recorded_by_job")}
        conn.execute(sa.update(model_versions).values(lineage=old, metrics={"accuracy": 0.999}))
    attack_kit.attempt("5 typed-in metrics")
    ask = olga.post("/v1/models/m/promotions", json={"version": 1, "stage": "staging"}).json()
    assert ask["state"] == "rejected", ask
    evidence = next(g["evidence"] for g in ask["gates"] if g["gate"].startswith("metric"))
    assert "metrics typed in before Corral 0.1.0" in evidence and "register again from the job's output" in evidence


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"accuracy": NaN}', "not a number JSON knows"),
        (b'{"accuracy": "0.99"}', "not a finite number"),
        (b'{"accuracy": true}', "not a finite number"),
        (b"[0.99]", "JSON object"),
        (b"{", "not valid JSON"),
        (b'{"accuracy": 1e999}', "not a finite number"),
    ],
)
def test_a_malformed_metrics_file_is_refused(
    svc: Service, team: dict[str, TestClient], content: bytes, words: str
) -> None:
    job = finished_job(svc, team["alice"], outputs={"w.pt": b"w", "metrics.json": content})
    attack_kit.attempt("5 typed-in metrics")
    assert words in refused(team["alice"], job, "w.pt")


def test_a_metrics_file_that_leads_elsewhere_is_refused(
    svc: Service, team: dict[str, TestClient], tmp_path: Path
) -> None:
    alice = team["alice"]
    planted = tmp_path / "planted.json"
    planted.write_text('{"accuracy": 0.999}')
    job = finished_job(svc, alice, outputs={"w.pt": b"w"})
    (output_dir(svc, job) / "metrics.json").symlink_to(planted)
    attack_kit.attempt("5 typed-in metrics")
    assert "outside the job's output directory" in refused(alice, job, "w.pt")
    fifo_job = finished_job(svc, alice, outputs={"w.pt": b"w"})
    os.mkfifo(output_dir(svc, fifo_job) / "metrics.json")
    attack_kit.attempt("5 typed-in metrics")
    assert "not a regular file" in refused(alice, fifo_job, "w.pt")


def test_metrics_come_from_the_attempt_that_completed(svc: Service, team: dict[str, TestClient]) -> None:
    """A preempted first attempt's optimistic metrics.json is not what the gates read."""
    alice = team["alice"]
    jid = alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 8, "command": ["train"]}).json()["id"]
    svc.tick()
    (output_dir(svc, jid, 1) / "metrics.json").write_text('{"accuracy": 0.999}')
    (output_dir(svc, jid, 1) / "ckpt.pt").write_bytes(b"epoch 1")
    urgent = alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 8, "command": ["x"], "priority": 10}).json()["id"]
    svc.tick()  # preempts attempt 1
    svc.tick()
    svc.executor.exit(urgent, 0)
    svc.tick()  # attempt 2 starts
    svc.tick()
    (output_dir(svc, jid, 2) / "metrics.json").write_text('{"accuracy": 0.5}')
    svc.executor.exit(jid, 0, attempt=2)
    svc.tick()
    assert alice.get(f"/v1/jobs/{jid}").json()["state"] == "completed"
    attack_kit.attempt("5 typed-in metrics")
    r = alice.post(
        "/v1/models/m/versions", json={"job_id": jid, "artifact_uri": str(output_dir(svc, jid, 1) / "ckpt.pt")}
    )
    assert r.status_code == 201, r.text  # an earlier attempt's checkpoint is the job's own output
    assert alice.get("/v1/models/m").json()["versions"][0]["metrics"] == {"accuracy": 0.5}


def test_lineage_digests_are_the_jobs_own(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    alice = team["alice"]
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("print('train')\n")
    data = tmp_path / "train.csv"
    data.write_text("x,y\n1,2\n")
    job = finished_job(svc, alice, outputs={"w.pt": b"w"})
    record_lineage(code=code, data=[data], eval_set="imdb-test", output_dir=output_dir(svc, job))
    log_metrics({"accuracy": 0.93}, output_dir=output_dir(svc, job))
    r = alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "w.pt"})
    assert r.status_code == 201, r.text
    lineage = r.json()["lineage"]
    assert lineage["code"]["sha256"] == tree_digest(code) and lineage["data"] == [
        {"name": str(data), "sha256": tree_digest(data)}
    ]
    assert "dataset" not in lineage
    shown = alice.get("/v1/models/m").json()["versions"][0]
    assert (shown["eval_set"], shown["metrics"]) == ("imdb-test", {"accuracy": 0.93})
    bad = finished_job(svc, alice, outputs={"w.pt": b"w", "lineage.json": b'{"code": {"sha256": "typed"}}'})
    attack_kit.attempt("5 typed-in metrics")
    assert "lineage.json is not valid" in refused(alice, bad, "w.pt")


@pytest.mark.integration  # a real job process
def test_a_real_job_writes_its_metrics_and_registers_from_its_output(tmp_path: Path) -> None:
    """End to end on the local executor: the job's process writes the artifact, metrics.json and lineage.json in
    $CORRAL_OUTPUT_DIR with the SDK; registration reads them; typed-in metrics change nothing."""
    svc = make_service(f"sqlite:///{tmp_path / 'c.db'}", tmp_path, LocalExecutor(tmp_path / "runs"))
    alice = svc.client("alice", Role.MEMBER, "nlp")
    olga = svc.client("olga", Role.MODEL_OWNER, "nlp")
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    olga.put(
        "/v1/models/m/policy",
        json={"document": {"stages": {"staging": {"metrics": [{"metric": "accuracy", "min": 0.9}]}}}},
    )
    code = (
        "import os, pathlib\n"
        "from notebooks import log_metrics, record_lineage\n"
        "out = pathlib.Path(os.environ['CORRAL_OUTPUT_DIR'])\n"
        "(out / 'model.pt').write_bytes(b'weights')\n"
        "record_lineage(code=None, eval_set='holdout')\n"
        "log_metrics({'accuracy': 0.053})\n"
    )
    jid = alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 1, "command": [sys.executable, "-c", code]}).json()["id"]
    until(svc, lambda: state(svc, jid) in ("completed", "failed"))
    assert state(svc, jid) == "completed", alice.get(f"/v1/jobs/{jid}/logs").text
    attack_kit.attempt("5 typed-in metrics")
    typed = alice.post(
        "/v1/models/m/versions", json={"job_id": jid, "artifact_uri": "model.pt", "metrics": {"accuracy": 0.999}}
    )
    assert typed.status_code == 422
    r = alice.post("/v1/models/m/versions", json={"job_id": jid, "artifact_uri": "model.pt"})
    assert r.status_code == 201, r.text
    version = alice.get("/v1/models/m").json()["versions"][0]
    assert (version["metrics"], version["eval_set"]) == ({"accuracy": 0.053}, "holdout")
    assert version["artifact_uri"] == f"corral-output://{jid}/1/model.pt"  # the job's, wherever data_dir lies
    ask = olga.post("/v1/models/m/promotions", json={"version": 1, "stage": "staging"}).json()
    assert ask["state"] == "rejected"


# ----- 6: rollback digest, audit truncation, aliases -----


def two_in_production(svc: Service, team: dict[str, TestClient]) -> list[dict[str, Any]]:
    alice, olga, owen = team["alice"], team["olga"], team["owen"]
    versions = []
    for content in (b"v1", b"v2"):
        versions.append(register(svc, alice, "m", 0.95, content=content))
        ask = olga.post("/v1/models/m/promotions", json={"version": len(versions)}).json()
        assert owen.post(f"/v1/promotions/{ask['promotion']}/approve").json()["state"] == "promoted"
    return versions


def test_rollback_refuses_a_swapped_artifact(svc: Service, team: dict[str, TestClient]) -> None:
    olga = team["olga"]
    v1, _ = two_in_production(svc, team)
    path = output_dir(svc, v1["lineage"]["job"]) / "w.pt"
    path.write_bytes(b"backdoored")
    attack_kit.attempt("6 rollback digest")
    r = olga.post("/v1/models/m/rollback", json={})
    assert r.status_code == 409 and "no longer what was registered" in r.json()["error"]["message"]
    path.unlink()
    attack_kit.attempt("6 rollback digest")
    r = olga.post("/v1/models/m/rollback", json={})
    assert r.status_code == 409 and "cannot be read" in r.json()["error"]["message"]
    path.symlink_to("/dev/zero")
    attack_kit.attempt("6 rollback digest")
    assert olga.post("/v1/models/m/rollback", json={}).status_code == 409
    assert olga.get("/v1/models/m").json()["aliases"]["production"]["version"] == 2
    path.unlink()
    path.write_bytes(b"v1")
    back = olga.post("/v1/models/m/rollback", json={})
    assert back.status_code == 200 and back.json()["version"] == 1


def test_an_artifact_is_found_again_after_the_data_dir_moves(
    svc: Service, team: dict[str, TestClient], tmp_path: Path
) -> None:
    """The version stores the job, the attempt and the path inside its output directory; promotion and rollback
    find it through the executor's output_dir of the day (root's default data_dir moved to /var/lib/corral)."""
    assert isinstance(svc.executor, ScriptedExecutor) and svc.executor.outputs is not None
    v1, v2 = two_in_production(svc, team)
    assert v1["lineage"]["job"] != v2["lineage"]["job"]
    shown = team["olga"].get("/v1/models/m").json()["versions"]
    assert [v["artifact_uri"] for v in shown] == [f"corral-output://{v['lineage']['job']}/1/w.pt" for v in (v1, v2)]
    moved = tmp_path / "moved-data-dir"
    svc.executor.outputs.rename(moved)
    svc.executor.outputs = moved
    attack_kit.attempt("6 rollback digest")
    back = team["olga"].post("/v1/models/m/rollback", json={})
    assert back.status_code == 200 and back.json()["version"] == 1, back.text
    manifest = team["olga"].get("/v1/models/m/deploy").text
    assert str(moved / str(v1["lineage"]["job"]) / "1" / "output" / "w.pt") in manifest


def test_a_version_stored_with_an_absolute_path_is_still_checked(svc: Service, team: dict[str, TestClient]) -> None:
    """Versions registered before the portable URI keep their absolute artifact path, and it is hashed as before."""
    v1, _ = two_in_production(svc, team)
    old = str(output_dir(svc, v1["lineage"]["job"]) / "w.pt")
    with svc.core.db.begin() as conn:
        conn.execute(sa.update(model_versions).where(model_versions.c.version == 1).values(artifact_uri=old))
    back = team["olga"].post("/v1/models/m/rollback", json={})
    assert back.status_code == 200 and back.json()["version"] == 1, back.text


def verify(svc: Service, head: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"verify": True} if head is None else {"verify": True, "head": head}
    r = svc.admin.get("/v1/models/audit", params=params)
    assert r.status_code == 200, r.text
    checked: dict[str, Any] = r.json()["verified"]
    return checked


def test_verify_with_a_kept_head_catches_truncation(svc: Service, team: dict[str, TestClient]) -> None:
    two_in_production(svc, team)
    head = svc.admin.get("/v1/models/audit").json()["head"]["hash"]
    register(svc, team["alice"], "m")  # rows appended after the kept head are fine
    kept = svc.admin.get("/v1/models/audit").json()["head"]
    assert verify(svc, head)["intact"] is True
    with svc.core.db.begin() as conn:
        conn.execute(sa.delete(model_audit).where(model_audit.c.seq == kept["seq"]))  # v3's registration
        # the version and the alias move that row recorded are undone as well, so only the head can tell
        conn.execute(sa.delete(model_versions).where(model_versions.c.version == 3))
        conn.execute(sa.delete(model_aliases).where(model_aliases.c.stage == "candidate"))
        conn.execute(model_aliases.insert().values(model="m", stage="candidate", version=2, previous=1, updated_at=0.0))
    attack_kit.attempt("6 audit truncation")
    assert verify(svc)["intact"] is True  # a shorter chain is still a consistent one...
    broken = verify(svc, kept["hash"])  # ...but not one holding the head kept earlier
    assert broken["intact"] is False and "newest rows were removed" in broken["problems"][0]


def test_verify_with_a_kept_head_catches_a_rewritten_chain(svc: Service, team: dict[str, TestClient]) -> None:
    two_in_production(svc, team)
    kept = svc.admin.get("/v1/models/audit").json()["head"]["hash"]
    with svc.core.db.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(model_audit).order_by(model_audit.c.seq)).mappings()]
        conn.execute(sa.delete(model_audit))
        last = None
        for row in rows:  # every hash recomputed after changing who approved
            actor = "mallory" if row["action"] == "promotion.approve" else row["actor"]
            last = chain.next_entry(
                last, at=row["at"], actor=actor, action=row["action"], model=row["model"], detail=row["detail"]
            )
            conn.execute(model_audit.insert().values(**last))
    attack_kit.attempt("6 audit truncation")
    assert verify(svc)["intact"] is True
    assert "rewritten" in verify(svc, kept)["problems"][0]


def test_a_direct_change_to_the_aliases_is_reported(svc: Service, team: dict[str, TestClient]) -> None:
    two_in_production(svc, team)
    with svc.core.db.begin() as conn:
        conn.execute(sa.update(model_aliases).where(model_aliases.c.stage == "production").values(version=1))
    attack_kit.attempt("6 audit truncation")
    checked = verify(svc)
    assert checked["intact"] is False
    assert any("alias m/production is v1" in p and "changed outside the registry" in p for p in checked["problems"])
    team_view = team["olga"].get("/v1/models/audit", params={"model": "m", "verify": True}).json()["verified"]
    assert team_view["intact"] is False  # the team is told; the details are for admins


def test_a_direct_change_to_a_versions_metrics_or_digest_is_reported(svc: Service, team: dict[str, TestClient]) -> None:
    register(svc, team["alice"], "m", accuracy=0.053)
    assert verify(svc)["intact"] is True
    with svc.core.db.begin() as conn:
        conn.execute(sa.update(model_versions).values(metrics={"accuracy": 0.999}, digest="0" * 64))
    attack_kit.attempt("6 audit truncation")
    problems = verify(svc)["problems"]
    assert any("m v1: digest, metrics differ from its registration entry" in p for p in problems), problems


def test_the_head_is_published_in_logs_and_metrics(
    svc: Service, team: dict[str, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="corral.models"):
        register(svc, team["alice"], "m")
    head = svc.admin.get("/v1/models/audit").json()["head"]
    assert f"model audit chain head: seq {head['seq']} hash {head['hash']}" in caplog.text
    scraped = svc.admin.get("/metrics").text
    assert f'corral_model_audit_head{{hash="{head["hash"]}"}} {float(head["seq"])}' in scraped


# ----- 7: MLflow export -----


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: a connection there is refused


def test_mlflow_export_only_to_the_allow_list(svc: Service, team: dict[str, TestClient], tmp_path: Path) -> None:
    olga = team["olga"]
    target = tmp_path / "x.db"
    attack_kit.attempt("7 mlflow uri")
    r = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": f"sqlite:///{target}"})
    assert r.status_code == 403 and "export is off" in r.json()["error"]["message"]
    svc.core.settings.mlflow_tracking_uris = ["http://mlflow.internal:5000"]
    for uri in (f"sqlite:///{target}", "sqlite:///tmp/x", f"file://{tmp_path}/runs", "http://169.254.169.254/"):
        attack_kit.attempt("7 mlflow uri")
        r = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": uri})
        assert r.status_code == 403 and "mlflow_tracking_uris" in r.json()["error"]["message"]
    assert not target.exists() and not Path("/tmp/x").exists()


@pytest.mark.skipif(not mlflow_export.available(), reason="mlflow-skinny is not installed")
def test_an_unreachable_tracking_server_answers_in_seconds(svc: Service, team: dict[str, TestClient]) -> None:
    olga = team["olga"]
    register(svc, team["alice"], "m")
    refusing = f"http://127.0.0.1:{closed_port()}"
    silent = socket.socket()  # listens, never answers: the connection is made, the reply never comes
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    hanging = f"http://127.0.0.1:{silent.getsockname()[1]}"
    svc.core.settings.mlflow_tracking_uris = [refusing, hanging]
    svc.core.settings.mlflow_timeout_s = 0.5
    try:
        for uri, words in ((refusing, "failed"), (hanging, "did not finish within 0.5 s")):
            attack_kit.attempt("7 mlflow uri")
            started = time.monotonic()
            r = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": uri})
            assert time.monotonic() - started < 5
            assert r.status_code == 503 and words in r.json()["error"]["message"], r.text
    finally:
        silent.close()


def test_metrics_json_is_what_log_metrics_writes(tmp_path: Path) -> None:
    log_metrics({"accuracy": 0.93, "steps": 100}, output_dir=tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 0.93, "steps": 100.0}
    for bad in ({"accuracy": float("nan")}, {"accuracy": True}, {"": 1.0}):
        with pytest.raises(ValueError):
            log_metrics(bad, output_dir=tmp_path)


@pytest.mark.skipif(not mlflow_export.available(), reason="mlflow-skinny is not installed")
def test_exports_are_bounded_and_the_environment_is_set_once(
    svc: Service, team: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exports that outlive their request still hold a slot until they end: past MAX_EXPORTS the answer is 503 at
    once, not one more thread. A request never writes MLflow's settings into the process environment."""
    olga = team["olga"]
    register(svc, team["alice"], "m")
    svc.core.settings.mlflow_tracking_uris = ["http://127.0.0.1:1"]
    svc.core.settings.mlflow_timeout_s = 0.05
    release = threading.Event()

    def stuck(*_: Any) -> dict[str, int]:
        release.wait(10)
        return {}

    monkeypatch.setattr(mlflow_export, "_export", stuck)
    monkeypatch.setattr(mlflow_export, "_slots", threading.BoundedSemaphore(1))
    monkeypatch.setenv(mlflow_export.TIMEOUT_ENV, "7")
    try:
        attack_kit.attempt("7 mlflow uri", 2)
        first = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": "http://127.0.0.1:1"})
        assert first.status_code == 503 and "did not finish" in first.text, first.text
        second = olga.post("/v1/models/m/export/mlflow", json={"tracking_uri": "http://127.0.0.1:1"})
        assert second.status_code == 503 and "running already" in second.text, second.text
        assert os.environ[mlflow_export.TIMEOUT_ENV] == "7"  # set at the service's start, not per request
    finally:
        release.set()
