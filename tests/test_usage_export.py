"""`corral usage export --format trace`: recorded jobs as the simulator's trace and cluster file (the pure conversion,
the endpoint with its RBAC, and the round trip through `corral sim trace`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

from scheduler.service.api.auth import Role
from scheduler.sim.inputs import TRACE_COLUMNS, load_cluster, load_trace
from scheduler.sim.recorded import Attempt, Node, RecordedJob, cluster_document, demand, subtree, trace
from scheduler.sim.runner import Simulation
from tests.service_kit import DEMO_TREE, Service, make_service
from tests.test_cli_service import Corral, corral, service  # noqa: F401  (fixtures)

T0 = 1_000_000.0
HOUR = 3600.0


def job(
    id: int, submitted: float, *attempts: tuple[float, float | None], state: str = "completed", **kw: object
) -> RecordedJob:
    first = attempts[0][0] if attempts else None
    return RecordedJob(
        id=id,
        queue=str(kw.pop("queue", "nlp")),
        pool="local",
        state=state,
        submitted=submitted,
        first_start=first,
        attempts=tuple(Attempt(a, b) for a, b in attempts),
        **kw,
    )  # type: ignore[arg-type]


# ----- the pure conversion -----


def test_trace_rows_use_recorded_runtimes_relative_to_the_range() -> None:
    jobs = [
        job(1, T0 + 10, (T0 + 20, T0 + 80)),
        # preempted once: a restart begins again, so the last attempt is the job's length
        job(2, T0 + 5, (T0 + 5, T0 + 50), (T0 + 100, T0 + 400), workers=2, gpus=4, priority=3),
        # a job that checkpoints resumes: every attempt's time is its work
        job(3, T0 + 6, (T0 + 6, T0 + 50), (T0 + 100, T0 + 200), checkpoint=True, preemptible=False),
        job(4, T0 + 7, (T0 + 500, None), state="running"),  # still running: up to now
        job(5, T0 + 8, state="pending"),
        job(6, T0 + 9, state="cancelled"),
        job(7, T0 - 1, (T0, T0 + 10)),  # submitted before the range
    ]
    out = trace(jobs, T0, T0 + HOUR, now=T0 + 1000)
    rows = list(csv.DictReader(io.StringIO(out.csv())))
    assert tuple(rows[0]) == TRACE_COLUMNS
    assert [(r["id"], r["submit"], r["duration"]) for r in rows] == [
        ("2", "5", "300"),
        ("3", "6", "144"),
        ("4", "7", "500"),
        ("1", "10", "60"),
    ]
    assert rows[0]["workers"] == "2" and rows[0]["gpus"] == "4" and rows[0]["priority"] == "3"
    assert rows[1]["preemptible"] == "false" and rows[0]["preemptible"] == "true"
    assert out.skipped == {"still pending": 1, "cancelled before it ran": 1}


def test_cluster_document_pools_and_a_warning_for_mixed_node_sizes() -> None:
    nodes = [Node("a-0", "a100", 8), Node("a-1", "a100", 8), Node("h-0", "h100", 8), Node("h-1", "h100", 4)]
    doc, warnings = cluster_document(nodes, DEMO_TREE["queues"], 0.0, 600.0)
    assert doc["cluster"]["pools"] == [
        {"name": "a100", "nodes": 2, "gpus_per_node": 8},
        {"name": "h100", "nodes": 2, "gpus_per_node": 8},
    ]
    assert doc["settings"] == {"min_runtime": 0.0, "starvation_timeout": 600.0}
    assert warnings == ["pool h100: nodes of [4, 8] GPUs written as 2 nodes of 8 (16 GPUs instead of 12)"]


def test_subtree_makes_the_scope_a_root() -> None:
    assert subtree(DEMO_TREE["queues"], {"research", "nlp", "vision"}) == [
        {"name": "research", "quota": {"local": 4}},
        {"name": "nlp", "parent": "research", "quota": {"local": 2}},
        {"name": "vision", "parent": "research", "quota": {"local": 2}},
    ]
    assert subtree(DEMO_TREE["queues"], {"nlp"}) == [{"name": "nlp", "quota": {"local": 2}}]


def test_demand_counts_only_inside_the_range() -> None:
    jobs = [
        job(1, T0 - HOUR, (T0 - HOUR / 2, T0 + HOUR / 2), gpus=2),  # half its run inside
        job(2, T0, (T0 + HOUR, T0 + 2 * HOUR), gpus=2, preemptible=False),  # waited an hour
        job(3, T0 + HOUR, state="pending", gpus=4, queue="vision"),  # still waiting at `now`
        job(4, T0, state="rejected", gpus=8, preemptible=False),  # never waited for anything
    ]
    got = {d.queue: d for d in demand(jobs, T0, T0 + 2 * HOUR, now=T0 + 3 * HOUR)}
    nlp, vision = got["nlp"], got["vision"]
    assert nlp.used_gpu_hours == 1 + 2 and nlp.waiting_gpu_hours == 2
    assert (nlp.jobs, nlp.started, nlp.mean_wait_s, nlp.largest_nonpreemptible) == (2, 1, HOUR, 2)
    assert vision.waiting_gpu_hours == 4 and vision.started == 0 and vision.used_gpu_hours == 0


# ----- through the service -----


def run_jobs(svc: Service) -> list[int]:
    """Two nlp jobs and one ranking job that each run an hour; ids in submit order."""
    c = svc.admin
    ids = []
    for queue, gpus in (("nlp", 2), ("ranking", 4), ("nlp", 2)):
        r = c.post("/v1/jobs", json={"queue": queue, "gpus": gpus, "command": ["true"]})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        svc.clock.advance(10)
    svc.tick()
    svc.clock.advance(HOUR)
    for i in ids:
        svc.executor.exit(i, 0)
    svc.tick()
    return ids


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)


def test_export_endpoint_and_rbac(svc: Service) -> None:
    ids = run_jobs(svc)
    full = svc.admin.get("/v1/usage/export", params={"format": "trace", "since": T0}).json()
    assert full["scope"] is None and full["jobs"] == 3 and full["until"] == svc.clock.t
    rows = list(csv.DictReader(io.StringIO(full["trace"])))
    assert [r["id"] for r in rows] == [str(i) for i in ids]
    assert [r["submit"] for r in rows] == ["0", "10", "20"] and {r["duration"] for r in rows} == {"3600"}
    assert full["cluster"]["queues"] == DEMO_TREE["queues"]
    assert full["cluster"]["cluster"]["pools"] == [{"name": "local", "nodes": 1, "gpus_per_node": 8}]
    assert {(d["queue"], d["used_gpu_hours"]) for d in full["demand"]} == {("nlp", 4.0), ("ranking", 4.0)}

    member = svc.client("ann", Role.MEMBER, "nlp")
    mine = member.get("/v1/usage/export", params={"since": T0}).json()
    assert mine["scope"] == "nlp" and mine["jobs"] == 2
    assert {r["queue"] for r in csv.DictReader(io.StringIO(mine["trace"]))} == {"nlp"}
    assert mine["cluster"]["queues"] == [{"name": "nlp", "quota": {"local": 2}}]
    assert [d["queue"] for d in mine["demand"]] == ["nlp"]

    bad = svc.admin.get("/v1/usage/export", params={"format": "csv"})
    assert bad.status_code == 422 and "format" in bad.text
    assert svc.admin.get("/v1/usage/export", params={"since": T0 + 10, "until": T0}).status_code == 422
    assert "not a number" in svc.admin.get("/v1/usage/export", params={"until": "nan"}).text
    assert svc.admin.get("/v1/usage/export", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_export_round_trip_through_the_simulator(corral: Corral, service: Service, tmp_path: Path) -> None:  # noqa: F811
    run_jobs(service)
    trace_path, cluster_path = tmp_path / "trace.csv", tmp_path / "cluster.yaml"
    r = corral(
        "usage",
        "export",
        "--format",
        "trace",
        "--since",
        str(T0),
        "-o",
        str(trace_path),
        "--cluster-out",
        str(cluster_path),
    )
    assert "3 jobs submitted" in r.stderr
    world = load_cluster(cluster_path)
    world.jobs = load_trace(trace_path)
    log = Simulation(world).run()
    assert sum(e["event"] == "completed" for e in log["events"]) == 3
    assert "3 jobs, 3 completed" in corral("sim", "trace", str(trace_path), "--cluster", str(cluster_path)).stdout
    # Without -o the trace goes to stdout, nothing else does.
    out = corral("usage", "export", "--format", "trace", "--since", str(T0)).stdout
    assert out == trace_path.read_text()
    assert yaml.safe_load(cluster_path.read_text())["queues"] == DEMO_TREE["queues"]
    assert "trace" in corral("usage", "export", "--format", "nope", code=2).stderr
