"""The golden path's pure domain: promotion policy and gates, audit chain, manifests, digests and hooks."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.registry import audit, manifests
from scheduler.registry.artifacts import sha256_of
from scheduler.registry.hooks import run_hook
from scheduler.registry.policy import (
    GateResult,
    Hook,
    MetricGate,
    PolicyError,
    PromotionPolicy,
    StagePolicy,
    VersionFacts,
    evaluate,
    load_policy,
    promotable,
)

D = "a" * 64


def facts(version: int = 2, eval_set: str | None = "imagenet-val", **metrics: float) -> VersionFacts:
    return VersionFacts("resnet", version, metrics or {"accuracy": 0.92}, eval_set, D, "/models/resnet")


def gates(
    stage: StagePolicy,
    candidate: VersionFacts | None = None,
    production: VersionFacts | None = None,
    approvers: tuple[str, ...] = (),
    requester: str = "alice",
    digest_now: str | None = D,
    hook: tuple[bool, str] | None = None,
) -> dict[str, GateResult]:
    out = evaluate(stage, candidate or facts(), production, approvers, requester, digest_now, hook)
    return {r.gate.split()[0] if not r.gate.startswith("metric") else r.gate: r for r in out}


# --- policy documents ---------------------------------------------------------------------------------------

POLICY = """
stages:
  staging:
    metrics: [{metric: accuracy, min: 0.8}]
  production:
    metrics:
      - {metric: accuracy, min: 0.9, vs_production: true}
      - {metric: latency_ms, max: 50, higher_is_better: false}
    approvals: 2
    hook: {http: "https://policy.example/check", timeout_s: 5}
"""


def test_policy_loads_and_defaults() -> None:
    policy = load_policy(yaml.safe_load(POLICY))
    prod = policy.for_stage("production")
    assert prod.approvals == 2 and prod.verify_digest and prod.hook and prod.hook.timeout_s == 5
    assert [g.metric for g in prod.metrics] == ["accuracy", "latency_ms"]
    empty = load_policy({})
    assert empty.for_stage("production") == StagePolicy(approvals=1)
    assert empty.for_stage("staging") == StagePolicy()
    with pytest.raises(ValueError, match="staging or production"):
        empty.for_stage("candidate")


def test_policy_errors_list_every_problem_with_where() -> None:
    doc = {
        "stages": {
            "prod": {},
            "production": {
                "metrics": [{"metric": "accuracy"}, {"metric": "loss", "min": 2, "max": 1}],
                "approvals": -1,
                "aprovals": 1,
                "hook": {"python": "mod:f", "http": "http://x"},
            },
        }
    }
    with pytest.raises(PolicyError) as info:
        load_policy(doc)
    where = dict(info.value.problems)
    assert "unknown stage 'prod'" in where["stages.prod"]
    assert "at least one of min, max or vs_production" in where["stages.production.metrics[0]"]
    assert "min (2.0) is above max (1.0)" in where["stages.production.metrics[1]"]
    assert "greater than or equal to 0" in where["stages.production.approvals"]
    assert where["stages.production.aprovals"] == "unknown field"
    assert "exactly one of python" in where["stages.production.hook"]
    assert isinstance(info.value, ValueError) and "stages.production.approvals" in str(info.value)


def test_hook_targets_are_checked() -> None:
    with pytest.raises(ValueError, match="package.module:function"):
        Hook(python="not a target")
    with pytest.raises(ValueError, match="http:// or https://"):
        Hook(http="ftp://x")
    with pytest.raises(PolicyError, match="top level: expected a mapping"):
        load_policy([])  # type: ignore[arg-type]


# --- gates, each failing on its own -------------------------------------------------------------------------


def test_everything_passes() -> None:
    stage = load_policy(yaml.safe_load(POLICY)).for_stage("production")
    prod = facts(1, accuracy=0.91, latency_ms=40)
    out = evaluate(stage, facts(accuracy=0.93, latency_ms=30), prod, ["bob", "carol"], "alice", D, (True, "ok"))
    assert [r.status for r in out] == ["pass"] * 5 and promotable(out)
    assert [r.gate for r in out] == [
        "metric accuracy >= 0.9, no worse than production",
        "metric latency_ms <= 50",
        "approvals 2/2",
        "digest",
        "hook",
    ]
    assert out[0].evidence == "v2 accuracy = 0.93; floor 0.9; production v1 = 0.91; both on eval set imagenet-val"


def test_metric_floor_and_ceiling() -> None:
    r = gates(StagePolicy(metrics=[MetricGate(metric="accuracy", min=0.95)]))["metric accuracy >= 0.95"]
    assert r.status == "fail" and "0.92 is below the floor 0.95" in r.evidence
    r = gates(StagePolicy(metrics=[MetricGate(metric="accuracy", max=0.9)]))["metric accuracy <= 0.9"]
    assert r.status == "fail" and "above the ceiling 0.9" in r.evidence


def test_missing_metric_is_not_measured() -> None:
    r = gates(StagePolicy(metrics=[MetricGate(metric="f1", min=0.5)]))["metric f1 >= 0.5"]
    assert r.status == "fail" and r.evidence.startswith("not measured")
    nan = gates(StagePolicy(metrics=[MetricGate(metric="f1", max=1)]), facts(f1=float("nan")))["metric f1 <= 1"]
    assert nan.status == "fail" and "not measured" in nan.evidence


def test_vs_production() -> None:
    stage = StagePolicy(metrics=[MetricGate(metric="accuracy", vs_production=True)], verify_digest=False)
    [first] = gates(stage).values()
    assert first.status == "pass" and "no production version yet" in first.evidence
    [worse] = gates(stage, production=facts(1, accuracy=0.95)).values()
    assert worse.status == "fail" and "0.92 is lower (worse) than production's 0.95" in worse.evidence
    [other] = gates(stage, production=facts(1, eval_set="imagenet-v2", accuracy=0.5)).values()
    assert other.status == "fail" and "candidate on imagenet-val, production on imagenet-v2" in other.evidence
    [unknown] = gates(stage, facts(eval_set=None), production=facts(1, eval_set=None, accuracy=0.5)).values()
    assert unknown.status == "fail" and "an unrecorded set" in unknown.evidence
    [unmeasured] = gates(stage, production=facts(1, loss=0.1)).values()
    assert unmeasured.status == "fail" and "production v1 has no accuracy" in unmeasured.evidence
    lower = StagePolicy(
        metrics=[MetricGate(metric="loss", vs_production=True, higher_is_better=False)], verify_digest=False
    )
    assert [r.status for r in gates(lower, facts(loss=0.2), facts(1, loss=0.3)).values()] == ["pass"]
    [up] = gates(lower, facts(loss=0.4), facts(1, loss=0.3)).values()
    assert up.status == "fail" and "higher (worse)" in up.evidence


def test_requester_approval_does_not_count() -> None:
    r = gates(StagePolicy(approvals=1), approvers=("alice",))["approvals"]
    assert r.status == "pending" and r.gate == "approvals 0/1"
    assert "alice requested the promotion, so their approval does not count" in r.evidence
    assert not promotable([r])


def test_n_distinct_approvals() -> None:
    stage = StagePolicy(approvals=2)
    r = gates(stage, approvers=("bob", "bob", "alice"))["approvals"]
    assert r.status == "pending" and r.gate == "approvals 1/2" and "approved by bob;" in r.evidence
    assert "needs 1 more" in r.evidence
    r = gates(stage, approvers=("bob", "carol", "dave"))["approvals"]
    assert r.status == "pass" and r.gate == "approvals 2/2" and "bob, carol, dave" in r.evidence


def test_digest() -> None:
    changed = gates(StagePolicy(), digest_now="b" * 64)["digest"]
    assert changed.status == "fail" and f"registered sha256 {D}, now {'b' * 64}" in changed.evidence
    missing = gates(StagePolicy(), digest_now=None)["digest"]
    assert missing.status == "fail" and "artifact missing: /models/resnet" in missing.evidence
    assert "digest" not in gates(StagePolicy(verify_digest=False), digest_now=None)


def test_hook_gate() -> None:
    stage = StagePolicy(hook=Hook(python="tests.test_models_domain:allow_hook"))
    assert gates(stage)["hook"].status == "pending"
    rejected = gates(stage, hook=(False, "change freeze until Monday"))["hook"]
    assert rejected.status == "fail" and "change freeze until Monday" in rejected.evidence
    assert gates(stage, hook=(True, "fine"))["hook"].status == "pass"
    assert promotable([]) and PromotionPolicy().stages == {}


# --- audit chain --------------------------------------------------------------------------------------------


def chain(n: int = 4) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
    for i in range(n):
        last = rows[-1] if rows else None
        rows.append(
            audit.next_entry(
                last,
                at=t0 + timedelta(minutes=i),
                actor="alice",
                action=f"act{i}",
                model="resnet",
                detail={"version": i, "note": "é"},
            )
        )
    return rows


def test_audit_intact_and_hash_definition() -> None:
    rows = chain()
    assert audit.verify(rows) == [] and audit.verify(rows, head=rows[-1]["hash"]) == []
    assert rows[0]["prev_hash"] == audit.GENESIS and rows[1]["prev_hash"] == rows[0]["hash"]
    body = json.dumps(
        {k: rows[0][k] if k != "at" else "2024-05-01T12:00:00+00:00" for k in audit.FIELDS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    assert rows[0]["hash"] == hashlib.sha256((audit.GENESIS + "\n" + body).encode()).hexdigest()


def test_audit_hash_survives_database_datetimes() -> None:
    rows = chain(2)
    naive = {**rows[1], "at": rows[1]["at"].replace(tzinfo=None)}  # SQLite
    other_zone = {**rows[1], "at": rows[1]["at"].astimezone(timezone(timedelta(hours=2)))}  # PostgreSQL
    assert audit.verify([rows[0], naive]) == [] and audit.verify([rows[0], other_zone]) == []


def test_audit_detects_a_changed_row() -> None:
    rows = chain()
    rows[2]["detail"] = {"version": 99, "note": "é"}
    assert audit.verify(rows) == ["seq 3: hash does not match the row's contents: the row was changed"]


def test_audit_detects_a_removed_row() -> None:
    rows = chain()
    del rows[1]
    problems = audit.verify(rows)
    assert any("seq 3 follows seq 1: a gap" in p for p in problems)
    assert any(p.startswith("seq 3: prev_hash does not link") for p in problems)
    assert any("does not link" in p for p in audit.verify(chain()[1:]))  # the first row removed


def test_audit_detects_reordered_rows_and_truncation() -> None:
    rows = chain()
    rows[1], rows[2] = rows[2], rows[1]
    problems = audit.verify(rows)
    assert any("out of order" in p for p in problems) and sum("does not link" in p for p in problems) >= 2
    full = chain()
    assert "newest rows were removed" in audit.verify(full[:-1], head=full[-1]["hash"])[0]
    assert "missing hash" in audit.verify([{k: v for k, v in full[0].items() if k != "hash"}])[0]


# --- manifests ----------------------------------------------------------------------------------------------


def test_dns_names() -> None:
    assert manifests.dns_name("resnet-50") == "resnet-50"
    odd = manifests.dns_name("My_Model v2!")
    assert odd.startswith("my-model-v2-") and len(odd) == len("my-model-v2-") + 8
    assert manifests.dns_name("3d-unet").startswith("m-3d-unet-")
    long_a, long_b = manifests.dns_name("x" * 80 + "a"), manifests.dns_name("x" * 80 + "b")
    assert len(long_a) == 63 and long_a != long_b
    with pytest.raises(ValueError, match="no letters or digits"):
        manifests.dns_name("__")


def test_inference_service() -> None:
    isvc = manifests.inference_service(
        "Team/ResNet", 3, "s3://models/resnet/3", D, namespace="ml", gpus=2, runtime="kserve-torchserve"
    )
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    meta = isvc["metadata"]
    assert meta["name"].startswith("team-resnet-") and meta["namespace"] == "ml"
    assert meta["labels"]["corral.dev/model"] == "Team-ResNet" and meta["labels"]["corral.dev/version"] == "3"
    assert meta["annotations"] == {
        "corral.dev/model": "Team/ResNet",
        "corral.dev/version": "3",
        "corral.dev/digest": f"sha256:{D}",
    }
    model = isvc["spec"]["predictor"]["model"]
    assert model == {
        "modelFormat": {"name": "pytorch"},
        "storageUri": "s3://models/resnet/3",
        "runtime": "kserve-torchserve",
        "resources": {"limits": {"nvidia.com/gpu": 2}},
    }
    assert "resources" not in manifests.inference_service("cpu", 1, "s3://m", D, gpus=0)["spec"]["predictor"]["model"]
    with pytest.raises(ValueError, match="gpus"):
        manifests.inference_service("m", 1, "s3://m", D, gpus=-1)


def test_deployment_and_yaml() -> None:
    dep = manifests.deployment("resnet", 4, "ghcr.io/acme/serve:1.2", "s3://m/4", D, gpus=1, port=9000)
    assert (dep["apiVersion"], dep["kind"], dep["metadata"]["name"]) == ("apps/v1", "Deployment", "resnet")
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert "corral.dev/version" not in dep["spec"]["selector"]["matchLabels"]  # selectors are immutable
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in c["env"]} == {"MODEL_URI": "s3://m/4", "MODEL_DIGEST": f"sha256:{D}"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["ports"][0]["containerPort"] == 9000
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    text = manifests.to_yaml(manifests.inference_service("resnet", 4, "s3://m/4", D), dep)
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["InferenceService", "Deployment"] and docs[1] == dep
    assert text.startswith("---\napiVersion:") and text == manifests.to_yaml(*docs)


# --- artifacts ----------------------------------------------------------------------------------------------


def test_sha256_of_file_and_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_bytes(b"weights")
    assert sha256_of(str(f)) == hashlib.sha256(b"weights").hexdigest() == sha256_of(f.as_uri())
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"ab")
    (d / "sub" / "b.bin").write_bytes(b"c")
    before = sha256_of(str(d))
    (d / "a.bin").write_bytes(b"a")
    (d / "sub" / "b.bin").write_bytes(b"bc")  # the same bytes in total, moved between files
    assert sha256_of(str(d)) != before
    (d / "a.bin").write_bytes(b"ab")
    (d / "sub" / "b.bin").write_bytes(b"c")
    assert sha256_of(str(d)) == before
    (d / "sub" / "b.bin").rename(d / "sub" / "c.bin")
    assert sha256_of(str(d)) != before


def test_sha256_of_refuses(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        sha256_of(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="only local paths and file:// URIs"):
        sha256_of("s3://bucket/model")


# --- hooks --------------------------------------------------------------------------------------------------


def allow_hook(request: Mapping[str, Any]) -> None:
    assert request["model"] == "resnet"


def reason_hook(request: Mapping[str, Any]) -> str:
    return f"v{request['version']} is frozen"


def tuple_hook(request: Mapping[str, Any]) -> tuple[bool, str]:
    return True, "looks good"


def boom_hook(request: Mapping[str, Any]) -> bool:
    raise RuntimeError("database down")


REQ = {"model": "resnet", "version": 3}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("allow_hook", (True, "accepted by hook")),
        ("reason_hook", (False, "v3 is frozen")),
        ("tuple_hook", (True, "looks good")),
        ("boom_hook", (False, "hook failed: RuntimeError: database down")),
    ],
)
def test_python_hooks(name: str, expected: tuple[bool, str]) -> None:
    assert run_hook(Hook(python=f"tests.test_models_domain:{name}"), REQ) == expected


def test_python_hook_that_cannot_be_imported() -> None:
    allowed, reason = run_hook(Hook(python="tests.no_such_module:f"), REQ)
    assert not allowed and reason.startswith("hook failed: ModuleNotFoundError")


class _Policy(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, reply = {
            "/allow": (200, json.dumps({"allow": True, "reason": f"v{body['version']} ok"})),
            "/deny": (200, json.dumps({"allow": False, "reason": "no GPUs in prod this week"})),
            "/error": (503, "down"),
            "/garbage": (200, "<html>"),
            "/noallow": (200, "{}"),
        }[self.path]
        self.send_response(status)
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def policy_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Policy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_http_hooks(policy_server: str) -> None:
    def call(path: str) -> tuple[bool, str]:
        return run_hook(Hook(http=policy_server + path, timeout_s=5), REQ)

    assert call("/allow") == (True, "v3 ok")
    assert call("/deny") == (False, "no GPUs in prod this week")
    assert call("/error") == (False, f"hook failed: {policy_server}/error answered HTTP 503")
    assert "HTTP 200 with a body that is not JSON" in call("/garbage")[1] and not call("/garbage")[0]
    assert "without a boolean 'allow'" in call("/noallow")[1]
    allowed, reason = run_hook(Hook(http="http://127.0.0.1:9/unreachable", timeout_s=2), REQ)
    assert not allowed and reason.startswith("hook failed:")
