"""Admission policies: each rule rejecting and mutating on its own, scoping, the hook (reject with its reason,
mutate, fail closed), and in the service: apply, versions, rollback, rejections naming rule and value, audit
entries, sandboxes capped, and `corral policy`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler.admission import hook as admission_hook
from scheduler.admission.rules import AdmissionError, AdmissionHook, HookAnswer, evaluate, parse
from scheduler.cli import client as cli_client
from scheduler.cli.main import app
from scheduler.service.api.auth import Role
from scheduler.service.core.specs import JobSubmit
from tests.service_kit import Service

NLP = ["nlp", "research"]  # a queue's path: itself, then up to the top


def sub(**kw: Any) -> JobSubmit:
    return JobSubmit.model_validate({"queue": "nlp", "command": ["python", "train.py"], **kw})


def rule(**kw: Any) -> dict[str, Any]:
    return {"name": "r", **kw}


def decide(rules: list[dict[str, Any]], job: JobSubmit, path: list[str] = NLP, **policy: Any) -> Any:
    return evaluate(parse({"rules": rules, **policy}), job, path)


# ----- each rule on its own -----


def test_allowed_images_rejects_other_registries_and_lookalike_prefixes() -> None:
    rules = [rule(allowed_images=["registry.example.com/ml"])]
    assert decide(rules, sub(image="registry.example.com/ml/train:1")).allowed
    assert decide(rules, sub(image="registry.example.com/ml:2")).allowed
    for image in ("docker.io/evil/x", "registry.example.com/ml-evil/x", None):
        d = decide(rules, sub(image=image))
        assert not d.allowed
        assert (d.rejected.rule, d.rejected.field, d.rejected.value) == ("r", "image", image)
        assert "registry.example.com/ml" in d.rejected.message


def test_max_gpus_per_job_counts_the_whole_gang() -> None:
    rules = [rule(max_gpus_per_job=8)]
    assert decide(rules, sub(gpus=4, workers=2)).allowed
    d = decide(rules, sub(gpus=4, workers=3))
    assert (d.rejected.rule, d.rejected.field, d.rejected.value) == ("r", "gpus", 12)
    assert "at most 8 per job" in d.rejected.message
    assert decide(rules, sub(gpus=12, kind="sandbox")).allowed  # the job cap is not the sandbox cap


def test_max_gpus_per_sandbox_applies_to_sandboxes_only() -> None:
    rules = [rule(max_gpus_per_sandbox=1)]
    assert decide(rules, sub(gpus=4)).allowed
    d = decide(rules, sub(gpus=2, kind="sandbox"))
    assert (d.rejected.field, d.rejected.value) == ("gpus", 2)
    assert "at most 1 per sandbox" in d.rejected.message


def test_runtime_cap_rejects_longer_and_fills_in_when_unset() -> None:
    rules = [rule(max_runtime_cap_s=3600)]
    d = decide(rules, sub(max_runtime=7200))
    assert (d.rejected.field, d.rejected.value) == ("max_runtime", 7200)
    d = decide(rules, sub())
    assert d.allowed and d.job.max_runtime == 3600
    assert d.applied == [("r", "max_runtime: set to the cap 3600s")]
    assert decide(rules, sub(max_runtime=60)).job.max_runtime == 60


def test_required_labels_reject_missing_or_empty() -> None:
    rules = [rule(required_labels=["cost-centre"])]
    assert decide(rules, sub(labels={"cost-centre": "cc-42"})).allowed
    for labels in ({}, {"cost-centre": " "}):
        d = decide(rules, sub(labels=labels))
        assert (d.rejected.rule, d.rejected.field) == ("r", "labels.cost-centre")
        assert "label 'cost-centre' is required" in d.rejected.message


def test_defaults_fill_only_what_was_not_given() -> None:
    rules = [
        rule(
            defaults={
                "image": "registry.example.com/ml/base:1",
                "priority": 5,
                "labels": {"cost-centre": "shared", "team": "nlp"},
            }
        )
    ]
    d = decide(rules, sub(labels={"team": "mine"}))
    assert d.allowed
    assert d.job.image == "registry.example.com/ml/base:1" and d.job.priority == 5
    assert d.job.labels == {"team": "mine", "cost-centre": "shared"}  # given keys are kept
    assert ("r", "image: set to 'registry.example.com/ml/base:1'") in d.applied
    kept = decide(
        rules, sub(image="registry.example.com/ml/mine:2", priority=0, labels={"cost-centre": "x", "team": "y"})
    )
    assert kept.applied == [] and kept.job.priority == 0  # an explicit 0 is given, not unset


def test_defaults_are_filled_before_the_checks() -> None:
    rules = [
        rule(name="labels", required_labels=["cost-centre"]),
        rule(name="fill", defaults={"labels": {"cost-centre": "shared"}}),
    ]
    d = decide(rules, sub())
    assert d.allowed and d.job.labels["cost-centre"] == "shared"


def test_invalid_documents_list_every_problem() -> None:
    with pytest.raises(AdmissionError) as e:
        parse(
            {
                "rules": [
                    rule(defaults={"queue": "other"}),
                    rule(name="x", defaults={"gpus": "two"}),
                    rule(name="y", max_gpus_per_job=-1, colour="red"),
                ]
            }
        )
    wheres = [w for w, _ in e.value.problems]
    assert wheres[0] == "rules.0" and "queue" in e.value.problems[0][1]
    assert "rules.1" in wheres and "rules.2.max_gpus_per_job" in wheres and "rules.2.colour" in wheres
    with pytest.raises(AdmissionError, match="repeated: r"):
        parse({"rules": [rule(), rule()]})
    with pytest.raises(AdmissionError, match="exactly one"):
        parse({"hook": {}})


# ----- scoping -----


def test_a_queue_rule_applies_to_the_queue_and_its_subtree_only() -> None:
    rules = [rule(name="research-cap", scope={"queues": ["research"]}, max_gpus_per_job=2)]
    assert not decide(rules, sub(gpus=4), ["nlp", "research"]).allowed
    assert not decide(rules, sub(gpus=4, queue="research"), ["research"]).allowed
    assert decide(rules, sub(gpus=4, queue="ranking"), ["ranking", "product"]).allowed


# ----- the hook -----


def reject_big(request: dict[str, Any]) -> Any:
    job = request["job"]
    if job["gpus"] > 2:
        return f"{job['gpus']} GPUs need a reservation ticket"
    return {"allow": True, "patch": {"env": {**job["env"], "HOOKED": "1"}}}


def raise_gpus(request: dict[str, Any]) -> Any:
    return {"allow": True, "patch": {"gpus": 16}}


def change_queue(request: dict[str, Any]) -> Any:
    return {"allow": True, "patch": {"queue": "ranking"}}


def broken(request: dict[str, Any]) -> Any:
    raise RuntimeError("database down")


def with_hook(target: str, rules: list[dict[str, Any]] | None = None, **hook: Any) -> Callable[[JobSubmit], Any]:
    policy = parse({"rules": rules or [], "hook": {"python": f"tests.test_admission:{target}", **hook}})
    assert policy.hook is not None
    the_hook = policy.hook

    def run(job: JobSubmit) -> Any:
        return evaluate(policy, job, NLP, lambda req: admission_hook.run(the_hook, req), "ann")

    return run


def test_hook_rejects_with_its_reason_and_mutates() -> None:
    run = with_hook("reject_big")
    d = run(sub(gpus=4))
    assert not d.allowed and d.rejected.rule == "hook"
    assert d.rejected.message == "4 GPUs need a reservation ticket"
    d = run(sub(gpus=1))
    assert d.allowed and d.job.env == {"HOOKED": "1"}
    assert d.applied == [("hook", "env: {} -> {'HOOKED': '1'}")]


def test_hook_changes_are_checked_against_the_rules_and_fixed_fields() -> None:
    d = with_hook("raise_gpus", [rule(max_gpus_per_job=8)])(sub())
    assert not d.allowed and (d.rejected.rule, d.rejected.value) == ("r", 16)
    d = with_hook("change_queue")(sub())
    assert not d.allowed and d.rejected.field == "queue" and "may not change queue" in d.rejected.message


def test_a_failing_hook_refuses_unless_fail_open() -> None:
    d = with_hook("broken")(sub())
    assert not d.allowed and d.rejected.message == "hook failed: RuntimeError: database down"
    assert with_hook("broken", fail_open=True)(sub()).allowed


def test_http_hook_answers_allow_reason_and_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = AdmissionHook(http="http://hook.example/admit")
    seen: list[dict[str, Any]] = []

    class Answer:
        is_success, status_code = True, 200

        def __init__(self, body: Any) -> None:
            self.body = body

        def json(self) -> Any:
            return self.body

    def post(url: str, json: dict[str, Any], timeout: float) -> Answer:
        seen.append(json)
        return Answer({"allow": False, "reason": "no GPUs on Fridays"})

    monkeypatch.setattr(admission_hook.httpx, "post", post)
    assert admission_hook.run(hook, {"job": {}}) == HookAnswer(False, "no GPUs on Fridays")
    monkeypatch.setattr(admission_hook.httpx, "post", lambda url, json, timeout: Answer({"allowed": True}))
    assert not admission_hook.run(hook, {}).allowed  # a misspelt answer fails closed


# ----- in the service -----

POLICY: dict[str, Any] = {
    "rules": [
        {"name": "cost-centre", "required_labels": ["cost-centre"]},
        {
            "name": "research-gpus",
            "scope": {"queues": ["research"]},
            "max_gpus_per_job": 2,
            "max_gpus_per_sandbox": 1,
            "defaults": {"max_runtime": 600},
        },
    ]
}


def job(queue: str = "nlp", gpus: int = 1, **kw: Any) -> dict[str, Any]:
    return {
        "name": "train",
        "queue": queue,
        "gpus": gpus,
        "command": ["python", "train.py"],
        "labels": {"cost-centre": "cc-1"},
        **kw,
    }


def audit(svc: Service, action: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = svc.admin.get("/v1/audit").json()["entries"]
    return [e for e in entries if e["action"] == action]


def test_apply_versions_and_rollback(svc: Service) -> None:
    assert svc.admin.get("/v1/admission").json() == {"version": 0, "document": {}}
    dry = svc.admin.post("/v1/admission/apply", json={"document": POLICY, "dry_run": True}).json()
    assert not dry["applied"] and [d["rule"] for d in dry["diff"]] == ["cost-centre", "research-gpus"]
    assert svc.admin.get("/v1/admission").json()["version"] == 0
    r = svc.admin.post("/v1/admission/apply", json={"document": POLICY, "comment": "v1"})
    assert r.json()["applied"] and r.json()["version"] == 1
    assert svc.admin.post("/v1/jobs", json=job(labels={})).status_code == 422
    svc.admin.post("/v1/admission/apply", json={"document": {"rules": []}, "comment": "open up"})
    assert svc.admin.post("/v1/jobs", json=job(labels={})).status_code == 201
    back = svc.admin.post("/v1/admission/rollback", json={"version": 1}).json()
    assert back["applied"] and back["version"] == 3
    assert svc.admin.post("/v1/jobs", json=job(labels={})).status_code == 422
    versions = svc.admin.get("/v1/admission/history").json()["versions"]
    assert [(v["version"], v["comment"]) for v in versions] == [(1, "v1"), (2, "open up"), (3, "rollback to version 1")]
    assert [e["target"] for e in audit(svc, "admission.apply")] == [f"admission policy version {n}" for n in (3, 2, 1)]
    assert svc.admin.post("/v1/admission/rollback", json={"version": 9}).status_code == 404


def test_only_platform_admins_apply(svc: Service) -> None:
    for role, scope in ((Role.TEAM_ADMIN, "research"), (Role.MEMBER, None)):
        c = svc.client("tess", role, scope)
        r = c.post("/v1/admission/apply", json={"document": {"rules": []}})
        assert r.status_code == 403 and "platform admins only" in r.json()["error"]["message"]
        assert c.get("/v1/admission").status_code == 200  # everyone may read the rules


def test_invalid_policy_names_where_and_unknown_queues(svc: Service) -> None:
    r = svc.admin.post(
        "/v1/admission/apply",
        json={"document": {"rules": [{"name": "x", "scope": {"queues": ["reserch"]}, "max_gpus_per_job": 1}]}},
    )
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["where"] == "rules.0.scope.queues" and "'reserch' does not exist" in err["message"]


def test_rejected_submission_names_rule_and_value_and_is_audited(svc: Service) -> None:
    svc.admin.post("/v1/admission/apply", json={"document": POLICY})
    r = svc.admin.post("/v1/jobs", json=job(gpus=3))
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["where"] == "gpus" and "rule 'research-gpus'" in err["message"]
    assert err["detail"] == {"rule": "research-gpus", "field": "gpus", "value": 3, "policy_version": 1}
    [entry] = audit(svc, "admission.reject")
    assert entry["actor"] == "root" and entry["target"] == "queue nlp"
    assert (entry["detail"]["rule"], entry["detail"]["value"]) == ("research-gpus", 3)
    assert svc.admin.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_mutated_submission_is_what_is_stored_and_is_audited(svc: Service) -> None:
    svc.admin.post("/v1/admission/apply", json={"document": POLICY})
    r = svc.admin.post("/v1/jobs", json=job())
    assert r.status_code == 201 and r.json()["spec"]["max_runtime"] == 600
    [entry] = audit(svc, "admission.mutate")
    assert entry["detail"]["applied"] == [{"rule": "research-gpus", "change": "max_runtime: set to 600"}]
    # Outside research the scoped default does not apply, and nothing is changed or audited.
    assert svc.admin.post("/v1/jobs", json=job("ranking", gpus=4)).json()["spec"]["max_runtime"] is None
    assert len(audit(svc, "admission.mutate")) == 1
    # A retry with the same idempotency key compares with the defaults filled in: the first job comes back.
    a = svc.admin.post("/v1/jobs", json=job(idempotency_key="k")).json()
    assert svc.admin.post("/v1/jobs", json=job(idempotency_key="k")).json()["id"] == a["id"]


def test_sandboxes_are_capped(svc: Service) -> None:
    svc.admin.post("/v1/admission/apply", json={"document": POLICY})
    box = {"name": "lab", "queue": "nlp", "command": ["jupyterhub-singleuser"]}
    # The global rule needs a cost centre; the sandbox spawner sets none, so a default is how to give one.
    r = svc.admin.post("/v1/sandboxes", json={**box, "gpus": 1})
    assert r.status_code == 422 and r.json()["error"]["detail"]["rule"] == "cost-centre"
    svc.admin.post(
        "/v1/admission/apply",
        json={
            "document": {
                "rules": [*POLICY["rules"], {"name": "fill", "defaults": {"labels": {"cost-centre": "sandboxes"}}}]
            }
        },
    )
    r = svc.admin.post("/v1/sandboxes", json={**box, "gpus": 2})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["detail"] == {"rule": "research-gpus", "field": "gpus", "value": 2, "policy_version": 2}
    assert audit(svc, "admission.reject")[0]["detail"]["kind"] == "sandbox"
    ok = svc.admin.post("/v1/sandboxes", json={**box, "gpus": 1})
    assert ok.status_code == 201, ok.text
    assert ok.json()["labels"]["cost-centre"] == "sandboxes"


def test_test_endpoint_decides_without_submitting(svc: Service) -> None:
    svc.admin.post("/v1/admission/apply", json={"document": POLICY})
    d = svc.admin.post("/v1/admission/test", json=job(gpus=3)).json()
    assert not d["allowed"] and d["rejected"]["rule"] == "research-gpus" and d["policy_version"] == 1
    d = svc.admin.post("/v1/admission/test", json=job()).json()
    assert d["allowed"] and d["job"]["max_runtime"] == 600
    assert svc.admin.get("/v1/jobs").json()["jobs"] == []
    assert audit(svc, "admission.reject") == []


def test_service_hook_rejects_with_its_reason(svc: Service) -> None:
    svc.admin.post("/v1/admission/apply", json={"document": {"hook": {"python": "tests.test_admission:reject_big"}}})
    r = svc.admin.post("/v1/jobs", json=job("ranking", gpus=4))
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "admission hook: 4 GPUs need a reservation ticket"
    assert audit(svc, "admission.reject")[0]["detail"]["rule"] == "hook"


# ----- corral policy -----


def test_cli_apply_history_rollback_and_test(svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CORRAL_URL", "CORRAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "cli-data"))

    def client(url: str, token: str | None) -> TestClient:
        c = TestClient(svc.admin.app)
        c.headers.update(svc.admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)
    runner = CliRunner()

    def corral(*args: str, code: int = 0) -> str:
        r = runner.invoke(app, list(args), env={"COLUMNS": "200"})
        assert r.exit_code == code, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r.stdout

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(job(gpus=3)))
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(job()))
    out = corral("policy", "apply", "-f", str(tmp_path / "policy.yaml"), "--dry-run")
    assert "+ cost-centre" in out and "+ research-gpus" in out
    assert "applied as version 1" in corral("policy", "apply", "-f", str(tmp_path / "policy.yaml"), "-y")
    assert "research-gpus" in corral("policy", "ls")
    out = corral("policy", "test", "-f", str(tmp_path / "big.yaml"), code=1)
    assert "rejected by rule 'research-gpus'" in out and "3 GPUs" in out
    out = corral("policy", "test", "-f", str(tmp_path / "small.yaml"))
    assert "~ research-gpus: max_runtime: set to 600" in out and "allowed (policy version 1)" in out
    assert json.loads(corral("policy", "test", "-f", str(tmp_path / "small.yaml"), "-o", "json"))["allowed"]
    (tmp_path / "open.yaml").write_text("rules: []\n")
    corral("policy", "apply", "-f", str(tmp_path / "open.yaml"), "-y")
    assert "now version 3" in corral("policy", "rollback", "1")
    assert "rollback to version 1" in corral("policy", "history")
