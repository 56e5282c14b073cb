"""The API end to end over a real database (SQLite and PostgreSQL), with a scripted executor and clock."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sandbox.culling import GpuSample
from scheduler.service.api.auth import Principal, Role
from scheduler.service.api.errors import Conflict
from scheduler.service.core import launching
from scheduler.service.core.assemble import build_core
from scheduler.service.core.intake import Submission, write
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit
from tests.service_kit import ScriptedExecutor, Service, gpus


def job(queue: str = "nlp", gpus: int = 1, **kw: Any) -> dict[str, Any]:
    return {"name": "train", "queue": queue, "gpus": gpus, "command": ["python", "train.py"], **kw}


def test_submit_runs_and_completes(svc: Service) -> None:
    r = svc.admin.post("/v1/jobs", json=job(gpus=2))
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    assert r.json()["state"] == "pending"
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert got["state"] == "running"
    assert got["attempts"][0]["placement"] == [["localhost", [0, 1]]]
    assert svc.executor.launched[0].gpus == {"localhost": [0, 1]}
    svc.executor.exit(jid, 0)
    svc.clock.advance(10)
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert (got["state"], got["exit_code"]) == ("completed", 0)
    kinds = [e["kind"] for e in svc.admin.get(f"/v1/jobs/{jid}/events").json()["events"]]
    assert kinds == ["submitted", "admitted", "started", "exited"]


def test_failed_exit_code_is_recorded(svc: Service) -> None:
    jid = svc.admin.post("/v1/jobs", json=job()).json()["id"]
    svc.tick()
    svc.executor.exit(jid, 3)
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert (got["state"], got["exit_code"]) == ("failed", 3)


def test_idempotency_key_returns_the_first_job(svc: Service) -> None:
    a = svc.admin.post("/v1/jobs", json=job(idempotency_key="k1"))
    b = svc.admin.post("/v1/jobs", json=job(idempotency_key="k1"))
    assert (a.status_code, b.status_code) == (201, 200)
    assert a.json()["id"] == b.json()["id"]
    other = svc.admin.post("/v1/jobs", json=job(idempotency_key="k1", gpus=3))
    assert other.status_code == 409
    assert other.json()["error"]["detail"] == {"job": a.json()["id"], "fields": ["gpus"]}
    assert len(svc.admin.get("/v1/jobs").json()["jobs"]) == 1


def test_idempotency_key_repeated_inside_one_submission_group(svc: Service) -> None:
    """Submissions that arrive together are written as one group: a repeated key follows the same rule there."""
    root = Principal("root", Role.PLATFORM_ADMIN)
    same, changed, again = (Submission(root, JobSubmit(**job(idempotency_key="k2", gpus=g))) for g in (1, 3, 1))
    first = Submission(root, JobSubmit(**job(idempotency_key="k2")))
    write(svc.core, [first, same, changed, again])
    assert first.result is not None and first.result[1] is True
    assert same.result == again.result == (first.result[0], False)
    assert isinstance(changed.error, Conflict) and changed.error.detail == {
        "job": first.result[0]["id"],
        "fields": ["gpus"],
    }
    assert len(svc.admin.get("/v1/jobs").json()["jobs"]) == 1


def test_preemption_reclaims_quota_and_explains(svc: Service) -> None:
    borrowers = [svc.admin.post("/v1/jobs", json=job("ranking", 4)).json()["id"] for _ in range(2)]
    svc.tick()
    assert all(svc.admin.get(f"/v1/jobs/{b}").json()["state"] == "running" for b in borrowers)
    mine = svc.admin.post("/v1/jobs", json=job("nlp", 2)).json()["id"]
    svc.clock.advance(5)
    svc.tick()  # ranking (quota 4) borrowed 4: nlp takes its quota back
    states = {b: svc.admin.get(f"/v1/jobs/{b}").json()["state"] for b in borrowers}
    victim = next(b for b, s in states.items() if s == "pending")
    why = svc.admin.get(f"/v1/jobs/{victim}/explain").json()
    assert why["preemptions"][0]["cause"] == "reclaim"
    assert why["preemptions"][0]["by"] == mine
    # The victim got SIGTERM; the scripted job exits at once, so the next cycle launches the preemptor.
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{mine}").json()["state"] == "running"


def test_preemptor_waits_for_the_victim_to_exit(svc: Service) -> None:
    svc.executor.exits_on_term = False
    victim = svc.admin.post("/v1/jobs", json=job("ranking", 8)).json()["id"]
    svc.tick()
    mine = svc.admin.post("/v1/jobs", json=job("nlp", 2)).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{mine}").json()["state"] == "starting"  # admitted, GPUs still held
    assert svc.executor.terminated == [(str(victim), 1)]
    svc.clock.advance(31)  # past the grace period: SIGKILL
    svc.tick()
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{mine}").json()["state"] == "running"
    attempts = svc.admin.get(f"/v1/jobs/{victim}").json()["attempts"]
    assert (attempts[0]["outcome"], attempts[0]["exit_code"]) == ("preempted", -9)


def test_pending_job_explains_its_blocking_rule(svc: Service) -> None:
    svc.admin.post("/v1/jobs", json=job("nlp", 2, preemptible=False))
    waiting = svc.admin.post("/v1/jobs", json=job("nlp", 1, preemptible=False)).json()["id"]
    svc.tick()
    why = svc.admin.get(f"/v1/jobs/{waiting}/explain").json()
    assert why["state"] == "pending"
    assert why["reason"]["rule"] == "guarantee"
    assert why["reason"]["numbers"]["quota"] == 2


def test_cancel_running_job_frees_gpus(svc: Service) -> None:
    jid = svc.admin.post("/v1/jobs", json=job("ranking", 8)).json()["id"]
    svc.tick()
    r = svc.admin.post(f"/v1/jobs/{jid}/cancel")
    assert r.json()["state"] == "cancelled"
    assert svc.admin.post(f"/v1/jobs/{jid}/cancel").status_code == 409
    svc.tick()
    other = svc.admin.post("/v1/jobs", json=job("vision", 8)).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{other}").json()["state"] == "running"


def test_max_runtime_is_enforced(svc: Service) -> None:
    jid = svc.admin.post("/v1/jobs", json=job(max_runtime=60)).json()["id"]
    svc.tick()
    svc.clock.advance(61)
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert (got["state"], got["reason"]["rule"]) == ("failed", "max_runtime")


def test_max_runtime_counts_from_each_attempts_start(svc: Service) -> None:
    """The next deadline is kept in memory between cycles: a job launched later, with a shorter limit, still
    stops on time, and the first one not before its own."""
    first = svc.admin.post("/v1/jobs", json=job(max_runtime=100)).json()["id"]
    svc.tick()
    svc.clock.advance(50)
    svc.tick()
    second = svc.admin.post("/v1/jobs", json=job(max_runtime=30)).json()["id"]
    svc.tick()
    svc.clock.advance(31)
    svc.tick()
    assert [svc.admin.get(f"/v1/jobs/{j}").json()["state"] for j in (first, second)] == ["running", "failed"]
    svc.clock.advance(18)
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{first}").json()["state"] == "running"
    svc.clock.advance(2)
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{first}").json()["reason"]["rule"] == "max_runtime"


def test_max_runtime_after_a_launch_whose_commit_was_reported_failed(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops during COMMIT, after the server applied it: the launch is recorded, yet the cycle
    failed. No later cycle records that launch again, so its max_runtime must already count."""
    svc.tick()  # nothing running: no deadline
    jid = svc.admin.post("/v1/jobs", json=job(max_runtime=30)).json()["id"]
    begin, lost = svc.core.db.begin, []

    @contextlib.contextmanager
    def commit_then_fail() -> Iterator[sa.Connection]:
        with begin() as conn:
            yield conn
        if not lost:
            lost.append(True)
            raise sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    record = launching._record

    def record_ambiguously(core: Any, *a: Any) -> bool:
        monkeypatch.setattr(core.db, "begin", commit_then_fail)
        try:
            return record(core, *a)
        finally:
            monkeypatch.setattr(core.db, "begin", begin)

    monkeypatch.setattr(launching, "_record", record_ambiguously)
    with pytest.raises(sa.exc.OperationalError):
        svc.tick()
    monkeypatch.setattr(launching, "_record", record)
    assert svc.admin.get(f"/v1/jobs/{jid}").json()["state"] == "running"
    svc.clock.advance(31)
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{jid}").json()["reason"]["rule"] == "max_runtime"


def test_an_idle_cycle_reads_nothing(svc: Service) -> None:
    """With nothing to launch and no max_runtime due, a cycle runs no query: under load each one held the
    scheduler's lock in front of every submission."""
    svc.admin.post("/v1/jobs", json=job(gpus=8, max_runtime=3600))
    svc.admin.post("/v1/jobs", json=job(gpus=8))  # waits behind the first
    svc.tick()
    svc.tick()
    statements: list[str] = []
    sa.event.listen(svc.core.db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    svc.clock.advance(60)
    svc.tick()
    assert statements == []


def test_queue_tree_shows_live_numbers(svc: Service) -> None:
    svc.admin.post("/v1/jobs", json=job("ranking", 6))
    svc.tick()
    tree = {q["name"]: q for q in svc.admin.get("/v1/queues").json()["queues"]}
    rk = tree["ranking"]["pools"]["local"]
    assert (rk["usage"], rk["quota"], rk["borrowed"], rk["np_usage"]) == (6, 4, 2, 0)
    assert tree["product"]["pools"]["local"]["usage"] == 6
    pools = svc.admin.get("/v1/pools").json()["pools"]
    held = [g["job"] for g in pools[0]["nodes"][0]["gpus"]]
    assert held.count(None) == 2


def test_queue_tree_counts_non_preemptible_gpus_up_the_tree(svc: Service) -> None:
    """np_usage is what the guarantee rule counts: notebooks and preemptible: false jobs, not batch jobs."""
    svc.admin.post("/v1/sandboxes", json={"queue": "nlp", "gpus": 1, "command": ["jupyterhub-singleuser"]})
    svc.admin.post("/v1/jobs", json={**job("nlp", 1), "preemptible": False})
    svc.admin.post("/v1/jobs", json=job("nlp", 3))
    svc.admin.post("/v1/jobs", json={**job("ranking", 1), "preemptible": False})
    svc.tick()
    tree = {q["name"]: q["pools"]["local"] for q in svc.admin.get("/v1/queues").json()["queues"]}
    assert {n: (p["usage"], p["np_usage"], p["quota"]) for n, p in tree.items()} == {
        "nlp": (5, 2, 2),
        "vision": (0, 0, 2),
        "research": (5, 2, 4),
        "ranking": (1, 1, 4),
        "product": (1, 1, 4),
    }


def test_queue_apply_diff_history_rollback(svc: Service) -> None:
    doc = {
        "queues": [dict(q) for q in svc.admin.get("/v1/queues/history").json()["versions"][-1]["document"]["queues"]]
    }
    doc["queues"][4]["quota"] = {"local": 3}
    dry = svc.admin.post("/v1/queues/apply", json={"document": doc, "dry_run": True}).json()
    assert dry["applied"] is False
    assert dry["diff"] == [
        {"queue": "ranking", "change": "changed", "fields": {"quota": {"before": {"local": 4}, "after": {"local": 3}}}}
    ]
    done = svc.admin.post("/v1/queues/apply", json={"document": doc, "comment": "shrink"}).json()
    assert done["applied"] is True
    versions = svc.admin.get("/v1/queues/history").json()["versions"]
    assert [v["author"] for v in versions] == ["corral", "root", "root"]
    back = svc.admin.post("/v1/queues/rollback", json={"version": 2}).json()
    assert back["applied"] and back["version"] == 4
    tree = {q["name"]: q for q in svc.admin.get("/v1/queues").json()["queues"]}
    assert tree["ranking"]["pools"]["local"]["quota"] == 4


def test_a_queue_apply_that_leaves_a_pending_job_no_way_to_run_rejects_it_with_the_reason(svc: Service) -> None:
    """A pending non-preemptible job asking 3 GPUs, then ranking's quota lowered to 2: the job could never run
    under the new tree. The next cycle rejects it with the engine's reason (it does not stay pending forever in the
    database while the rebuilt engine has rejected it)."""
    doc = {
        "queues": [dict(q) for q in svc.admin.get("/v1/queues/history").json()["versions"][-1]["document"]["queues"]]
    }
    svc.admin.post("/v1/jobs", json={**job("ranking", 4), "preemptible": False})
    svc.tick()  # ranking's guarantee (4) is held by a non-preemptible job: the next one waits on it
    jid = svc.admin.post("/v1/jobs", json={**job("ranking", 3), "preemptible": False}).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{jid}").json()["state"] == "pending"
    doc["queues"][4]["quota"] = {"local": 2}
    assert svc.admin.post("/v1/queues/apply", json={"document": doc}).json()["applied"]
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert got["state"] == "rejected" and "more than queue ranking's quota of 2" in got["reason"]["message"]


def test_usage_counts_gpu_hours(svc: Service) -> None:
    jid = svc.admin.post("/v1/jobs", json=job("nlp", 2)).json()["id"]
    t0 = svc.clock.t
    svc.tick()
    svc.clock.advance(3600)
    svc.executor.exit(jid, 0)
    svc.tick()
    u = svc.admin.get("/v1/usage", params={"since": t0, "until": t0 + 7200}).json()
    assert u["queues"] == [{"queue": "nlp", "gpu_hours": 2.0}]
    assert u["users"] == [{"user": "root", "gpu_hours": 2.0}]
    assert u["pools"][0]["idle_gpu_hours"] == 6.0  # 8 GPUs x 1 h (the clock stops at now) - 2


def test_metrics_expose_queues_and_waits(svc: Service) -> None:
    svc.admin.post("/v1/jobs", json=job("nlp", 2))
    svc.tick()
    text = svc.admin.get("/metrics").text
    assert 'corral_gpus{pool="local",queue="nlp",state="running"} 2.0' in text
    assert "corral_job_wait_seconds_bucket" in text
    assert "corral_scheduling_cycle_seconds_count" in text
    assert 'corral_fair_share_gpus{pool="local",queue="nlp"}' in text


def test_member_sees_only_team_jobs(svc: Service) -> None:
    alice = svc.client("alice", Role.MEMBER, "nlp")
    bob = svc.client("bob", Role.MEMBER, "ranking")
    jid = alice.post("/v1/jobs", json=job("nlp")).json()["id"]
    assert bob.get(f"/v1/jobs/{jid}").status_code == 404
    assert bob.post(f"/v1/jobs/{jid}/cancel").status_code == 404
    assert bob.get("/v1/jobs").json()["jobs"] == []
    assert [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]] == [jid]
    assert bob.post("/v1/jobs", json=job("nlp")).status_code == 403


def test_gpu_metrics_come_from_the_sampler(svc: Service) -> None:
    samples = {0: GpuSample(97.0, 2**30), 1: GpuSample(3.0, 0)}
    object.__setattr__(svc.core.cluster.nodes["localhost"], "sample", lambda: samples)
    text = svc.admin.get("/metrics").text
    assert 'corral_gpu_utilisation_percent{gpu="0",node="localhost",pool="local"} 97.0' in text
    assert 'corral_gpu_memory_used_bytes{gpu="0",node="localhost",pool="local"} 1.073741824e+09' in text


def test_concurrent_submissions_share_commits_and_keep_keys_unique(svc: Service) -> None:
    """Many threads at once: each idempotency key gives one job, a refused submission fails only itself."""
    bodies = [job(idempotency_key=f"k{i % 10}") for i in range(40)] + [job(queue="nope")] * 5 + [job()] * 15

    def send(body: dict[str, Any]) -> tuple[int, Any]:
        r = svc.admin.post("/v1/jobs", json=body)
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, bodies))
    by_key: dict[str, set[int]] = {}
    for (status, body), sent in zip(answers, bodies, strict=True):
        if sent["queue"] == "nope":
            assert status == 422
        elif "idempotency_key" in sent:
            assert status in (200, 201)
            by_key.setdefault(sent["idempotency_key"], set()).add(body["id"])
        else:
            assert status == 201
    assert all(len(ids) == 1 for ids in by_key.values()) and len(by_key) == 10
    assert len(svc.admin.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]) == 25
    assert len(svc.core.engine.jobs) == 25


def test_openapi_documents_every_route(svc: Service) -> None:
    paths = svc.admin.get("/openapi.json").json()["paths"]
    for p in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/explain",
        "/v1/jobs/{job_id}/events",
        "/v1/queues",
        "/v1/queues/apply",
        "/v1/queues/rollback",
        "/v1/pools",
        "/v1/usage",
        "/v1/tokens",
        "/v1/audit",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p


def test_tokens_expire(svc: Service) -> None:
    made = svc.admin.post(
        "/v1/tokens", json={"user": "tia", "role": "member", "scope": "nlp", "expires_in_days": 1}
    ).json()
    assert made["expires_at"] == svc.clock.t + 86400
    tia = {"Authorization": f"Bearer {made['token']}"}
    assert svc.admin.get("/v1/jobs", headers=tia).status_code == 200
    svc.clock.advance(86401)  # past its expiry, though it was just cached
    r = svc.admin.get("/v1/jobs", headers=tia)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    forever = svc.admin.post("/v1/tokens", json={"user": "bot", "role": "viewer", "expires_in_days": None}).json()
    assert forever["expires_at"] is None


def test_a_restart_with_fewer_gpus_keeps_running_on_the_tree(svc: Service, tmp_path: Path) -> None:
    """Nodes lost while Corral was down: the tree's quotas (8 GPUs) exceed what is left (4); Corral still starts."""
    s = ServiceSettings(data_dir=tmp_path / "data", database_url=svc.core.settings.url)
    core = build_core(s, ScriptedExecutor(), gpus(4), svc.clock)
    assert core.capacity == {"local": 4}
    assert core.tree["research"].quota_of("local") == 4


def test_the_engine_forgets_finished_jobs(svc: Service) -> None:
    """A long-running service: jobs that ended live on in the database only."""
    done = svc.admin.post("/v1/jobs", json=job()).json()["id"]
    gone = svc.admin.post("/v1/jobs", json=job()).json()["id"]
    svc.tick()
    svc.executor.exit(done, 0)
    svc.admin.post(f"/v1/jobs/{gone}/cancel")
    svc.tick()
    assert svc.core.engine.jobs == {}
    assert svc.admin.get(f"/v1/jobs/{done}/explain").json()["reason"]["rule"] == "completed"
