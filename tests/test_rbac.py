"""RBAC over the whole /v1 API: every endpoint x role x target (the caller's team vs another team), the filtering
of what each role sees, what a team admin may change in the queue tree, and the audit trail of changes.

Runs on SQLite and on PostgreSQL (when CORRAL_TEST_POSTGRES_URL names a server)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from scheduler.backends.base import Handle, Launch
from scheduler.service.api.auth import Role
from tests.service_kit import DEMO_TREE, ScriptedExecutor, Service, database_url, make_service

# ----- the matrix -----
#
# Callers. The team is research/nlp; "another team" is product/ranking.
ROLES = ("admin", "team_admin", "member", "viewer", "viewer_all", "no_token", "bad_token", "revoked")
#   admin       platform-admin 'root'
#   team_admin  team-admin 'tess', scope research (nlp and vision are below it)
#   member      member 'alice', scope nlp
#   viewer      viewer 'victor', scope nlp
#   viewer_all  viewer 'vera', no scope (reads everything)
#   no_token    no Authorization header
#   bad_token   a bearer token Corral never issued
#   revoked     a member/nlp token that was revoked through the API
#
# Targets: "team" is something of the caller's team (an nlp job of 'nina', another nlp member, so a member is not
# its owner; the nlp queue; an nlp token), "other" is another team's (a ranking job of 'bob'; ranking).
# A cell "A/B" is the status for the team target / the other team's target; one number: the endpoint has no target.
# Another team's job answers 404 exactly like a job that does not exist, never 403: existence must not leak.
#
# /logs: the kit's scripted executor points at log files that do not exist (and a job at attempt 0 answers 404,
# "not started"), which would make the row 404 for everybody. This file's executor writes real log files at
# launch and the target jobs run, so /logs answers 200 to whoever may read the job, like /events.
MATRIX = """
endpoint                     admin   team_admin member  viewer  viewer_all no_token bad_token revoked
GET /v1/jobs                 200     200     200     200     200     401     401     401
POST /v1/jobs                201/201 201/403 201/403 403/403 403/403 401/401 401/401 401/401
GET /v1/jobs/{id}            200/200 200/404 200/404 200/404 200/200 401/401 401/401 401/401
GET /v1/jobs/{id}/events     200/200 200/404 200/404 200/404 200/200 401/401 401/401 401/401
GET /v1/jobs/{id}/explain    200/200 200/404 200/404 200/404 200/200 401/401 401/401 401/401
GET /v1/jobs/{id}/logs       200/200 200/404 200/404 200/404 200/200 401/401 401/401 401/401
POST /v1/jobs/{id}/cancel    200/200 200/404 403/404 403/404 403/403 401/401 401/401 401/401
DELETE /v1/jobs/{id}         200/200 200/404 403/404 403/404 403/403 401/401 401/401 401/401
GET /v1/queues               200     200     200     200     200     401     401     401
POST /v1/queues/apply        200/200 200/403 403/403 403/403 403/403 401/401 401/401 401/401
POST /v1/queues/rollback     200/200 200/403 403/403 403/403 403/403 401/401 401/401 401/401
GET /v1/queues/history       200     200     200     200     200     401     401     401
GET /v1/pools                200     200     200     200     200     401     401     401
GET /v1/usage                200     200     200     200     200     401     401     401
GET /v1/usage/export         200     200     200     200     200     401     401     401
POST /v1/tokens              201/201 201/403 403/403 403/403 403/403 401/401 401/401 401/401
DELETE /v1/tokens/{id}       200/200 200/404 404/404 404/404 404/404 401/401 401/401 401/401
GET /v1/audit                200     403     403     403     403     401     401     401
"""


def _cases() -> list[Any]:
    lines = MATRIX.strip().splitlines()
    assert tuple(lines[0].split()[1:]) == ROLES
    out = []
    for line in lines[1:]:
        method, path, *cells = line.split()
        endpoint = f"{method} {path}"
        assert len(cells) == len(ROLES), endpoint
        for role, cell in zip(ROLES, cells, strict=True):
            codes = [int(c) for c in cell.split("/")]
            targets = ("team", "other") if len(codes) == 2 else ("any",)
            for target, code in zip(targets, codes, strict=True):
                out.append(pytest.param(endpoint, role, target, code, id=f"{endpoint}|{role}|{target}"))
    return out


# ----- a service shared by the matrix (one per database kind) -----


@dataclass
class LoggingExecutor(ScriptedExecutor):
    """The scripted executor, with a real stdout and stderr file per attempt."""

    root: Path = Path("/nonexistent")
    written: list[str] = field(default_factory=list)

    def launch(self, launch: Launch) -> Handle:
        out, err = self.logs(launch.job_id, launch.attempt)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(f"hello from job {launch.job_id}\n")
        Path(err).write_text("")
        return super().launch(launch)

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        d = self.root / job_id / str(attempt)
        return str(d / "stdout"), str(d / "stderr")


def job(queue: str = "nlp", gpus: int = 1, **kw: Any) -> dict[str, Any]:
    return {"name": "train", "queue": queue, "gpus": gpus, "command": ["python", "train.py"], **kw}


def tree(**quota: int) -> dict[str, Any]:
    """The demo tree with some leaf quotas changed, e.g. tree(nlp=1)."""
    doc = copy.deepcopy(DEMO_TREE)
    for q in doc["queues"]:
        if q["name"] in quota:
            q["quota"] = {"local": quota[q["name"]]}
    return doc


# The tree the shared service keeps between cases; versions to roll back to that differ from it in one queue only.
CURRENT = tree(nlp=1, ranking=3)
ONLY_NLP_DIFFERS = tree(ranking=3)
ONLY_RANKING_DIFFERS = tree(nlp=1)


@dataclass
class World:
    svc: Service
    callers: dict[str, TestClient]
    nina: TestClient  # member of nlp: owns the team's jobs
    bob: TestClient  # member of ranking: owns the other team's jobs
    jobs: dict[str, int]  # running jobs: "team" (nlp, nina's) and "other" (ranking, bob's)
    rollback_to: dict[str, int]  # versions whose rollback changes only nlp ("team") or only ranking ("other")

    def fresh_job(self, target: str) -> int:
        owner, queue = (self.nina, "nlp") if target == "team" else (self.bob, "ranking")
        r = owner.post("/v1/jobs", json=job(queue))
        assert r.status_code == 201, r.text
        jid: int = r.json()["id"]
        return jid

    def fresh_token(self, scope: str) -> int:
        r = self.svc.admin.post("/v1/tokens", json={"user": "temp", "role": "member", "scope": scope})
        assert r.status_code == 201, r.text
        tid: int = r.json()["id"]
        return tid

    def apply(self, doc: dict[str, Any]) -> int:
        r = self.svc.admin.post("/v1/queues/apply", json={"document": doc})
        assert r.status_code == 200 and r.json()["applied"], r.text
        version: int = r.json()["version"]
        return version


NAMES = itertools.count()


def _anonymous(svc: Service, secret: str | None) -> TestClient:
    c = TestClient(svc.admin.app)
    if secret is not None:
        c.headers["Authorization"] = f"Bearer {secret}"
    return c


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"rbac-{request.param}")
    # database_url skips the PostgreSQL cases when no server is configured, and drops the database after.
    for url in database_url(request.param, tmp):
        svc = make_service(url, tmp, executor=LoggingExecutor(root=tmp / "logs"))
        made = svc.admin.post("/v1/tokens", json={"user": "rick", "role": "member", "scope": "nlp"}).json()
        assert svc.admin.delete(f"/v1/tokens/{made['id']}").status_code == 200
        callers = {
            "admin": svc.admin,
            "team_admin": svc.client("tess", Role.TEAM_ADMIN, "research"),
            "member": svc.client("alice", Role.MEMBER, "nlp"),
            "viewer": svc.client("victor", Role.VIEWER, "nlp"),
            "viewer_all": svc.client("vera", Role.VIEWER),
            "no_token": _anonymous(svc, None),
            "bad_token": _anonymous(svc, "corral_this-token-was-never-issued"),
            "revoked": _anonymous(svc, made["token"]),
        }
        w = World(
            svc, callers, svc.client("nina", Role.MEMBER, "nlp"), svc.client("bob", Role.MEMBER, "ranking"), {}, {}
        )
        w.rollback_to = {"team": w.apply(ONLY_NLP_DIFFERS), "other": w.apply(ONLY_RANKING_DIFFERS)}
        w.apply(CURRENT)
        w.jobs = {"team": w.fresh_job("team"), "other": w.fresh_job("other")}
        svc.tick()
        for jid in w.jobs.values():
            assert svc.admin.get(f"/v1/jobs/{jid}").json()["state"] == "running"
        yield w
        svc.core.db.dispose()


def _call(w: World, endpoint: str, c: TestClient, target: str) -> httpx.Response:
    """Make the request of `endpoint` as `c`, against `target` (setting up what it needs first)."""
    queue = "ranking" if target == "other" else "nlp"
    jid = w.jobs.get(target, 0)
    calls: dict[str, Callable[[], httpx.Response]] = {
        "GET /v1/jobs": lambda: c.get("/v1/jobs"),
        "POST /v1/jobs": lambda: c.post("/v1/jobs", json=job(queue)),
        "GET /v1/jobs/{id}": lambda: c.get(f"/v1/jobs/{jid}"),
        "GET /v1/jobs/{id}/events": lambda: c.get(f"/v1/jobs/{jid}/events"),
        "GET /v1/jobs/{id}/explain": lambda: c.get(f"/v1/jobs/{jid}/explain"),
        "GET /v1/jobs/{id}/logs": lambda: c.get(f"/v1/jobs/{jid}/logs"),
        "POST /v1/jobs/{id}/cancel": lambda: c.post(f"/v1/jobs/{w.fresh_job(target)}/cancel"),
        "DELETE /v1/jobs/{id}": lambda: c.delete(f"/v1/jobs/{w.fresh_job(target)}"),
        "GET /v1/queues": lambda: c.get("/v1/queues"),
        # A dry run checks who may change what exactly like a real apply, and leaves the shared tree alone.
        "POST /v1/queues/apply": lambda: c.post(
            "/v1/queues/apply",
            json={"document": ONLY_NLP_DIFFERS if target == "team" else ONLY_RANKING_DIFFERS, "dry_run": True},
        ),
        "POST /v1/queues/rollback": lambda: c.post("/v1/queues/rollback", json={"version": w.rollback_to[target]}),
        "GET /v1/queues/history": lambda: c.get("/v1/queues/history"),
        "GET /v1/pools": lambda: c.get("/v1/pools"),
        "GET /v1/usage": lambda: c.get("/v1/usage"),
        "GET /v1/usage/export": lambda: c.get("/v1/usage/export"),
        # A new name each time: a name belongs to whoever it was first made for (the admin's newbie in ranking
        # would make a team admin's later newbie a takeover); that rule has its own tests (test_attack_tokens.py).
        "POST /v1/tokens": lambda: c.post(
            "/v1/tokens", json={"user": f"newbie-{next(NAMES)}", "role": "member", "scope": queue}
        ),
        "DELETE /v1/tokens/{id}": lambda: c.delete(f"/v1/tokens/{w.fresh_token(queue)}"),
        "GET /v1/audit": lambda: c.get("/v1/audit"),
    }
    return calls[endpoint]()


@pytest.mark.parametrize(("endpoint", "role", "target", "status"), _cases())
def test_rbac_matrix(world: World, endpoint: str, role: str, target: str, status: int) -> None:
    r = _call(world, endpoint, world.callers[role], target)
    assert r.status_code == status, f"{endpoint} as {role} on {target}: {r.status_code} {r.text}"
    if status >= 400:
        err = r.json()["error"]
        assert err["code"] == {401: "unauthorized", 403: "forbidden", 404: "not_found"}[status]
        assert err["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 404 and endpoint.startswith("GET /v1/jobs/{id}"):
        # Exactly what a job that does not exist answers, so a 404 says nothing about another team's jobs.
        missing = world.callers[role].get(endpoint.split(" ")[1].replace("{id}", "999999"))
        jid = world.jobs[target]
        assert r.json()["error"]["message"] == missing.json()["error"]["message"].replace("999999", str(jid))
    if endpoint == "GET /v1/jobs/{id}/logs" and status == 200:
        assert r.text == f"hello from job {world.jobs[target]}\n"
    if endpoint == "POST /v1/queues/rollback" and status == 200:
        world.apply(CURRENT)  # put the shared tree back for the cases after this one


def test_member_cancels_its_own_job_but_not_a_teammates(svc: Service) -> None:
    alice = svc.client("alice", Role.MEMBER, "nlp")
    nina = svc.client("nina", Role.MEMBER, "nlp")
    mine = [alice.post("/v1/jobs", json=job()).json()["id"] for _ in range(2)]
    hers = nina.post("/v1/jobs", json=job()).json()["id"]
    assert alice.post(f"/v1/jobs/{mine[0]}/cancel").json()["state"] == "cancelled"
    assert alice.delete(f"/v1/jobs/{mine[1]}").json()["state"] == "cancelled"
    assert alice.post(f"/v1/jobs/{hers}/cancel").status_code == 403
    assert svc.admin.get(f"/v1/jobs/{hers}").json()["state"] == "pending"


def test_revoked_token_stops_working_at_once(svc: Service) -> None:
    made = svc.admin.post("/v1/tokens", json={"user": "rick", "role": "member", "scope": "nlp"}).json()
    rick = _anonymous(svc, made["token"])
    assert rick.get("/v1/jobs").status_code == 200
    assert svc.admin.delete(f"/v1/tokens/{made['id']}").json() == {"id": made["id"], "revoked": True}
    r = rick.get("/v1/jobs")
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]


# ----- what each role sees -----


def _seed_jobs(svc: Service) -> dict[str, int]:
    """One running job per leaf queue, each by a member of that queue."""
    out = {}
    for queue, user in (("nlp", "nina"), ("vision", "vic"), ("ranking", "bob")):
        r = svc.client(user, Role.MEMBER, queue).post("/v1/jobs", json=job(queue, 2))
        assert r.status_code == 201, r.text
        out[queue] = r.json()["id"]
    svc.tick()
    return out


@pytest.mark.parametrize(
    ("user", "role", "scope", "sees"),
    [
        ("root", Role.PLATFORM_ADMIN, None, {"nlp", "vision", "ranking"}),
        ("tess", Role.TEAM_ADMIN, "research", {"nlp", "vision"}),
        ("alice", Role.MEMBER, "nlp", {"nlp"}),
        ("victor", Role.VIEWER, "nlp", {"nlp"}),
        ("vera", Role.VIEWER, None, {"nlp", "vision", "ranking"}),
    ],
)
def test_job_list_shows_only_the_callers_jobs(
    svc: Service, user: str, role: Role, scope: str | None, sees: set[str]
) -> None:
    ids = _seed_jobs(svc)
    c = svc.client(user, role, scope)
    listed = c.get("/v1/jobs").json()["jobs"]
    assert {j["queue"] for j in listed} == sees
    assert sorted(j["id"] for j in listed) == sorted(ids[q] for q in sees)
    # Filters narrow what the caller may see; they never widen it.
    for params in ({"queue": "ranking"}, {"owner": "bob"}, {"state": "running"}):
        got = {j["queue"] for j in c.get("/v1/jobs", params=params).json()["jobs"]}
        assert got <= sees


@pytest.mark.parametrize(
    ("user", "role", "scope", "sees"),
    [
        ("root", Role.PLATFORM_ADMIN, None, ["research", "product", "nlp", "vision", "ranking"]),
        ("tess", Role.TEAM_ADMIN, "research", ["research", "nlp", "vision"]),
        ("alice", Role.MEMBER, "nlp", ["nlp"]),
        ("victor", Role.VIEWER, "nlp", ["nlp"]),
        ("vera", Role.VIEWER, None, ["research", "product", "nlp", "vision", "ranking"]),
    ],
)
def test_queue_tree_shows_only_the_callers_subtree(
    svc: Service, user: str, role: Role, scope: str | None, sees: list[str]
) -> None:
    _seed_jobs(svc)
    got = svc.client(user, role, scope).get("/v1/queues").json()["queues"]
    assert sorted(q["name"] for q in got) == sorted(sees)


@pytest.mark.parametrize(
    ("user", "role", "scope", "queues", "users"),
    [
        (
            "root",
            Role.PLATFORM_ADMIN,
            None,
            {"nlp": 2.0, "vision": 2.0, "ranking": 2.0},
            {"nina": 2.0, "vic": 2.0, "bob": 2.0},
        ),
        ("tess", Role.TEAM_ADMIN, "research", {"nlp": 2.0, "vision": 2.0}, {"nina": 2.0, "vic": 2.0}),
        ("alice", Role.MEMBER, "nlp", {"nlp": 2.0}, {"nina": 2.0}),
        ("victor", Role.VIEWER, "nlp", {"nlp": 2.0}, {"nina": 2.0}),
        ("vera", Role.VIEWER, None, {"nlp": 2.0, "vision": 2.0, "ranking": 2.0}, {"nina": 2.0, "vic": 2.0, "bob": 2.0}),
    ],
)
def test_usage_shows_only_the_callers_queues(
    svc: Service, user: str, role: Role, scope: str | None, queues: dict[str, float], users: dict[str, float]
) -> None:
    t0 = svc.clock.t
    ids = _seed_jobs(svc)
    svc.clock.advance(3600)
    for jid in ids.values():
        svc.executor.exit(jid, 0)
    svc.tick()
    u = svc.client(user, role, scope).get("/v1/usage", params={"since": t0}).json()
    assert {q["queue"]: q["gpu_hours"] for q in u["queues"]} == queues
    assert {x["user"]: x["gpu_hours"] for x in u["users"]} == users
    # Idle capacity is the pool's, the same for everybody: 8 GPUs x 1 h - 6 GPU-hours held.
    assert u["pools"][0]["idle_gpu_hours"] == 2.0


@pytest.mark.parametrize(
    ("user", "role", "scope", "sees"),
    [
        ("root", Role.PLATFORM_ADMIN, None, {"nlp", "vision", "ranking"}),
        ("tess", Role.TEAM_ADMIN, "research", {"nlp", "vision"}),
        ("alice", Role.MEMBER, "nlp", {"nlp"}),
        ("victor", Role.VIEWER, "nlp", {"nlp"}),
        ("vera", Role.VIEWER, None, {"nlp", "vision", "ranking"}),
    ],
)
def test_pools_hide_other_teams_job_ids(svc: Service, user: str, role: Role, scope: str | None, sees: set[str]) -> None:
    ids = _seed_jobs(svc)
    pools = svc.client(user, role, scope).get("/v1/pools").json()["pools"]
    held = [g["job"] for g in pools[0]["nodes"][0]["gpus"]]
    expected = [ids[q] if q in sees else "hidden" for q in ("nlp", "vision", "ranking") for _ in range(2)]
    assert sorted(held, key=str) == sorted(expected + [None, None], key=str)


# ----- what a team admin may change in the queue tree -----


def _edit(doc: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for q in out["queues"]:
        if q["name"] == name:
            q.update(fields)
    return out


def _add(doc: dict[str, Any], queue: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["queues"].append(queue)
    return out


def _without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {"queues": [q for q in copy.deepcopy(doc)["queues"] if q["name"] != name]}


BASE = tree(nlp=1)  # research (quota 4) has room to shrink to 3 without its children breaking the tree


@pytest.mark.parametrize(
    ("change", "document", "status", "refused"),
    [
        ("nlp quota 1 -> 2", _edit(BASE, "nlp", quota={"local": 2}), 200, None),
        ("vision weight 1 -> 3", _edit(BASE, "vision", weight=3), 200, None),
        ("add speech under research", _add(BASE, {"name": "speech", "parent": "research"}), 200, None),
        ("remove vision", _without(BASE, "vision"), 200, None),
        ("its own queue's quota", _edit(BASE, "research", quota={"local": 3}), 403, "research"),
        ("its own queue's limit", _edit(BASE, "research", limit={"local": 8}), 403, "research"),
        ("another department's leaf", _edit(BASE, "ranking", quota={"local": 3}), 403, "ranking"),
        ("another department", _edit(BASE, "product", limit={"local": 8}), 403, "product"),
        ("add a top-level queue", _add(BASE, {"name": "ops"}), 403, "ops"),
        ("add a queue under product", _add(BASE, {"name": "ads", "parent": "product"}), 403, "ads"),
        (
            "remove its own queue",
            {"queues": [q for q in _without(BASE, "research")["queues"] if q.get("parent") != "research"]},
            403,
            "research",
        ),
        pytest.param(
            "move vision under product", _edit(BASE, "vision", parent="product", quota={"local": 0}), 403, "vision"
        ),
    ],
)
def test_team_admin_changes_only_queues_below_its_scope(
    svc: Service, change: str, document: dict[str, Any], status: int, refused: str | None
) -> None:
    assert svc.admin.post("/v1/queues/apply", json={"document": BASE}).json()["applied"]
    tess = svc.client("tess", Role.TEAM_ADMIN, "research")
    before = svc.admin.get("/v1/queues/history").json()["versions"]
    r = tess.post("/v1/queues/apply", json={"document": document, "comment": change})
    assert r.status_code == status, r.text
    after = svc.admin.get("/v1/queues/history").json()["versions"]
    if status == 200:
        assert r.json()["applied"] is True
        assert after[-1]["author"] == "tess" and after[-1]["document"] == document
    else:
        err = r.json()["error"]
        assert (err["code"], err["where"]) == ("forbidden", refused)
        assert err["message"] == f"tess (team-admin) may not change queue {refused}"
        assert after == before


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(("/v1/queues/apply", {"document": DEMO_TREE}), id="apply"),
        pytest.param(("/v1/queues/rollback", {"version": 2}), id="rollback"),
    ],
)
def test_viewer_may_not_write_queues_even_a_no_op(svc: Service, request_: tuple[str, dict[str, Any]]) -> None:
    path, body = request_
    r = svc.client("victor", Role.VIEWER, "nlp").post(path, json=body)
    assert r.status_code == 403, r.text


# ----- the audit log -----


def test_audit_records_who_did_what(svc: Service) -> None:
    alice = svc.client("alice", Role.MEMBER, "nlp")
    tess = svc.client("tess", Role.TEAM_ADMIN, "research")
    jid = alice.post("/v1/jobs", json=job()).json()["id"]
    alice.post(f"/v1/jobs/{jid}/cancel")
    doc = _edit(DEMO_TREE, "nlp", quota={"local": 1})
    version = tess.post("/v1/queues/apply", json={"document": doc, "comment": "nlp shrinks"}).json()["version"]
    token = tess.post("/v1/tokens", json={"user": "nick", "role": "viewer", "scope": "vision"}).json()
    tess.delete(f"/v1/tokens/{token['id']}")
    entries = svc.admin.get("/v1/audit").json()["entries"]  # newest first
    got = [(e["actor"], e["action"], e["target"]) for e in entries[:5]]
    assert got == [
        ("tess", "token.revoke", f"token {token['id']}"),
        ("tess", "token.create", f"token {token['id']}"),
        ("tess", "queues.apply", f"version {version}"),
        ("alice", "job.cancel", f"job {jid}"),
        ("alice", "job.submit", f"job {jid}"),
    ]
    revoke, create, apply, _, submit = entries[:5]
    assert submit["detail"] == {"queue": "nlp"}
    assert apply["detail"]["comment"] == "nlp shrinks"
    assert apply["detail"]["diff"] == [
        {"queue": "nlp", "change": "changed", "fields": {"quota": {"before": {"local": 2}, "after": {"local": 1}}}}
    ]
    assert create["detail"] == {"user": "nick", "role": "viewer", "scope": "vision"}
    assert revoke["detail"] == {"user": "nick"}
    assert all(e["at"] == svc.clock.t for e in entries[:5])
    assert "secret" not in str(entries) and token["token"] not in str(entries)


def test_refused_requests_leave_no_audit_entry(svc: Service) -> None:
    bob = svc.client("bob", Role.MEMBER, "ranking")
    jid = svc.admin.post("/v1/jobs", json=job()).json()["id"]
    n = len(svc.admin.get("/v1/audit", params={"limit": 1000}).json()["entries"])
    assert bob.post("/v1/jobs", json=job("nlp")).status_code == 403
    assert bob.post(f"/v1/jobs/{jid}/cancel").status_code == 404
    assert bob.post("/v1/queues/apply", json={"document": _edit(DEMO_TREE, "nlp", weight=2)}).status_code == 403
    assert bob.post("/v1/tokens", json={"user": "x", "role": "member", "scope": "nlp"}).status_code == 403
    assert len(svc.admin.get("/v1/audit", params={"limit": 1000}).json()["entries"]) == n
