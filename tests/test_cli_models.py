"""`corral models ...` end to end: CliRunner against an in-process service (SQLite, scripted executor), each
command run with the token of the team member or model owner who would run it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from scheduler.cli import client as cli_client
from scheduler.cli.main import app
from scheduler.service.api.auth import Role
from scheduler.service.store.db import model_audit
from tests import attack_kit
from tests.service_kit import Service, make_service
from tests.test_models_service import POLICY, output_dir, trained

Corral = Callable[..., Result]


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)


@pytest.fixture
def corral(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Corral:
    """Run `corral ARGS...` against `service`; --token picks the caller (default: the platform admin).
    Asserts the exit status (code=)."""
    for var in ("CORRAL_URL", "CORRAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "cli-data"))  # no admin-token file there

    def client(url: str, token: str | None) -> TestClient:
        # A fresh client per command (the CLI closes it), carrying the --token given, else the admin's.
        c = TestClient(service.admin.app)
        c.headers.update({"Authorization": f"Bearer {token}"} if token else service.admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Result:
        r = runner.invoke(app, list(args), env={"COLUMNS": "200"})
        assert r.exit_code == code, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{r.exception!r}"
        return r

    return run


def token(service: Service, user: str, role: Role) -> str:
    """The secret of a token for `user` in the nlp team (service_kit keeps it in the client's header)."""
    header: str = service.client(user, role, "nlp").headers["Authorization"]
    return header.removeprefix("Bearer ")


@pytest.fixture
def as_user(service: Service) -> dict[str, list[str]]:
    """--token arguments per person: alice is a member, olga and owen are model owners of nlp."""
    return {
        "alice": ["--token", token(service, "alice", Role.MEMBER)],
        "olga": ["--token", token(service, "olga", Role.MODEL_OWNER)],
        "owen": ["--token", token(service, "owen", Role.MODEL_OWNER)],
    }


def test_the_golden_path_from_the_command_line(
    corral: Corral, service: Service, as_user: dict[str, list[str]], tmp_path: Path
) -> None:
    alice, olga, owen = as_user["alice"], as_user["olga"], as_user["owen"]
    alice_api = service.client("alice", Role.MEMBER, "nlp")
    assert (
        corral("models", "create", "sentiment", "--queue", "nlp", "--description", "reviews", *alice).stdout.strip()
        == "created model sentiment (queue nlp)"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    assert (
        "applied policy version 1 to sentiment"
        in corral("models", "policy", "apply", "sentiment", "-f", str(policy), *olga).stdout
    )
    assert (
        "may not set the promotion policy"
        in corral("models", "policy", "apply", "sentiment", "-f", str(policy), *alice, code=1).stderr
    )

    job1, _ = trained(service, alice_api, 0.91, "v1.pt", b"w1")
    reg = corral("models", "register", "sentiment", "--job", str(job1), "--artifact", "v1.pt", *alice)
    assert f"registered sentiment v1 from job {job1} (sha256 " in reg.stdout

    # The requester sees every gate with its evidence; the approval one waits for someone else.
    ask = corral("models", "promote", "sentiment", "--version", "1", *olga)
    for gate, status in (("metric accuracy >= 0.9", "PASS"), ("approvals 0/1", "PENDING"), ("digest", "PASS")):
        assert any(gate in line and status in line for line in ask.stdout.splitlines()), ask.stdout
    assert "promotion 1: sentiment v1 to production: open" in ask.stdout
    assert "corral models approve 1" in ask.stderr
    assert "someone else" in corral("models", "approve", "1", *olga, code=1).stderr
    done = corral("models", "approve", "1", *owen)
    assert "approvals 1/1" in done.stdout and "promotion 1: sentiment v1 to production: promoted" in done.stdout

    # v2 is better; -o json answers the API's data.
    job2, v2_path = trained(service, alice_api, 0.95, "v2.pt", b"w2", hours=2)
    made = json.loads(
        corral(
            "models",
            "register",
            "sentiment",
            "--job",
            str(job2),
            "--artifact",
            v2_path,
            "--lineage-job",
            str(job1),
            "-o",
            "json",
            *alice,
        ).stdout
    )
    assert made["version"] == 2 and made["lineage"]["jobs"] == sorted([job1, job2])
    ask2 = json.loads(corral("models", "promote", "sentiment", "--version", "2", "-o", "json", *owen).stdout)
    assert ask2["state"] == "open"
    assert (
        json.loads(corral("models", "approve", str(ask2["promotion"]), "-o", "json", *olga).stdout)["state"]
        == "promoted"
    )

    shown = json.loads(corral("models", "show", "sentiment", "-o", "json", *alice).stdout)
    assert shown["aliases"]["production"]["version"] == 2 and shown["aliases"]["production"]["previous"] == 1
    assert shown["policy"]["version"] == 1
    table = corral("models", "show", "sentiment", *alice).stdout
    assert "policy: version 1" in table and "accuracy=0.95" in table and "imdb-test" in table
    listed = corral("models", "ls", *alice).stdout
    assert any(line.split()[:5] == ["sentiment", "nlp", "v2", "-", "v2"] for line in listed.splitlines()), listed
    assert yaml.safe_load(corral("models", "ls", "-o", "yaml", *alice).stdout)["models"][0]["name"] == "sentiment"

    manifest = yaml.safe_load(corral("models", "deploy", "sentiment", "--dry-run", *alice).stdout)
    assert manifest["kind"] == "InferenceService"
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == str(output_dir(service, job2) / "v2.pt")
    plain = yaml.safe_load(
        corral(
            "models",
            "deploy",
            "sentiment",
            "--kind",
            "deployment",
            "--namespace",
            "ml",
            "--image",
            "me/serve:1",
            "--gpus",
            "2",
            "--dry-run",
            *alice,
        ).stdout
    )
    assert (plain["kind"], plain["metadata"]["namespace"]) == ("Deployment", "ml")
    assert "me/serve:1" in json.dumps(plain)
    refused = corral("models", "deploy", "sentiment", *alice, code=2)
    assert "Kubernetes backend" in refused.stderr and "--dry-run" in refused.stderr
    assert (
        "no staging version"
        in corral("models", "deploy", "sentiment", "--stage", "staging", "--dry-run", *alice, code=1).stderr
    )

    roi = corral("models", "roi", "sentiment", *alice).stdout
    assert "production v2: 6.00 GPU-hours" in roi  # v2's lineage: job2 (2 h) and job1 (1 h), both on 2 GPUs
    assert json.loads(corral("models", "roi", "sentiment", "-o", "json", *alice).stdout)["production"]["version"] == 2

    back = corral("models", "rollback", "sentiment", *owen)
    assert back.stdout.strip() == "sentiment production is v1 again (rolled back from v2)"
    assert (
        "no previous staging version"
        in corral("models", "rollback", "sentiment", "--stage", "staging", *owen, code=1).stderr
    )

    audit = corral("models", "audit", "--model", "sentiment", "--verify", *olga)
    actions = [line.split()[4] for line in audit.stdout.splitlines()[1:]]
    assert actions == [
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
    assert "audit chain intact: 11 entries verified" in audit.stderr
    head = next(line.split()[-1] for line in audit.stderr.splitlines() if line.startswith("head: seq 11 "))
    assert "holding head" in corral("models", "audit", "--model", "sentiment", "--verify", "--head", head, *olga).stderr
    assert "promotion 2: v2 to production (3 pass, 1 pending)" in audit.stdout
    assert "production back to v1 from v2" in audit.stdout
    # Only platform admins read the whole chain.
    assert "name a model" in corral("models", "audit", *olga, code=1).stderr


def test_a_gate_that_fails_rejects_with_exit_1(
    corral: Corral, service: Service, as_user: dict[str, list[str]], tmp_path: Path
) -> None:
    alice, olga = as_user["alice"], as_user["olga"]
    corral("models", "create", "m", "--queue", "nlp", *alice)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))  # JSON is YAML
    corral("models", "policy", "apply", "m", "-f", str(policy), *olga)
    job, _ = trained(service, service.client("alice", Role.MEMBER, "nlp"), 0.85, "a", b"a")
    corral("models", "register", "m", "--job", str(job), "--artifact", "a", *alice)
    r = corral("models", "promote", "m", "--version", "1", "--stage", "staging", *olga, code=1)
    assert any(
        "metric accuracy >= 0.9" in line and "FAIL" in line and "0.85" in line for line in r.stdout.splitlines()
    ), r.stdout
    assert "promotion 1: m v1 to staging: rejected" in r.stdout
    assert "rejected by: metric accuracy >= 0.9" in r.stderr
    # With -o json the data is still printed, and the exit status still says it was rejected.
    r2 = corral("models", "promote", "m", "--version", "1", "--stage", "staging", "-o", "json", *olga, code=1)
    assert json.loads(r2.stdout)["state"] == "rejected"


def test_typed_in_metrics_and_references_are_refused(corral: Corral, service: Service) -> None:
    corral("models", "create", "m", "--queue", "nlp")
    job, _ = trained(service, service.client("alice", Role.MEMBER, "nlp"), 0.053)
    for flags in (
        ["--metric", "accuracy=0.999"],
        ["--eval-set", "imdb-test"],
        ["--code", "git:abc"],
        ["--dataset", "imdb@2024"],
    ):
        attack_kit.attempt("5 typed-in metrics")
        bad = corral("models", "register", "m", "--job", str(job), "--artifact", "w.pt", *flags, code=2)
        assert f"{flags[0]}: not accepted" in bad.stderr and "metrics.json" in bad.stderr
    assert "no versions yet" in corral("models", "show", "m").stdout
    assert "--metric" not in corral("models", "register", "--help").stdout


def test_audit_head_must_still_be_in_the_chain(corral: Corral, service: Service) -> None:
    corral("models", "create", "m", "--queue", "nlp")
    corral("models", "create", "n", "--queue", "vision")
    head = json.loads(corral("models", "audit", "-o", "json").stdout)["head"]["hash"]
    with service.core.db.begin() as conn:
        conn.execute(sa.delete(model_audit).where(model_audit.c.seq == 2))
    attack_kit.attempt("6 audit truncation")
    assert "audit chain intact" in corral("models", "audit", "--verify").stderr
    r = corral("models", "audit", "--verify", "--head", head, code=1)
    assert "newest rows were removed" in r.stderr
    assert "--head is checked by --verify" in corral("models", "audit", "--head", head, code=2).stderr


def test_usage_errors_exit_2(corral: Corral, tmp_path: Path) -> None:
    listy = tmp_path / "p.yaml"
    listy.write_text("- staging\n")
    assert "expected a mapping" in corral("models", "policy", "apply", "m", "-f", str(listy), code=2).stderr
    assert "cannot read" in corral("models", "policy", "apply", "m", "-f", str(tmp_path / "none.yaml"), code=2).stderr
    assert corral("models", "promote", "m", "--version", "1", "--stage", "prod", code=2).exit_code == 2


def test_a_bad_policy_is_refused_with_where(corral: Corral, service: Service, tmp_path: Path) -> None:
    corral("models", "create", "m", "--queue", "nlp")
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages:\n  prod: {}\n")
    assert "unknown stage 'prod'" in corral("models", "policy", "apply", "m", "-f", str(policy), code=1).stderr


def test_audit_verify_exits_1_and_names_each_problem(corral: Corral, service: Service, tmp_path: Path) -> None:
    corral("models", "create", "m", "--queue", "nlp")
    corral("models", "create", "n", "--queue", "vision")
    assert "audit chain intact: 2 entries" in corral("models", "audit", "--verify").stderr
    with service.core.db.begin() as conn:
        conn.execute(sa.update(model_audit).where(model_audit.c.seq == 1).values(actor="mallory"))
    r = corral("models", "audit", "--verify", code=1)
    assert "broken:" in r.stderr and "the audit chain is broken" in r.stderr
    assert "mallory" in r.stdout  # the entries are still shown
    data = json.loads(corral("models", "audit", "--verify", "-o", "json", code=1).stdout)
    assert data["verified"]["intact"] is False and data["verified"]["problems"]
    assert corral("models", "audit").exit_code == 0  # without --verify nothing is checked


def test_empty_registry_and_missing_model(corral: Corral) -> None:
    assert "no models" in corral("models", "ls").stderr
    assert "model 'nope' not found [not_found]" in corral("models", "show", "nope", code=1).stderr
    corral("models", "create", "m", "--queue", "nlp")
    assert "no versions yet" in corral("models", "show", "m").stdout
    assert "already exists" in corral("models", "create", "m", "--queue", "nlp", code=1).stderr
    assert "no versions yet" in corral("models", "roi", "m").stdout


def test_audit_stays_readable_at_80_columns(corral: Corral, service: Service) -> None:
    """A long detail used to squeeze every other column to nothing at 80 columns; now the short columns stay on
    one line and the detail wraps below its entry."""
    corral("models", "create", "sentiment-classifier", "--queue", "nlp")
    corral("models", "create", "n", "--queue", "vision")
    detail = {"version": 3, "job": 17, "digest": "ab" * 32, "metrics": {"accuracy": 0.91, "f1": 0.88, "loss": 0.12}}
    with service.core.db.begin() as conn:  # a version's entry, as a registration writes it (the chain is not checked)
        conn.execute(
            sa.update(model_audit).where(model_audit.c.seq == 1).values(action="version.register", detail=detail)
        )
    out = CliRunner().invoke(app, ["models", "audit"], env={"COLUMNS": "80"}).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "AT", "ACTOR", "ACTION", "MODEL"]
    assert lines[1].split()[3:] == ["root", "version.register", "sentiment-classifier"]
    assert "v3 from job 17, sha256 abababababab" in out and "loss=0.12" in out
    assert all(len(line) <= 80 for line in lines)
    wide = corral("models", "audit").stdout  # 200 columns: the table, detail in its own column
    assert wide.splitlines()[0].split() == ["SEQ", "AT", "ACTOR", "ACTION", "MODEL", "DETAIL"]
