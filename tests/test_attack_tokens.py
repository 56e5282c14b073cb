"""Attacks on tokens and identities (issue 21 items 4 and 9): a team admin forging an approver or another team's
user, members minting tokens, the last platform-admin token revoked, and the way back (`token create --local`).

The team admin is tess (team-admin of research: nlp and vision below it); olga and owen are nlp's model owners
(approvers), bob is a member of ranking (another team). Runs on SQLite and on PostgreSQL (when
CORRAL_TEST_POSTGRES_URL names a server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from quotas import QueueTree
from scheduler.cli.main import app as cli_app
from scheduler.service.api.auth import NameRecord, Principal, Role
from scheduler.service.api.routes_cluster import DEFAULT_TOKEN_DAYS
from scheduler.service.core import local_tokens
from scheduler.service.core.queues import build_tree
from scheduler.service.store.db import tokens
from tests import attack_kit
from tests.factories import service_settings
from tests.service_kit import DEMO_TREE, Service, make_service
from tests.test_models_service import POLICY, register

FORGE = "4 forged approver"
LOCKOUT = "9 admin lockout"


def _mint(c: TestClient, user: str, role: str, scope: str | None = None, **extra: Any) -> Any:
    return c.post("/v1/tokens", json={"user": user, "role": role, "scope": scope, **extra})


def _refused(r: Any, code: int = 403, where: str | None = None, says: str = "") -> None:
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert where is None or err["where"] == where, err
    assert says in err["message"], err


def _token_ids(svc: Service, user: str) -> list[int]:
    with svc.core.db.connect() as conn:
        return list(conn.execute(sa.select(tokens.c.id).where(tokens.c.user == user).order_by(tokens.c.id)).scalars())


def _forget_tokens(svc: Service, user: str) -> None:
    """As if `user` had only ever called as a JupyterHub user: Corral has no token of that name."""
    with svc.core.db.begin() as conn:
        conn.execute(tokens.delete().where(tokens.c.user == user))


def _as(svc: Service, secret: str) -> TestClient:
    c = TestClient(svc.admin.app)
    c.headers["Authorization"] = f"Bearer {secret}"
    return c


@pytest.fixture
def people(svc: Service) -> dict[str, TestClient]:
    out = {
        "tess": svc.client("tess", Role.TEAM_ADMIN, "research"),
        "pam": svc.client("pam", Role.TEAM_ADMIN, "product"),
        "nate": svc.client("nate", Role.TEAM_ADMIN, "nlp"),
        "olga": svc.client("olga", Role.MODEL_OWNER, "nlp"),
        "owen": svc.client("owen", Role.MODEL_OWNER, "nlp"),
        "alice": svc.client("alice", Role.MEMBER, "nlp"),
        "vic": svc.client("vic", Role.VIEWER, "nlp"),
        "bob": svc.client("bob", Role.MEMBER, "ranking"),
    }
    # ghost once had a ranking token, now revoked: the name is still ranking's.
    ghost = _mint(svc.admin, "ghost", "member", "ranking").json()
    assert svc.admin.delete(f"/v1/tokens/{ghost['id']}").status_code == 200
    return out


# ----- a team admin's bounds -----


@pytest.mark.parametrize(
    ("user", "role", "scope", "where", "says"),
    [
        ("mallory", "model-owner", "nlp", "role", "may not create a model-owner token"),
        ("mallory", "model-owner", "research", "role", "may not create a model-owner token"),
        ("mallory", "platform-admin", None, "role", "may not create a platform-admin token"),
        ("mallory", "platform-admin", "research", "role", "may not create a platform-admin token"),
        ("olga", "member", "nlp", "user", "already has a model-owner token"),  # an approver, inside tess's subtree
        ("olga", "team-admin", "research", "user", "already has a model-owner token"),
        ("owen", "viewer", "vision", "user", "already has a model-owner token"),
        ("bob", "member", "nlp", "user", "already has a member token for ranking"),  # another team's user
        ("pam", "viewer", "nlp", "user", "already has a team-admin token for product"),  # another team's admin
        ("root", "member", "nlp", "user", "already has a platform-admin token"),  # the platform admin
        ("ghost", "member", "nlp", "user", "already has a member token for ranking"),  # revoked, still ranking's
        ("system:cluster", "member", "nlp", "user", "reserved"),  # the cluster's own jobs
        ("System:Cluster", "member", "nlp", "user", "reserved"),
        ("system:anything", "viewer", "vision", "user", "reserved"),
        ("mallory", "member", "ranking", "scope", "for ranking"),  # outside its subtree
        ("mallory", "member", "product", "scope", "for product"),
        ("mallory", "viewer", None, "scope", "for every queue"),
    ],
)
def test_team_admin_may_not_forge_identities_or_exceed_its_roles(
    svc: Service, people: dict[str, TestClient], user: str, role: str, scope: str | None, where: str, says: str
) -> None:
    before = _token_ids(svc, user)
    attack_kit.attempt(FORGE)
    _refused(_mint(people["tess"], user, role, scope), 403, where, says)
    assert _token_ids(svc, user) == before  # nothing was made
    audit = svc.admin.get("/v1/audit", params={"limit": 1000}).json()["entries"]
    assert not [e for e in audit if e["actor"] == "tess"]  # and a refusal leaves no audit entry


def test_a_sub_team_admin_may_not_take_a_sibling_teams_name(svc: Service, people: dict[str, TestClient]) -> None:
    assert _mint(people["tess"], "vera", "member", "vision").status_code == 201  # vision's
    attack_kit.attempt(FORGE)
    _refused(_mint(people["nate"], "vera", "member", "nlp"), 403, "user", "member token for vision")
    attack_kit.attempt(FORGE)
    _refused(_mint(people["pam"], "vera", "member", "ranking"), 403, "user", "member token for vision")


def test_names_that_acted_elsewhere_or_approved_are_taken(svc: Service, people: dict[str, TestClient]) -> None:
    """Names Corral knows only from what they did (a JupyterHub user has no Corral token): a job in another team,
    or an approval, keeps the name out of a team admin's reach."""
    hubby = svc.client("hubby", Role.MEMBER, "ranking")
    assert hubby.post("/v1/jobs", json={"queue": "ranking", "command": ["true"]}).status_code == 201
    _forget_tokens(svc, "hubby")
    attack_kit.attempt(FORGE)
    _refused(_mint(people["tess"], "hubby", "member", "nlp"), 403, "user", "outside your scope (ranking)")

    _open_promotion(svc, people, approve_with="owen")
    _forget_tokens(svc, "owen")  # an approver known only from its approval (a hub model owner)
    attack_kit.attempt(FORGE)
    _refused(_mint(people["tess"], "owen", "member", "nlp"), 403, "user", "approved model promotions")
    _forget_tokens(svc, "olga")  # the requester
    attack_kit.attempt(FORGE)
    _refused(_mint(people["tess"], "olga", "member", "nlp"), 403, "user", "approved model promotions")


def test_what_a_team_admin_may_still_make(svc: Service, people: dict[str, TestClient]) -> None:
    tess = people["tess"]
    for user, role, scope in (
        ("newbie", "member", "nlp"),
        ("newbie", "viewer", "vision"),
        ("nadia", "team-admin", "research"),
        ("tess", "member", "nlp"),
    ):
        r = _mint(tess, user, role, scope)
        assert r.status_code == 201, r.text
    # A name whose only tokens were made inside the subtree stays the subtree's, revoked or not.
    made = _mint(tess, "rotating", "member", "nlp").json()
    assert tess.delete(f"/v1/tokens/{made['id']}").status_code == 200
    assert _mint(tess, "rotating", "member", "nlp").status_code == 201
    # A name tess's team used for jobs (no token): still hers.
    svc.client("worker", Role.MEMBER, "vision").post("/v1/jobs", json={"queue": "vision", "command": ["true"]})
    _forget_tokens(svc, "worker")
    assert _mint(tess, "worker", "member", "vision").status_code == 201


@pytest.mark.parametrize("caller", ["alice", "vic", "olga", "bob"])
@pytest.mark.parametrize(
    ("role", "scope"),
    [("member", "nlp"), ("viewer", "nlp"), ("model-owner", "nlp"), ("team-admin", "nlp"), ("platform-admin", None)],
)
def test_members_viewers_and_model_owners_mint_nothing(
    svc: Service, people: dict[str, TestClient], caller: str, role: str, scope: str | None
) -> None:
    attack_kit.attempt(FORGE)
    _refused(_mint(people[caller], f"new-{caller}", role, scope), 403, None, f"may not create a {role} token")
    assert _token_ids(svc, f"new-{caller}") == []


def test_team_admin_revokes_inside_its_scope_never_an_admin(svc: Service, people: dict[str, TestClient]) -> None:
    """A team admin cannot make an approver, but stops a leaked one of its own team at once; never a platform
    admin's token, nor another team's."""
    root_id = _token_ids(svc, "root")[0]
    for who, target in (("tess", root_id), ("pam", _token_ids(svc, "olga")[0]), ("nate", root_id)):
        attack_kit.attempt(FORGE)
        _refused(people[who].delete(f"/v1/tokens/{target}"), 404)
    assert people["olga"].get("/v1/jobs").status_code == 200
    assert people["tess"].delete(f"/v1/tokens/{_token_ids(svc, 'olga')[0]}").status_code == 200
    assert people["olga"].get("/v1/jobs").status_code == 401


def test_platform_admin_may_reuse_names_and_the_audit_log_says_so(svc: Service, people: dict[str, TestClient]) -> None:
    r = _mint(svc.admin, "olga", "member", "ranking")
    assert r.status_code == 201, r.text
    entry = svc.admin.get("/v1/audit", params={"limit": 1}).json()["entries"][0]
    assert (entry["actor"], entry["action"], entry["target"]) == ("root", "token.create", f"token {r.json()['id']}")
    assert entry["detail"] == {"user": "olga", "role": "member", "scope": "ranking"}
    # Corral's own name is reserved even for a platform admin.
    attack_kit.attempt(FORGE)
    _refused(_mint(svc.admin, "system:cluster", "platform-admin"), 403, "user", "reserved")


def test_with_a_hub_a_team_admin_makes_no_new_names(db_url: str, tmp_path: Path) -> None:
    """With JupyterHub in use, any new name may be a hub user's (an approver, another team's): Corral cannot list
    them, so only a platform admin makes tokens for new names; a team admin reissues its own."""
    svc = make_service(db_url, tmp_path, hub_api_url="http://127.0.0.1:9/hub/api")
    try:
        tess = svc.client("tess", Role.TEAM_ADMIN, "research")
        attack_kit.attempt(FORGE)
        _refused(_mint(tess, "hub-approver", "member", "nlp"), 403, "user", "JupyterHub")
        assert _mint(svc.admin, "svc-account", "member", "nlp").status_code == 201
        assert _mint(tess, "svc-account", "member", "nlp").status_code == 201  # reissued inside its subtree
    finally:
        svc.core.db.dispose()


def test_a_hub_user_with_a_reserved_name_is_refused(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JupyterHub account named system:cluster would own the cluster's jobs in Corral: refused at the door."""
    names = {"hub-secret-1": "system:cluster", "hub-secret-2": "hanna"}

    def hub(request: httpx.Request) -> httpx.Response:
        name = names.get(request.headers["authorization"].removeprefix("token "))
        if name is None:
            return httpx.Response(403)
        return httpx.Response(200, json={"name": name, "groups": [], "scopes": ["custom:corral:submit"]})

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(hub), **kw))
    svc = make_service(db_url, tmp_path, hub_api_url="http://hub.invalid/hub/api")
    try:
        attack_kit.attempt(FORGE)
        _refused(_as(svc, "hub-secret-1").get("/v1/jobs"), 401, None, "reserved")
        assert _as(svc, "hub-secret-2").get("/v1/jobs").status_code == 200  # the hub itself is asked, and answers
    finally:
        svc.core.db.dispose()


# ----- approvals: a forged approver cannot approve -----


def _open_promotion(svc: Service, people: dict[str, TestClient], approve_with: str | None = None) -> int:
    """olga asks to promote sentiment v1 to production (one approval needed); optionally someone approves it."""
    alice, olga = people["alice"], people["olga"]
    assert alice.post("/v1/models", json={"name": "sentiment", "queue": "nlp"}).status_code == 201
    assert olga.put("/v1/models/sentiment/policy", json={"document": POLICY}).status_code == 200
    register(svc, alice, "sentiment", 0.95, "v1.pt")
    ask = olga.post("/v1/models/sentiment/promotions", json={"version": 1}).json()
    assert ask["state"] == "open", ask
    pid: int = ask["promotion"]
    if approve_with:
        assert people[approve_with].post(f"/v1/promotions/{pid}/approve").json()["state"] == "promoted"
    return pid


def test_a_team_admin_cannot_get_a_promotion_approved(svc: Service, people: dict[str, TestClient]) -> None:
    pid = _open_promotion(svc, people)
    tess = people["tess"]
    attack_kit.attempt(FORGE)
    _refused(_mint(tess, "mallory", "model-owner", "nlp"), 403, "role")
    attack_kit.attempt(FORGE)
    _refused(_mint(tess, "owen", "member", "nlp"), 403, "user")  # owen's name, to approve as owen
    # What a team admin can make cannot approve, under any name it can get.
    for user, role, scope in (("mallory", "member", "nlp"), ("mel", "team-admin", "research")):
        made = _mint(tess, user, role, scope)
        assert made.status_code == 201, made.text
        attack_kit.attempt(FORGE)
        _refused(_as(svc, made.json()["token"]).post(f"/v1/promotions/{pid}/approve"), 403, None, "may not approve")
    attack_kit.attempt(FORGE)
    _refused(tess.post(f"/v1/promotions/{pid}/approve"), 403, None, "may not approve")
    attack_kit.attempt(FORGE)
    _refused(people["olga"].post(f"/v1/promotions/{pid}/approve"), 403, "approver", "someone else")
    assert svc.admin.get(f"/v1/promotions/{pid}").json()["state"] == "open"
    # The real second person approves, and the record names them.
    assert people["owen"].post(f"/v1/promotions/{pid}/approve").json()["state"] == "promoted"
    trail = svc.admin.get("/v1/models/audit", params={"model": "sentiment"}).json()["entries"]
    assert [(e["actor"], e["action"]) for e in trail if e["action"].startswith("promotion.")] == [
        ("olga", "promotion.request"),
        ("owen", "promotion.approve"),
    ]


# ----- the last platform-admin token, and the way back -----


def test_the_last_platform_admin_token_cannot_be_revoked(svc: Service) -> None:
    (root_id,) = _token_ids(svc, "root")
    attack_kit.attempt(LOCKOUT)
    _refused(svc.admin.delete(f"/v1/tokens/{root_id}"), 409, None, "make another platform-admin token first")
    assert svc.admin.get("/v1/audit").status_code == 200  # still works

    # Another admin token that has expired does not count: it would leave nobody.
    soon = _mint(svc.admin, "temp-admin", "platform-admin", expires_in_days=1).json()
    svc.clock.advance(2 * 86400)
    attack_kit.attempt(LOCKOUT)
    _refused(svc.admin.delete(f"/v1/tokens/{root_id}"), 409)

    # With a second live one, the first may go; then the second is the last.
    second = _mint(svc.admin, "second-admin", "platform-admin").json()
    assert svc.admin.delete(f"/v1/tokens/{root_id}").status_code == 200
    admin2 = _as(svc, second["token"])
    attack_kit.attempt(LOCKOUT)
    _refused(admin2.delete(f"/v1/tokens/{second['id']}"), 409, None, "last live platform-admin token")
    # Revoking an admin token that is already dead changes nothing, so it is allowed.
    assert admin2.delete(f"/v1/tokens/{soon['id']}").status_code == 200
    assert admin2.get("/v1/audit").status_code == 200


def test_local_token_is_the_way_back(svc: Service, db_url: str, tmp_path: Path) -> None:
    """Every admin token gone (edited out in the database): whoever can open the database makes a new one."""
    with svc.core.db.begin() as conn:
        conn.execute(tokens.update().where(tokens.c.role == "platform-admin").values(revoked=True))
    svc.core.tokens.clear()
    assert svc.admin.get("/v1/audit").status_code == 401

    settings = service_settings(tmp_path, db_url)
    made = local_tokens.make(settings, "rescue", "platform-admin", None)
    rescue = _as(svc, made.secret)
    entries = rescue.get("/v1/audit").json()["entries"]
    assert entries[0]["action"] == "token.create" and entries[0]["actor"].startswith("local:")
    assert entries[0]["detail"] == {"user": "rescue", "role": "platform-admin", "scope": None, "local": True}
    assert made.expires_at is not None  # a recovery token expires like any other; make lasting ones through the API

    with pytest.raises(local_tokens.LocalTokenError, match="reserved"):
        local_tokens.make(settings, "system:cluster", "platform-admin", None)
    with pytest.raises(local_tokens.LocalTokenError, match="does not exist"):
        local_tokens.make(settings, "x", "member", "nope")
    with pytest.raises(local_tokens.LocalTokenError, match="role 'root'"):
        local_tokens.make(settings, "x", "root", None)


def test_token_create_local_on_the_command_line(
    svc: Service, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CORRAL_DATABASE_URL", "CORRAL_DATA_DIR", "CORRAL_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    r = runner.invoke(
        cli_app,
        [
            "token",
            "create",
            "--local",
            "--database-url",
            db_url,
            "--data-dir",
            str(tmp_path / "data"),
            "--user",
            "rescue",
            "--role",
            "platform-admin",
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert "shown only now" in r.stderr
    assert _as(svc, r.stdout.strip()).get("/v1/audit").status_code == 200
    # A data directory without the service's database: refused, and nothing is created there.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r = runner.invoke(
        cli_app, ["token", "create", "--local", "--data-dir", str(empty), "--user", "x", "--role", "platform-admin"]
    )
    assert r.exit_code == 1 and "no database at" in r.stderr
    assert list(empty.iterdir()) == []


def test_recovery_default_expiry_matches_the_api() -> None:
    assert local_tokens.DEFAULT_DAYS == DEFAULT_TOKEN_DAYS


# ----- the rule itself, as data -----


def _tree() -> QueueTree:
    return build_tree(DEMO_TREE, {"local": 8})


@pytest.mark.parametrize(
    ("record", "hub", "refused"),
    [
        (NameRecord(), False, None),
        (NameRecord(), True, "JupyterHub"),
        (NameRecord((("member", "nlp"), ("team-admin", "research")), frozenset({"vision"})), True, None),
        (NameRecord((("model-owner", "nlp"),)), False, "model-owner token"),
        (NameRecord((("member", None),)), False, "member token for every queue"),
        (NameRecord((("member", "gone-queue"),)), False, "gone-queue"),  # a queue since removed: not provably tess's
        (NameRecord(queues=frozenset({"nlp", "ranking"})), False, "outside your scope (ranking)"),
        (NameRecord(promotions=True), False, "promotions"),
    ],
)
def test_may_take_name(record: NameRecord, hub: bool, refused: str | None) -> None:
    tess = Principal("tess", Role.TEAM_ADMIN, "research")
    got = tess.may_take_name(_tree(), "someone", record, hub)
    assert got is None if refused is None else refused in (got or "")
    assert Principal("root", Role.PLATFORM_ADMIN).may_take_name(_tree(), "someone", record, hub) is None
