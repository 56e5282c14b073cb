"""Bad input is answered with a precise 4xx, an error body {"error": {"code", "message", "where"?, "detail"?}} whose
message names the field or value at fault, and nothing changes: no job, queue version, audit entry, event or token.

Runs on SQLite and on PostgreSQL (when CORRAL_TEST_POSTGRES_URL names a server)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from scheduler.service.store.db import attempts, audit, events, jobs, queue_versions, tokens
from tests.service_kit import DEMO_TREE, Service

TABLES = {
    "jobs": jobs,
    "attempts": attempts,
    "events": events,
    "audit": audit,
    "queue_versions": queue_versions,
    "tokens": tokens,
}


def snapshot(svc: Service) -> dict[str, Any]:
    """Row counts of every table a request could write to, and what the engine holds."""
    with svc.core.db.connect() as conn:
        out: dict[str, Any] = {
            name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for name, t in TABLES.items()
        }
    out["tree version"] = svc.core.version
    out["engine jobs"] = sorted(svc.core.engine.jobs)
    return out


@pytest.fixture
def api(svc: Service) -> TestClient:
    """The admin's client, answering a server error as a 500 instead of raising it in the test."""
    c = TestClient(svc.admin.app, raise_server_exceptions=False)
    c.headers.update(svc.admin.headers)
    return c


def error_of(r: Any, status: int) -> dict[str, Any]:
    """The error of an answer, checked for its status and shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"], body
    err: dict[str, Any] = body["error"]
    assert set(err) <= {"code", "message", "where", "detail"}, err
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    return err


def where_of(err: dict[str, Any]) -> str | None:
    """Where the problem is: the service's `where`, or for a request the schema refused, its single problem's."""
    if "where" in err:
        where: str = err["where"]
        return where
    problems = err.get("detail") or []
    assert len(problems) == 1, problems
    got: str = problems[0]["where"]
    return got


def job(**kw: Any) -> dict[str, Any]:
    return {"name": "train", "queue": "nlp", "gpus": 1, "command": ["python", "train.py"], **kw}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


# (what, request body, status, code, where, words the message must contain)
SUBMISSIONS = [
    pytest.param(
        job(preemptable=False), 422, "invalid", "body.preemptable", ["preemptable", "not permitted"], id="unknown field"
    ),
    pytest.param(without(job(), "queue"), 422, "invalid", "body.queue", ["queue", "required"], id="missing queue"),
    pytest.param(job(queue="nope"), 422, "invalid", "queue", ["'nope'", "does not exist"], id="unknown queue"),
    pytest.param(
        job(queue="research"), 422, "invalid", "queue", ["research", "not a leaf", "nlp, vision"], id="inner queue"
    ),
    pytest.param(job(pool="gpu-x"), 422, "invalid", "pool", ["pool gpu-x", "does not exist"], id="unknown pool"),
    pytest.param(job(gpus=-1), 422, "invalid", "body.gpus", ["gpus", "greater than or equal to 0"], id="negative gpus"),
    pytest.param(
        job(workers=0), 422, "invalid", "body.workers", ["workers", "greater than or equal to 1"], id="zero workers"
    ),
    pytest.param(
        job(gpus=9), 422, "invalid", "gpus", ["9 GPUs", "largest node has 8"], id="worker bigger than any node"
    ),
    pytest.param(
        job(workers=2, gpus=8), 422, "invalid", "workers", ["16 GPUs", "2 x 8", "has 8"], id="gang bigger than the pool"
    ),
    pytest.param(
        job(gpus=3, preemptible=False),
        422,
        "invalid",
        "preemptible",
        ["non-preemptible", "asks 3 GPUs", "nlp's quota of 2"],
        id="non-preemptible over quota",
    ),
    pytest.param(
        job(env={"CUDA_VISIBLE_DEVICES": "0"}),
        422,
        "invalid",
        "body.env",
        ["CUDA_VISIBLE_DEVICES"],
        id="env sets CUDA_VISIBLE_DEVICES",
    ),
    pytest.param(job(env={"A=B": "1"}), 422, "invalid", "body.env", ["'A=B'", "not valid"], id="env name with ="),
    pytest.param(job(command=""), 422, "invalid", "body.command", ["command"], id="empty command string"),
    pytest.param(job(command="   "), 422, "invalid", "body.command", ["command is empty"], id="blank command"),
    pytest.param(job(command=[]), 422, "invalid", "body.command", ["command", "at least 1 item"], id="empty argv"),
    pytest.param(job(command=[""]), 422, "invalid", "body.command", ["command"], id="argv of an empty program"),
    pytest.param(job(priority=5000), 422, "invalid", "body.priority", ["priority", "1000"], id="priority too high"),
    pytest.param(
        job(max_runtime=0), 422, "invalid", "body.max_runtime", ["max_runtime", "greater than 0"], id="zero max_runtime"
    ),
    pytest.param(job(gpus="two"), 422, "invalid", "body.gpus", ["gpus", "integer"], id="gpus not a number"),
]


@pytest.mark.parametrize(("body", "status", "code", "where", "words"), SUBMISSIONS)
def test_bad_submission_changes_nothing(
    svc: Service, api: TestClient, body: dict[str, Any], status: int, code: str, where: str, words: list[str]
) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/jobs", json=body), status)
    assert err["code"] == code
    assert where_of(err) == where
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert snapshot(svc) == before


def test_engine_refusals_carry_their_rule_and_numbers(svc: Service, api: TestClient) -> None:
    err = error_of(api.post("/v1/jobs", json=job(workers=2, gpus=8)), 422)
    assert err["detail"] == {
        "rule": "gang_too_big",
        "message": err["message"],
        "numbers": {"request": 16, "pool_gpus": 8},
    }
    err = error_of(api.post("/v1/jobs", json=job(gpus=3, preemptible=False)), 422)
    assert err["detail"]["numbers"] == {"request": 3, "quota": 2, "queue": "nlp"}


def test_malformed_json_changes_nothing(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    r = api.post("/v1/jobs", content=b'{"queue": "nlp", "command": ["x"]', headers={"content-type": "application/json"})
    err = error_of(r, 422)
    assert err["code"] == "invalid"
    assert "JSON decode error" in err["message"]
    assert err["detail"][0]["where"].startswith("body")
    assert snapshot(svc) == before


def test_body_that_is_not_an_object_changes_nothing(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/jobs", json=["nlp"]), 422)
    assert err["code"] == "invalid" and where_of(err) == "body"
    assert snapshot(svc) == before


# ----- queue trees -----


def edit(doc: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for q in out["queues"]:
        if q["name"] == name:
            q.update(fields)
    return out


def drop(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {"queues": [q for q in copy.deepcopy(doc)["queues"] if q["name"] != name]}


# (document, words the message must contain, the problems listed in detail: (where, words of the problem))
TREES = [
    pytest.param(
        edit(edit(DEMO_TREE, "research", quota={"local": 6}), "nlp", quota={"local": 4}),
        ["top-level quotas add up to 10 GPUs", "research=6", "product=4", "capacity of 8"],
        [("quota.local", ["10 GPUs", "research=6, product=4", "capacity of 8"])],
        id="over capacity",
    ),
    pytest.param(
        edit(DEMO_TREE, "nlp", quota={"local": 3}),
        ["children's quotas add up to 5 GPUs", "nlp=3, vision=2", "research's quota of 4"],
        [("research.quota.local", ["5 GPUs", "nlp=3, vision=2", "quota of 4"])],
        id="children over their parent",
    ),
    pytest.param(
        edit(edit(DEMO_TREE, "nlp", parent="vision"), "vision", parent="nlp"),
        ["cycle"],
        [
            ("queues[2] (nlp).parent", ["cycle through 'nlp'"]),
            ("queues[3] (vision).parent", ["cycle through 'vision'"]),
        ],
        id="cycle",
    ),
    pytest.param(
        {"queues": DEMO_TREE["queues"] + [{"name": "nlp", "parent": "product"}]},
        ["'nlp' is declared twice"],
        [("queues[5] (nlp).name", ["'nlp' is declared twice"])],
        id="duplicate name",
    ),
    pytest.param(
        edit(DEMO_TREE, "nlp", parent="speech"),
        ["parent queue 'speech' does not exist"],
        [("queues[2] (nlp).parent", ["'speech' does not exist"])],
        id="unknown parent",
    ),
    pytest.param(
        edit(DEMO_TREE, "nlp", quota={"gpu-x": 1}),
        ["pool 'gpu-x' does not exist"],
        [("queues[2] (nlp).quota.gpu-x", ["pool 'gpu-x' does not exist"])],
        id="unknown pool",
    ),
    pytest.param(
        edit(DEMO_TREE, "nlp", quota={"local": -1}),
        ["whole number of GPUs >= 0", "-1"],
        [("queues[2] (nlp).quota.local", ["got -1"])],
        id="negative quota",
    ),
    pytest.param(
        edit(DEMO_TREE, "nlp", limit={"local": 1}),
        ["limit 1 is below the queue's quota 2"],
        [("queues[2] (nlp).limit.local", ["limit 1", "quota 2"])],
        id="limit below quota",
    ),
    pytest.param(edit(DEMO_TREE, "nlp", quotas={"local": 2}), ["quotas"], None, id="misspelled field"),
    pytest.param(edit(DEMO_TREE, "nlp", quota={"local": "two"}), ["quota"], None, id="quota not a number"),
    pytest.param({"queue": DEMO_TREE["queues"]}, ["queues"], None, id="no queues key"),
]


@pytest.mark.parametrize(("document", "words", "problems"), TREES)
@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_invalid_tree_changes_nothing(
    svc: Service,
    api: TestClient,
    document: dict[str, Any],
    words: list[str],
    problems: list[tuple[str, list[str]]] | None,
    dry_run: bool,
) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/queues/apply", json={"document": document, "dry_run": dry_run}), 422)
    assert err["code"] == "invalid"
    for w in words:
        assert w in err["message"], (w, err["message"])
    if problems is not None:
        assert err["where"] == "queues"
        assert [p["where"] for p in err["detail"]] == [w for w, _ in problems]
        for p, (_, expected) in zip(err["detail"], problems, strict=True):
            for w in expected:
                assert w in p["problem"], (w, p)
    assert snapshot(svc) == before


@pytest.mark.parametrize(
    ("document", "stranded"),
    [
        pytest.param(drop(DEMO_TREE, "nlp"), "nlp (1 live jobs)", id="removes the queue"),
        pytest.param(
            {"queues": DEMO_TREE["queues"] + [{"name": "bert", "parent": "nlp"}]},
            "nlp (1 live jobs)",
            id="makes it an inner queue",
        ),
    ],
)
def test_tree_stranding_pending_jobs_changes_nothing(
    svc: Service, api: TestClient, document: dict[str, Any], stranded: str
) -> None:
    assert api.post("/v1/jobs", json=job()).status_code == 201
    before = snapshot(svc)
    err = error_of(api.post("/v1/queues/apply", json={"document": document}), 422)
    assert (err["code"], err["where"]) == ("invalid", "queues")
    assert stranded in err["message"] and "must stay leaf queues" in err["message"]
    assert snapshot(svc) == before


@pytest.mark.parametrize(
    ("body", "status", "code", "where", "words"),
    [
        pytest.param({"version": 99}, 404, "not_found", None, ["version 99"], id="unknown version"),
        pytest.param(
            {"version": 0}, 422, "invalid", "body.version", ["version", "greater than or equal to 1"], id="version 0"
        ),
        pytest.param({}, 422, "invalid", "body.version", ["version", "required"], id="no version"),
        pytest.param(
            {"version": 1, "comment": "x"},
            422,
            "invalid",
            "body.comment",
            ["comment", "not permitted"],
            id="unknown field",
        ),
    ],
)
def test_bad_rollback_changes_nothing(
    svc: Service, api: TestClient, body: dict[str, Any], status: int, code: str, where: str | None, words: list[str]
) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/queues/rollback", json=body), status)
    assert err["code"] == code
    if where is None:
        assert "where" not in err
    else:
        assert where_of(err) == where
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert snapshot(svc) == before


def test_apply_body_with_unknown_field_changes_nothing(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/queues/apply", json={"document": DEMO_TREE, "dryrun": True}), 422)
    assert where_of(err) == "body.dryrun" and "dryrun" in err["message"]
    assert snapshot(svc) == before


# ----- filters and tokens -----


@pytest.mark.parametrize(
    ("path", "params", "where", "words"),
    [
        pytest.param(
            "/v1/jobs", {"state": "bogus"}, "state", ["'bogus'", "pending, starting, running"], id="unknown state"
        ),
        pytest.param("/v1/jobs", {"state": ["running", "Running"]}, "state", ["'Running'"], id="state in capitals"),
        pytest.param("/v1/jobs", {"label": "team"}, "label", ["'team'", "key=value"], id="label without ="),
        pytest.param("/v1/jobs", {"label": "=nlp"}, "label", ["'=nlp'", "key=value"], id="label without key"),
        pytest.param("/v1/jobs", {"limit": 0}, "query.limit", ["limit", "greater than or equal to 1"], id="limit 0"),
        pytest.param(
            "/v1/jobs", {"limit": 5000}, "query.limit", ["limit", "less than or equal to 1000"], id="limit over 1000"
        ),
        pytest.param("/v1/jobs", {"before": "yesterday"}, "query.before", ["before", "integer"], id="before not an id"),
        pytest.param("/v1/jobs/abc", {}, "path.job_id", ["job_id", "integer"], id="job id not a number"),
        pytest.param(
            "/v1/usage",
            {"since": 2_000_000, "until": 1_500_000},
            "until",
            ["until (1500000.0) is before since (2000000.0)"],
            id="until before since",
        ),
        pytest.param(
            "/v1/usage", {"since": -1}, "query.since", ["since", "greater than or equal to 0"], id="negative since"
        ),
        pytest.param("/v1/usage", {"until": "tomorrow"}, "query.until", ["until", "number"], id="until not a number"),
    ],
)
def test_bad_filter_is_refused(
    svc: Service, api: TestClient, path: str, params: dict[str, Any], where: str, words: list[str]
) -> None:
    assert api.post("/v1/jobs", json=job(labels={"team": "nlp"})).status_code == 201
    before = snapshot(svc)
    err = error_of(api.get(path, params=params), 422)
    assert err["code"] == "invalid"
    assert where_of(err) == where
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert snapshot(svc) == before


@pytest.mark.parametrize(
    ("body", "status", "where", "words"),
    [
        pytest.param(
            {"user": "x", "role": "member", "scope": "nope"},
            422,
            "scope",
            ["'nope'", "does not exist"],
            id="unknown scope",
        ),
        pytest.param(
            {"user": "x", "role": "owner", "scope": "nlp"}, 422, "body.role", ["role", "'member'"], id="unknown role"
        ),
        pytest.param(
            {"user": "", "role": "member", "scope": "nlp"}, 422, "body.user", ["user", "at least 1"], id="empty user"
        ),
        pytest.param({"role": "member", "scope": "nlp"}, 422, "body.user", ["user", "required"], id="no user"),
    ],
)
def test_bad_token_request_changes_nothing(
    svc: Service, api: TestClient, body: dict[str, Any], status: int, where: str, words: list[str]
) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/tokens", json=body), status)
    assert err["code"] == "invalid"
    assert where_of(err) == where
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert snapshot(svc) == before


def test_missing_things_answer_404_and_change_nothing(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    for r, words in (
        (api.get("/v1/jobs/424242"), "job 424242 not found"),
        (api.post("/v1/jobs/424242/cancel"), "job 424242 not found"),
        (api.delete("/v1/jobs/424242"), "job 424242 not found"),
        (api.delete("/v1/tokens/424242"), "token 424242 not found"),
    ):
        err = error_of(r, 404)
        assert (err["code"], err["message"]) == ("not_found", words)
    assert snapshot(svc) == before


def test_cancelling_an_ended_job_is_a_conflict_and_changes_nothing(svc: Service, api: TestClient) -> None:
    jid = api.post("/v1/jobs", json=job()).json()["id"]
    assert api.post(f"/v1/jobs/{jid}/cancel").status_code == 200
    before = snapshot(svc)
    err = error_of(api.post(f"/v1/jobs/{jid}/cancel"), 409)
    assert (err["code"], err["message"]) == ("conflict", f"job {jid} already ended (cancelled)")
    assert snapshot(svc) == before
