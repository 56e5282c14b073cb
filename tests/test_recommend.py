"""Quota recommendations: the rule (scheduler/sim/recommend.py) and `corral queue recommend` on a recorded history
where one team idles and another waits, checked by replaying it under both trees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from quotas import QuotaError
from scheduler.service.api.auth import Role
from scheduler.sim.recommend import compare, propose
from scheduler.sim.recorded import Demand
from tests import factories as f
from tests.service_kit import DEMO_TREE, Service
from tests.test_cli_service import Corral, corral, service  # noqa: F401  (fixtures)

HOUR = 3600.0
CAP = {"local": 8}


def d(queue: str, used: float = 0.0, waiting: float = 0.0, largest: int = 0, pool: str = "local") -> Demand:
    return Demand(queue, pool, used, waiting, 0, 0, 0.0, 0.0, largest)


def quotas(queues: list[dict[str, Any]], pool: str = "local") -> dict[str, int]:
    return {q["name"]: q.get("quota", {}).get(pool, 0) for q in queues}


def tops(queues: list[dict[str, Any]], pool: str = "local") -> int:
    return sum(q.get("quota", {}).get(pool, 0) for q in queues if q.get("parent") is None)


# ----- the rule -----


def test_idle_guarantee_moves_to_the_queue_that_waited() -> None:
    # ranking held nothing; nlp held 2 GPUs for 4 h and its jobs waited 12 GPU-hours: 5 GPUs asked on average.
    p = propose(DEMO_TREE["queues"], CAP, [d("nlp", used=8, waiting=12), d("vision", used=6)], hours=4)
    assert quotas(p.queues) == {"research": 7, "product": 1, "nlp": 5, "vision": 2, "ranking": 1}
    assert tops(p.queues) == tops(DEMO_TREE["queues"]) == 8
    assert {(c.queue, c.before, c.after) for c in p.changes} == {
        ("research", 4, 7),
        ("product", 4, 1),
        ("nlp", 2, 5),
        ("ranking", 4, 1),
    }
    why = {c.queue: c.why for c in p.changes}
    assert "waited 12.0 GPU-hours" in why["nlp"] and "held 0.00 GPUs on average" in why["ranking"]
    assert p.document == {"queues": p.queues}
    assert DEMO_TREE["queues"][2]["quota"] == {"local": 2}  # the input is not changed


def test_nothing_moves_when_nobody_waits_or_nothing_is_idle() -> None:
    assert propose(DEMO_TREE["queues"], CAP, [d("nlp", used=8)], hours=4).changes == []
    busy = [d("nlp", used=8, waiting=40), d("vision", used=8), d("ranking", used=16)]
    assert propose(DEMO_TREE["queues"], CAP, busy, hours=4).changes == []


def test_a_few_seconds_of_waiting_do_not_make_an_idle_queue_keep_its_guarantee() -> None:
    # Every recorded job waits a moment between submission and admission: a (5 ms) wait is not a short guarantee.
    queues = [{"name": "a", "quota": {"local": 6}}, {"name": "b", "quota": {"local": 2}}]
    blip = 5e-3 / HOUR
    p = propose(queues, CAP, [d("a", used=0.04 * 10, waiting=blip), d("b", used=20, waiting=30)], hours=10)
    assert quotas(p.queues) == {"a": 3, "b": 5}  # b asked for 5 GPUs on average: 3 more


def test_waiting_queues_share_in_proportion_to_their_waiting() -> None:
    queues = [
        {"name": "a", "quota": {"local": 6}},
        {"name": "b", "quota": {"local": 1}},
        {"name": "c", "quota": {"local": 1}},
    ]
    p = propose(queues, CAP, [d("b", waiting=200), d("c", waiting=100)], hours=10)
    assert quotas(p.queues) == {"a": 0, "b": 5, "c": 3}  # a's 6 spare GPUs: 4 and 2
    p = propose(queues, CAP, [d("b", waiting=300), d("c", waiting=100)], hours=10)
    assert quotas(p.queues) == {"a": 0, "b": 6, "c": 2}  # 4.5 and 1.5: the tie goes by name
    assert tops(p.queues) == 8


def test_limits_and_non_preemptible_jobs_bound_the_moves() -> None:
    queues = [
        {"name": "dept", "quota": {"local": 2}, "limit": {"local": 3}},
        {"name": "a", "parent": "dept", "quota": {"local": 2}, "limit": {"local": 8}},
        {"name": "idle", "quota": {"local": 6}},
    ]
    # a asks for 8 on average, but dept may hold only 3: one GPU of guarantee moves; idle keeps its notebook's 4.
    p = propose(queues, CAP, [d("a", used=20, waiting=60), d("idle", largest=4)], hours=10)
    assert quotas(p.queues) == {"dept": 3, "a": 3, "idle": 5}
    # Within one department no room above is needed; a queue's own limit still caps it.
    queues = [
        {"name": "dept", "quota": {"local": 8}, "limit": {"local": 8}},
        {"name": "a", "parent": "dept", "quota": {"local": 2}, "limit": {"local": 3}},
        {"name": "b", "parent": "dept", "quota": {"local": 6}},
    ]
    p = propose(queues, CAP, [d("a", used=20, waiting=60)], hours=10)
    assert quotas(p.queues) == {"dept": 8, "a": 3, "b": 5}
    assert yaml.safe_load(yaml.safe_dump(p.document)) == p.document


def test_pools_are_separate_and_bad_input_is_refused() -> None:
    queues = [{"name": "a", "quota": {"x": 4, "y": 4}}, {"name": "b", "quota": {"x": 4, "y": 4}}]
    p = propose(queues, {"x": 8, "y": 8}, [d("a", waiting=80, pool="x"), d("b", used=40, pool="y")], hours=10)
    assert quotas(p.queues, "x") == {"a": 8, "b": 0} and quotas(p.queues, "y") == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="longer than 0 hours"):
        propose(queues, {"x": 8, "y": 8}, [], hours=0)
    with pytest.raises(QuotaError):
        propose(queues, {"x": 4, "y": 8}, [], hours=1)


def test_replay_compares_both_trees() -> None:
    nodes = f.nodes("local", 1, 8)
    specs = [f.queue("a", quota={"local": 2}), f.queue("b", quota={"local": 6})]
    jobs = [f.sim_job(f"j{i}", 0, HOUR, "a", "local", gpus=2, preemptible=False) for i in range(3)]
    proposed = [{"name": "a", "quota": {"local": 6}}, {"name": "b", "quota": {}}]
    out = {o.queue: o for o in compare(f.world(nodes, specs, jobs), proposed)}
    a = out["a"]
    assert (a.jobs, a.mean_wait_before, a.mean_wait_after) == (3, HOUR, 0.0)
    assert (a.p95_wait_before, a.p95_wait_after) == (2 * HOUR, 0.0)
    assert a.gpu_hours_before == a.gpu_hours_after == 6.0


# ----- end to end: a recorded history, the recommendation, the replay, and queue apply -----


def waiting_history(svc: Service) -> float:
    """nlp runs four 2-GPU notebooks (non-preemptible: within its quota of 2 only), one hour each, so they run one
    after another and wait 0, 1, 2 and 3 hours; ranking's 4 guaranteed GPUs sit idle all along."""
    t0 = svc.clock.t
    ids = []
    for _ in range(4):
        r = svc.admin.post(
            "/v1/jobs", json={"queue": "nlp", "gpus": 2, "preemptible": False, "command": ["jupyter", "lab"]}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    svc.tick()
    for i in ids:
        svc.clock.advance(HOUR)
        svc.executor.exit(i, 0)
        svc.tick()
    return t0


def test_recommend_on_a_recorded_history(corral: Corral, service: Service, tmp_path: Path) -> None:  # noqa: F811
    t0 = waiting_history(service)
    out = tmp_path / "queues.yaml"
    text = corral("queue", "recommend", "--since", str(t0), "-o", str(out)).stdout
    assert "2 -> 5" in text and "4 -> 1" in text  # nlp and ranking
    replayed = text.split("replay of 4 recorded jobs")[1]
    assert ["nlp", "4", "90.0m", "->", "30.0m", "3.0h", "->", "60.0m", "8.0"] in [
        line.split() for line in replayed.splitlines()
    ]

    data = json.loads(corral("queue", "recommend", "--since", str(t0), "--json").stdout)
    replay = {o["queue"]: o for o in data["replay"]}
    assert replay["nlp"]["mean_wait_before"] == 1.5 * HOUR and replay["nlp"]["mean_wait_after"] == 0.5 * HOUR
    assert replay["nlp"]["gpu_hours_before"] == replay["nlp"]["gpu_hours_after"] == 8.0
    assert data["jobs"] == 4 and yaml.safe_load(out.read_text()) == data["proposal"]

    # The file goes through the same path as any queues.yaml: validated by the service, then applied.
    assert "nlp" in corral("queue", "apply", "-f", str(out), "--dry-run").stdout
    corral("queue", "apply", "-f", str(out), "--yes", "-m", "recommended")
    tree = {q["name"]: q["pools"]["local"]["quota"] for q in service.admin.get("/v1/queues").json()["queues"]}
    assert tree == {"research": 7, "product": 1, "nlp": 5, "vision": 2, "ranking": 1}
    # Nothing waited since: nothing more to recommend.
    later = str(service.clock.t)
    assert "longer than 0 hours" in corral("queue", "recommend", "--since", later, code=1).stderr
    service.clock.advance(HOUR)
    assert "no change recommended" in corral("queue", "recommend", "--since", later).stdout


def test_recommend_needs_the_whole_tree(corral: Corral, service: Service) -> None:  # noqa: F811
    waiting_history(service)
    service.admin.headers["Authorization"] = service.client("lead", Role.TEAM_ADMIN, "research").headers[
        "Authorization"
    ]
    assert "ask a platform admin" in corral("queue", "recommend", code=1).stderr
