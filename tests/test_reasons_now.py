"""The reason a job waits, now, in every listing: GET /v1/jobs, GET /v1/jobs/{id} (what `corral ps`, the dashboard's
jobs page and the SDK's job card show) say what GET /v1/jobs/{id}/explain says, over random runs of submits,
scheduling cycles, exits, cancellations, preemptions (a team taking its quota back, a higher-priority job) and nodes
going down and up. A preempted job that waits again shows what holds it now, not its old preemption message."""

from __future__ import annotations

import html
import random
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler.backends.base import NodeChange
from scheduler.cli import client as cli_client
from scheduler.cli.main import app as cli_app
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import build_core, create_token
from tests.factories import service_settings
from tests.service_kit import Clock
from tests.test_cluster_sync import ClusterExecutor, node

TREE = {"queues": [{"name": "nlp", "quota": {"p": 4}}, {"name": "vision", "quota": {"p": 4}}]}
STEPS = 60


def world(tmp: Path) -> tuple[Any, ClusterExecutor, Clock, TestClient, TestClient]:
    ex, clock = ClusterExecutor(), Clock()
    core = build_core(
        service_settings(tmp, grace_s=5, starvation_timeout_s=30), ex, clock=clock, nodes=[node("a"), node("b")]
    )
    app = create_app(core, run_loop=False)
    admin = TestClient(app)
    admin.headers["Authorization"] = f"Bearer {create_token(core, 'root', Role.PLATFORM_ADMIN)}"
    assert admin.post("/v1/queues/apply", json={"document": TREE}).status_code == 200
    member = TestClient(app)  # a team member: other teams' job ids in reasons are hidden from it
    member.headers["Authorization"] = f"Bearer {create_token(core, 'ann', Role.MEMBER, 'nlp')}"
    return core, ex, clock, admin, member


def check(admin: TestClient, member: TestClient) -> tuple[int, int]:
    """Every job's listed reason is explain's, for an admin and for a team member; (pending jobs, of them
    preempted before)."""
    pending = requeued = 0
    for who in (admin, member):
        listed = who.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]
        for j in listed:
            why = who.get(f"/v1/jobs/{j['id']}/explain").json()
            one = who.get(f"/v1/jobs/{j['id']}").json()
            assert j["state"] == why["state"] == one["state"]
            assert j["reason"] == why["reason"] == one["reason"], (j["id"], j["state"])
            if who is admin and j["state"] == "pending":
                pending += 1
                requeued += bool(why["preemptions"])
    return pending, requeued


@pytest.mark.slow  # a long random simulation per seed
@pytest.mark.parametrize("seed", range(4))
def test_the_listed_reason_is_explains_reason_now(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    core, ex, clock, admin, member = world(tmp_path)
    down: set[str] = set()
    seen_pending = seen_requeued = 0
    for _ in range(STEPS):
        op = rnd.choice(["submit", "submit", "submit", "tick", "tick", "exit", "cancel", "node", "time"])
        if op == "submit":
            queue = rnd.choice(["nlp", "vision"])
            body = {
                "queue": queue,
                "gpus": rnd.choice([1, 2, 4]),
                "command": "sleep inf",
                "priority": rnd.choice([0, 0, 10]),
                "preemptible": rnd.random() < 0.85,
                "workers": rnd.choice([1, 1, 1, 2]),
            }
            r = admin.post("/v1/jobs", json=body)
            assert r.status_code == 201 or r.json()["error"]["detail"]["rule"] == "over_quota", r.text
        elif op == "exit" and ex.live:
            job_id, attempt = rnd.choice(sorted(ex.live))
            ex.exit(job_id, rnd.choice([0, 1]), attempt)
        elif op == "cancel":
            live = admin.get("/v1/jobs").json()["jobs"]
            if live:
                admin.post(f"/v1/jobs/{rnd.choice(live)['id']}/cancel")
        elif op == "node":
            name = rnd.choice(["a", "b"])
            ex.changes.append(NodeChange(name, node(name) if name in down else None))
            down ^= {name}
        elif op == "time":
            clock.advance(rnd.choice([1, 40]))
        core.tick()
        pending, requeued = check(admin, member)
        seen_pending += pending
        seen_requeued += requeued
    assert seen_pending > 0 and seen_requeued > 0  # preempted-then-pending jobs were checked


def test_a_preempted_job_shows_what_holds_it_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nlp borrows all 8 GPUs; vision takes its 4 back; the victims wait, held now by the engine's rule (not their
    preemption's message), in the API, in `corral ps` and in the jobs page."""
    core, ex, clock, admin, _ = world(tmp_path)
    borrowers = [
        admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 4, "command": "sleep inf"}).json()["id"] for _ in range(2)
    ]
    core.tick()
    core.tick()
    admin.post("/v1/jobs", json={"queue": "vision", "gpus": 4, "command": "sleep inf"})
    clock.advance(1)
    core.tick()
    core.tick()
    listed = {j["id"]: j for j in admin.get("/v1/jobs").json()["jobs"]}
    (victim,) = [i for i in borrowers if listed[i]["state"] == "pending"]
    why = admin.get(f"/v1/jobs/{victim}/explain").json()
    assert why["preemptions"] and listed[victim]["reason"] == why["reason"]
    assert listed[victim]["reason"]["message"] != why["preemptions"][0]["message"]  # not the old preemption

    def client(url: str, token: str | None) -> TestClient:
        c = TestClient(admin.app)
        c.headers.update(admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)
    out = CliRunner().invoke(cli_app, ["ps"], env={"COLUMNS": "400"}).stdout
    assert why["reason"]["message"] in out
    web = TestClient(admin.app)
    r = web.post("/ui/login", data={"token": create_token(core, "boss", Role.PLATFORM_ADMIN), "next": "/ui/jobs"})
    assert r.status_code in (200, 303)
    assert html.escape(why["reason"]["message"]) in web.get("/ui/jobs").text
