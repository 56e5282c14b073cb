"""Issue 21, items 2 and 9: hostile request bodies are refused at the edge, in the API's error shape, and change
nothing; what old versions stored anyway: tests/test_attack_repair.py.

Each hostile request is counted with attack_kit.attempt. Runs on SQLite and on PostgreSQL (when
CORRAL_TEST_POSTGRES_URL names a server), except where only SQLite could ever have stored the poison.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler.admission.rules import AdmissionPolicy, Rule
from scheduler.backends.base import Arrival
from scheduler.engine.model import JobSpec, NodeSpec
from scheduler.service.api.auth import Role
from scheduler.service.api.edge import MAX_AMOUNT, MAX_COMMAND_BYTES
from scheduler.service.api.redact import HIDDEN
from scheduler.service.core.settings import ServiceSettings
from tests import attack_kit
from tests.service_kit import Service, make_service
from tests.test_api_bad_input import error_of, snapshot
from tests.test_cluster_sync import arrival, cluster_jobs
from tests.test_cluster_sync import make as cluster_make

NON_FINITE = "2 non-finite numbers"
BOOL = "9 booleans as numbers"
SIZE = "9 request size"
NUL = "9 NUL bytes"
COMMAND = "9 command size"
WORKDIR = "9 bad workdir"
SANDBOX_KIND = "9 kind sandbox on /v1/jobs"
REDACT = "9 other teams' job ids"
MALFORMED = "9 malformed bodies"
QUADRATIC = "9 admission validation cost"

HOLE = "@@hole@@"  # where a raw JSON token (NaN, 1e309) goes into a body json.dumps cannot write
NOT_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e309", "-1e309")


@pytest.fixture
def api(svc: Service) -> TestClient:
    """The admin's client, answering a server error as a 500 instead of raising it in the test."""
    c = TestClient(svc.admin.app, raise_server_exceptions=False)
    c.headers.update(svc.admin.headers)
    return c


def with_hole(body: Any, path: str) -> Any:
    """`body` with the value at `path` (dotted; list indices as numbers) replaced by HOLE."""
    out = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    at = out
    for p in parents:
        at = at[int(p)] if isinstance(at, list) else at[p]
    if isinstance(at, list):
        at[int(last)] = HOLE
    else:
        at[last] = HOLE
    return out


def raw(body: Any, path: str, token: str) -> bytes:
    return json.dumps(with_hole(body, path)).replace(f'"{HOLE}"', token).encode()


def post_raw(api: TestClient, url: str, content: bytes) -> Any:
    return api.post(url, content=content, headers={"content-type": "application/json"})


def job(**kw: Any) -> dict[str, Any]:
    return {"name": "train", "queue": "nlp", "gpus": 1, "command": ["python", "train.py"], **kw}


POLICY = {"rules": [{"name": "cap", "max_runtime_cap_s": 3600, "max_gpus_per_job": 4}]}
TREE = {
    "queues": [
        {"name": "research", "quota": {"local": 4}, "weight": 1.0},
        {"name": "product", "quota": {"local": 4}},
        {"name": "nlp", "parent": "research", "quota": {"local": 2}},
        {"name": "vision", "parent": "research", "quota": {"local": 2}},
        {"name": "ranking", "parent": "product", "quota": {"local": 4}},
    ]
}
SANDBOX = {"queue": "nlp", "gpus": 1, "command": ["jupyterhub-singleuser"]}

# (URL, a valid body, the numeric fields to poison: dotted paths into the body)
NUMERIC_FIELDS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "/v1/jobs",
        job(cpus=1.0, memory_gb=1.0, max_runtime=60.0, workers=1, priority=0),
        ["cpus", "memory_gb", "max_runtime", "gpus", "workers", "priority"],
    ),
    ("/v1/admission/test", job(cpus=1.0, memory_gb=1.0), ["cpus", "memory_gb", "gpus"]),
    (
        "/v1/sandboxes",
        {**SANDBOX, "cpus": 1.0, "memory_gb": 1.0, "idle_timeout_s": 60.0},
        ["cpus", "memory_gb", "idle_timeout_s", "gpus"],
    ),
    ("/v1/queues/apply", {"document": TREE}, ["document.queues.0.weight", "document.queues.0.quota.local"]),
    (
        "/v1/admission/apply",
        {"document": POLICY},
        ["document.rules.0.max_runtime_cap_s", "document.rules.0.max_gpus_per_job"],
    ),
    ("/v1/tokens", {"user": "eve", "role": "viewer", "expires_in_days": 1.0}, ["expires_in_days"]),
    (
        "/v1/models/m/versions",
        {"job_id": 1, "artifact_uri": "model.pt", "metrics": {"acc": 0.5}},
        ["metrics.acc", "job_id"],
    ),
]


@pytest.mark.parametrize(("url", "body", "fields"), NUMERIC_FIELDS, ids=[u for u, _, _ in NUMERIC_FIELDS])
def test_non_finite_numbers_are_refused_everywhere(
    svc: Service, api: TestClient, url: str, body: dict[str, Any], fields: list[str]
) -> None:
    """Item 2: NaN, +-Infinity and numbers too large for a double (1e309 reads as Infinity) in any numeric field of
    any body: 422 naming the field, never 201 (the job that stalls every queue) or 500 (a model's metrics)."""
    before = snapshot(svc)
    for field in fields:
        for token in NOT_NUMBERS:
            attack_kit.attempt(NON_FINITE)
            r = post_raw(api, url, raw(body, field, token))
            err = error_of(r, 422)
            assert err["code"] == "invalid"
            assert "finite" in err["message"] or "number" in err["message"], (field, token, err)
            assert field.split(".")[0] in err["message"], (field, token, err["message"])
    assert snapshot(svc) == before


@pytest.mark.parametrize(("url", "body", "fields"), NUMERIC_FIELDS, ids=[u for u, _, _ in NUMERIC_FIELDS])
def test_booleans_are_not_numbers(
    svc: Service, api: TestClient, url: str, body: dict[str, Any], fields: list[str]
) -> None:
    """Item 9: `true` is not 1 (Python's True == 1 let {"gpus": true} through as one GPU)."""
    before = snapshot(svc)
    for field in fields:
        for token in ("true", "false"):
            attack_kit.attempt(BOOL)
            err = error_of(post_raw(api, url, raw(body, field, token)), 422)
            assert "boolean" in err["message"] or "valid" in err["message"], (field, err)
    assert snapshot(svc) == before


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/queues/rollback", {"version": True}),
        ("/v1/admission/rollback", {"version": True}),
        ("/v1/queues/apply", {"document": TREE, "expected_version": True}),
        ("/v1/admission/apply", {"document": POLICY, "expected_version": True}),
        ("/v1/models/m/promotions", {"version": True}),
    ],
)
def test_a_boolean_is_not_a_version(svc: Service, api: TestClient, url: str, body: dict[str, Any]) -> None:
    """Item 9: {"version": true} was taken as version 1 (a rollback to the first tree)."""
    before = snapshot(svc)
    attack_kit.attempt(BOOL)
    err = error_of(api.post(url, json=body), 422)
    assert "boolean" in err["message"]
    assert snapshot(svc) == before


def test_absurd_amounts_are_refused(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    for field in ("cpus", "memory_gb"):
        for value in (MAX_AMOUNT * 10, 1e300, -1.0):
            attack_kit.attempt(NON_FINITE)
            err = error_of(api.post("/v1/jobs", json=job(**{field: value})), 422)
            assert err["detail"][0]["where"] == f"body.{field}"
    assert snapshot(svc) == before


def test_the_engine_refuses_non_finite_amounts() -> None:
    """Defence in depth: whatever reaches the engine, a non-finite amount never becomes a node's free CPUs."""
    for value in (math.inf, -math.inf, math.nan):
        attack_kit.attempt(NON_FINITE, 3)
        with pytest.raises(ValueError, match="finite"):
            JobSpec("job-1", "nlp", "local", cpus=value)
        with pytest.raises(ValueError, match="finite"):
            JobSpec("job-1", "nlp", "local", memory_gb=value)
        with pytest.raises(ValueError, match="finite"):
            NodeSpec("n", "local", 8, cpus=value)


def test_infinite_cpus_never_stall_other_queues(svc: Service, api: TestClient) -> None:
    """Item 2 as reported: {"cpus": Infinity} was accepted (201), started on a node that does not count CPUs, and left
    its free CPUs at inf - inf = NaN, so no job of any queue started there again."""
    for token in ("Infinity", "1e309"):
        attack_kit.attempt(NON_FINITE)
        error_of(post_raw(api, "/v1/jobs", raw(job(cpus=1.0), "cpus", token)), 422)
    ok = api.post("/v1/jobs", json=job(queue="ranking", cpus=4.0))
    assert ok.status_code == 201, ok.text
    svc.tick()
    assert api.get(f"/v1/jobs/{ok.json()['id']}").json()["state"] in ("starting", "running")


# ----- item 9: request size -----


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, db_url: str) -> None:
    svc = make_service(db_url, tmp_path, max_request_bytes=4096)
    api = TestClient(svc.admin.app, raise_server_exceptions=False)
    api.headers.update(svc.admin.headers)
    before = snapshot(svc)
    big = json.dumps(job(labels={f"k{i}": "v" * 40 for i in range(100)})).encode()
    assert len(big) > 4096
    attack_kit.attempt(SIZE)
    err = error_of(api.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "too_large" and err["where"] == "body" and "4096" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the count as it arrives decides
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    attack_kit.attempt(SIZE)
    err = error_of(api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert err["code"] == "too_large" and "stopped reading" in err["message"]
    for url in ("/v1/queues/apply", "/v1/tokens", "/v1/admission/apply", "/v1/sandboxes", "/v1/models"):
        attack_kit.attempt(SIZE)
        error_of(api.post(url, content=big, headers={"content-type": "application/json"}), 413)
    assert snapshot(svc) == before
    small = api.post("/v1/jobs", json=job())  # under the limit: served as before
    assert small.status_code == 201, small.text
    # The what-if form's uploads are bounded per file there (2 MiB): its body may be larger, but not unbounded.
    trace = b"x" * (1 << 20)
    assert api.post("/ui/whatif", files={"trace_file": ("t.csv", trace)}).status_code != 413
    attack_kit.attempt(SIZE)
    assert api.post("/ui/whatif", files={"trace_file": ("t.csv", trace * 9)}).status_code == 413


def test_the_default_limit_refuses_a_30_mb_spec(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    attack_kit.attempt(SIZE)
    spec = json.dumps(job(env={"BLOB": "x" * (30 << 20)})).encode()
    err = error_of(api.post("/v1/jobs", content=spec, headers={"content-type": "application/json"}), 413)
    assert "1048576" in err["message"]
    assert snapshot(svc) == before


# ----- item 9: NUL, command size, env and labels, workdir -----

NUL_FIELDS = [
    ("name", "tr\0ain"),
    ("queue", "nlp\0"),
    ("command", ["python", "a\0b"]),
    ("command", "echo a\0b"),
    ("env", {"A\0B": "1"}),
    ("env", {"A": "1\0rm -rf"}),
    ("labels", {"k\0": "v"}),
    ("labels", {"k": "v\0"}),
    ("workdir", "/tmp\0/x"),
    ("image", "img\0:1"),
    ("idempotency_key", "k\0"),
    ("pool", "local\0"),
]


@pytest.mark.parametrize(("field", "value"), NUL_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(NUL_FIELDS)])
def test_nul_is_refused_in_every_string(svc: Service, api: TestClient, field: str, value: Any) -> None:
    before = snapshot(svc)
    attack_kit.attempt(NUL)
    err = error_of(api.post("/v1/jobs", json=job(**{field: value})), 422)
    assert "NUL" in err["message"], err
    assert err["detail"][0]["where"] == f"body.{field}"
    attack_kit.attempt(NUL)
    if field in ("name", "queue", "env", "workdir", "image", "pool"):
        error_of(api.post("/v1/sandboxes", json={**SANDBOX, field: value}), 422)
    assert snapshot(svc) == before


OVERSIZED = [
    ("command", ["x" * 1000] * 70, "bytes"),
    ("command", "x" * (MAX_COMMAND_BYTES + 1), "65536"),
    ("command", ["a"] * 5000, "arguments"),
    ("env", {f"V{i}": "1" for i in range(300)}, "256"),
    ("env", {"V": "x" * 40_000}, "characters"),
    ("env", {"V" * 300: "1"}, "not valid"),
    ("labels", {f"k{i}": "v" for i in range(100)}, "64"),
    ("labels", {"k": "v" * 2000}, "characters"),
    ("labels", {"k" * 300: "v"}, "not valid"),
    ("image", "i" * 2000, "1024"),
    ("workdir", "/" + "d" * 5000, "4096"),
    ("max_runtime", 1e12, "less than"),
]


@pytest.mark.parametrize(
    ("field", "value", "words"), OVERSIZED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(OVERSIZED)]
)
def test_sizes_are_bounded(svc: Service, api: TestClient, field: str, value: Any, words: str) -> None:
    """Item 9: a 5 MB command was accepted and stored; every part of a spec is bounded (under the body limit too)."""
    before = snapshot(svc)
    attack_kit.attempt(COMMAND)
    err = error_of(api.post("/v1/jobs", json=job(**{field: value})), 422)
    assert err["detail"][0]["where"] == f"body.{field}"
    assert words in err["message"], err["message"]
    assert snapshot(svc) == before


def test_a_5_mb_command_is_refused_even_under_a_larger_body_limit(tmp_path: Path, db_url: str) -> None:
    svc = make_service(db_url, tmp_path, max_request_bytes=16 << 20)
    api = TestClient(svc.admin.app, raise_server_exceptions=False)
    api.headers.update(svc.admin.headers)
    before = snapshot(svc)
    for argv in ("x" * (5 << 20), ["x" * 1024] * 5 * 1024):
        attack_kit.attempt(COMMAND)
        err = error_of(api.post("/v1/jobs", json=job(command=argv)), 422)
        assert err["detail"][0]["where"] == "body.command"
    assert snapshot(svc) == before


def test_bad_workdirs_are_refused_at_submission(svc: Service, api: TestClient, tmp_path: Path) -> None:
    """Item 9: the docs promise a 422 for a missing working directory; it was accepted and failed at launch."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    before = snapshot(svc)
    for workdir, where in (
        ("relative/dir", "body.workdir"),
        ("", "body.workdir"),
        ("/nonexistent/corral", "workdir"),
        (str(a_file), "workdir"),
        ("/" + "d" * 300, "workdir"),
    ):
        attack_kit.attempt(WORKDIR)
        err = error_of(api.post("/v1/jobs", json=job(workdir=workdir)), 422)
        got = err.get("where") or err["detail"][0]["where"]
        assert got == where, (workdir, err)
        attack_kit.attempt(WORKDIR)
        error_of(api.post("/v1/sandboxes", json={**SANDBOX, "workdir": workdir}), 422)
    assert snapshot(svc) == before
    ok = api.post("/v1/jobs", json=job(workdir=str(tmp_path)))
    assert ok.status_code == 201, ok.text


# ----- item 9: kind sandbox -----


def test_kind_sandbox_is_refused_on_the_jobs_api(svc: Service, api: TestClient) -> None:
    """A sandbox is non-preemptible and above batch priority: only /v1/sandboxes checks the team's guarantee."""
    member = svc.client("mia", Role.MEMBER, "nlp")
    for client in (api, member):
        before = snapshot(svc)
        for body in (job(kind="sandbox"), job(kind="sandbox", preemptible=False, gpus=2)):
            attack_kit.attempt(SANDBOX_KIND)
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["where"] == "kind" and "/v1/sandboxes" in r.json()["error"]["message"]
        assert snapshot(svc) == before


def test_kind_sandbox_is_refused_from_cluster_pods(tmp_path: Path) -> None:
    """The other way in: pods a cluster user creates for Corral to schedule carry a job spec; kind sandbox is
    refused there too, and so are non-finite numbers."""
    core, ex, _ = cluster_make(tmp_path, "a")
    for key, extra in (
        ("ns/nb", {"kind": "sandbox"}),
        ("ns/inf", {"cpus": math.inf}),
        ("ns/nul", {"env": {"A": "\0"}}),
    ):
        attack_kit.attempt(SANDBOX_KIND if key == "ns/nb" else NON_FINITE if key == "ns/inf" else NUL)
        spec = dict(arrival(key).spec or {})
        ex.brought.append(Arrival(key, {**spec, **extra}))
    core.tick()
    assert cluster_jobs(core) == {}
    assert "/v1/sandboxes" in ex.refused["ns/nb"] and "finite" in ex.refused["ns/inf"]
    assert "NUL" in ex.refused["ns/nul"]


# ----- item 9: other teams' job ids -----


def test_other_teams_job_ids_are_redacted(svc: Service) -> None:
    """Vision borrows every GPU; nlp takes its guarantee back by preemption. Vision's members read why their jobs
    were preempted and why they wait, without the ids of nlp's jobs (which answer 404 to them)."""
    vic = svc.client("vic", Role.MEMBER, "vision")
    nat = svc.client("nat", Role.MEMBER, "nlp")
    mine = [vic.post("/v1/jobs", json=job(queue="vision", gpus=2)).json()["id"] for _ in range(4)]
    svc.tick()
    theirs = nat.post("/v1/jobs", json=job(queue="nlp", gpus=2)).json()["id"]
    svc.tick()
    svc.tick()
    assert vic.get(f"/v1/jobs/{theirs}").status_code == 404
    ref = f"job-{theirs}"
    preempted = [
        j for j in mine if any(e["kind"] == "preempted" for e in svc.admin.get(f"/v1/jobs/{j}/events").json()["events"])
    ]
    assert preempted, "nlp's job preempted none of vision's"
    admin_view = svc.admin.get(f"/v1/jobs/{preempted[0]}/explain").json()
    assert ref in json.dumps(admin_view), admin_view  # the admin sees every id
    for j in mine:
        for url in (f"/v1/jobs/{j}/explain", f"/v1/jobs/{j}/events", f"/v1/jobs/{j}"):
            attack_kit.attempt(REDACT)
            text = vic.get(url).text
            assert ref not in text, (url, text)
    attack_kit.attempt(REDACT)
    listing = vic.get("/v1/jobs").text
    assert ref not in listing
    seen = vic.get(f"/v1/jobs/{preempted[0]}/explain").json()
    assert seen["preemptions"] and seen["preemptions"][0]["by"] == HIDDEN
    assert HIDDEN in seen["preemptions"][0]["message"]
    events_seen = vic.get(f"/v1/jobs/{preempted[0]}/events").json()["events"]
    hit = [e for e in events_seen if e["kind"] == "preempted"]
    assert hit and hit[0]["data"]["by"] == HIDDEN and HIDDEN in hit[0]["message"]


# ----- item 9: malformed bodies -----


def test_malformed_bodies_answer_the_documented_shape(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    deep = b"[" * 100_000  # Python's JSON parser gives up (RecursionError): FastAPI answered {"detail": ...}
    attack_kit.attempt(MALFORMED)
    err = error_of(post_raw(api, "/v1/jobs", deep), 400)
    assert err["code"] == "bad_request" and err["where"] == "body"
    for content, ctype in (
        (b"queue=nlp&command=x", "application/x-www-form-urlencoded"),
        (b'{"queue": "nlp", "command": ["x"]}', "text/plain"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b'{"queue": "nlp"', "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
    ):
        attack_kit.attempt(MALFORMED)
        r = api.post("/v1/jobs", content=content, headers={"content-type": ctype})
        assert r.status_code in (400, 422), r.text
        error_of(r, r.status_code)
    for method, url, status in (("GET", "/v1/no-such-thing", 404), ("PUT", "/v1/jobs", 405)):
        attack_kit.attempt(MALFORMED)
        err = error_of(api.request(method, url), status)
        assert err["code"] in ("not_found", "method_not_allowed")
    assert snapshot(svc) == before


def test_the_error_statuses_are_documented(svc: Service, api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    responses = schema["paths"]["/v1/jobs"]["post"]["responses"]
    for status in ("400", "413", "422"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


# ----- item 9: admission validation is linear in the rules -----


class CountingName(str):
    """A rule name that counts how often it is compared: the work of finding repeated names."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingName.compared += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        return str.__hash__(self)


def test_admission_validation_is_linear_in_rules() -> None:
    """Finding repeated rule names compared every name with every other (names.count per rule): 4,000 rules took 16
    million comparisons. Counted, not timed: a linear check compares each name about once."""
    for n in (1000, 4000):
        rules = [
            Rule.model_construct(name=CountingName(f"rule-{i}"), scope=None, defaults={}, required_labels=[])
            for i in range(n)
        ]
        CountingName.compared = 0
        attack_kit.attempt(QUADRATIC)
        AdmissionPolicy(rules=rules)
        assert CountingName.compared <= 2 * n, (n, CountingName.compared)
    twice = [Rule.model_construct(name=CountingName("same"), scope=None, defaults={}, required_labels=[])] * 2
    with pytest.raises(ValueError, match="repeated: same"):
        AdmissionPolicy(rules=twice)


@pytest.mark.parametrize("field", ["cpus", "memory_gb"])
def test_a_node_with_infinite_room_is_refused_in_the_settings(field: str) -> None:
    """`corral serve --cpus inf`: the same stall as a job asking for Infinity, from the other side."""
    for bad in (math.inf, math.nan):
        attack_kit.attempt(NON_FINITE)
        with pytest.raises(ValueError, match="finite"):
            ServiceSettings(**{field: bad})
