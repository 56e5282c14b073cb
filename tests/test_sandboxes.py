"""Sandboxes through the API: start now within the guarantee, refused at once with what is free, closed at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.backends.base import KnowsAddresses
from scheduler.service.api.auth import Role
from tests.service_kit import ScriptedExecutor, Service, make_service


def box(queue: str = "nlp", gpus: int = 1, **kw: Any) -> dict[str, Any]:
    return {"name": "lab", "queue": queue, "gpus": gpus, "command": ["jupyterhub-singleuser"], **kw}


def test_sandbox_within_guarantee_starts_now(svc: Service) -> None:
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2, env={"JUPYTERHUB_API_TOKEN": "s3cret"}))
    assert r.status_code == 201, r.text
    got = r.json()
    assert (got["state"], got["kind"], got["preemptible"]) == ("running", "sandbox", False)
    assert got["spec"]["env"] == {"JUPYTERHUB_API_TOKEN": "***"}  # secrets never come back
    assert svc.executor.launched[0].env["JUPYTERHUB_API_TOKEN"] == "s3cret"
    assert [s["id"] for s in svc.admin.get("/v1/sandboxes").json()["sandboxes"]] == [got["id"]]


def test_notebooks_holding_the_quota_are_refused_at_once_with_the_guarantee_numbers(svc: Service) -> None:
    assert svc.admin.post("/v1/sandboxes", json=box(gpus=2)).status_code == 201  # nlp's whole quota of 2
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=1))
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["message"].startswith(
        "team nlp holds 2 non-preemptible GPUs of local and this notebook needs 1: "
        "3 > quota 2. Non-preemptible jobs run only within quota, counting the "
        "queue's non-preemptible GPUs"
    )
    assert err["detail"] == {
        "rule": "guarantee",
        "queue": "nlp",
        "pool": "local",
        "quota": 2,
        "np_usage": 2,
        "usage": 2,
        "free_in_guarantee": 0,
        "request": 1,
    }
    assert len(svc.admin.get("/v1/jobs").json()["jobs"]) == 1  # nothing was stored for the refusal


def test_a_team_whose_batch_jobs_fill_its_quota_opens_a_notebook_on_free_gpus(svc: Service) -> None:
    batch = svc.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 2, "command": "train"}).json()["id"]
    svc.tick()
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2))  # usage 2 + 2 > quota 2, but only np GPUs count
    assert r.status_code == 201, r.text
    assert (r.json()["state"], r.json()["priority"]) == ("running", 100)
    assert svc.admin.get(f"/v1/jobs/{batch}").json()["state"] == "running"  # free GPUs: nobody preempted


def test_a_notebook_takes_its_teams_batch_gpus_back_by_priority(svc: Service) -> None:
    batch = svc.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 8, "command": "train"}).json()["id"]
    svc.tick()  # nlp's batch job holds the whole pool (its quota is 2)
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2))
    assert r.status_code == 201, r.text
    assert svc.admin.get(f"/v1/jobs/{batch}").json()["state"] == "pending"  # preempted, requeued
    (ev,) = [e for e in svc.admin.get(f"/v1/jobs/{batch}/events").json()["events"] if e["kind"] == "preempted"]
    assert "priority 100" in ev["message"] and "lower-priority work of nlp" in ev["message"]
    svc.tick()  # the batch job's process has exited: the notebook launches
    assert svc.admin.get(f"/v1/jobs/{r.json()['id']}").json()["state"] == "running"


def test_without_priority_over_batch_no_room_can_be_made(db_url: str, tmp_path: Path) -> None:
    svc = make_service(db_url, tmp_path, sandbox_priority=0)  # the setting: notebooks level with batch jobs
    batch = svc.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 8, "command": "train"}).json()["id"]
    svc.tick()
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2))
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["message"].startswith("the sandbox cannot start now: no room can be made, even by preempting: ")
    assert err["detail"]["rule"] != "guarantee"  # the guarantee held (no non-preemptible GPUs): room did not
    assert svc.admin.get(f"/v1/jobs/{batch}").json()["state"] == "running"
    assert [j["id"] for j in svc.admin.get("/v1/jobs").json()["jobs"] if j["state"] != "cancelled"] == [batch]


def test_sandbox_takes_its_guarantee_back_from_borrowers(svc: Service) -> None:
    borrower = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 8, "command": "train"}).json()["id"]
    svc.tick()
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2))
    assert r.status_code == 201, r.text
    assert svc.admin.get(f"/v1/jobs/{borrower}").json()["state"] == "pending"  # preempted, requeued
    svc.tick()  # the borrower's process has exited: the sandbox launches
    assert svc.admin.get(f"/v1/jobs/{r.json()['id']}").json()["state"] == "running"


def test_closing_frees_gpus_at_once(svc: Service) -> None:
    sid = svc.admin.post("/v1/sandboxes", json=box(gpus=2)).json()["id"]
    assert svc.admin.delete(f"/v1/sandboxes/{sid}").json()["state"] == "cancelled"
    assert svc.admin.post("/v1/sandboxes", json=box(gpus=2)).status_code == 201
    assert svc.executor.terminated == [(str(sid), 1)]


def test_sandboxes_follow_the_roles(svc: Service) -> None:
    alice = svc.client("alice", Role.MEMBER, "nlp")
    bob = svc.client("bob", Role.MEMBER, "ranking")
    sid = alice.post("/v1/sandboxes", json=box()).json()["id"]
    assert bob.get("/v1/sandboxes").json()["sandboxes"] == []
    assert bob.delete(f"/v1/sandboxes/{sid}").status_code == 404
    assert bob.post("/v1/sandboxes", json=box()).status_code == 403  # another team's queue
    assert svc.client("vic", Role.VIEWER, "nlp").post("/v1/sandboxes", json=box()).status_code == 403
    assert alice.post("/v1/sandboxes", json=box(priority=1000)).status_code == 422  # the site sets priority
    assert alice.post("/v1/sandboxes", json=box(owner="bob")).status_code == 403
    hub = svc.admin.post("/v1/sandboxes", json=box(queue="vision", owner="carol")).json()
    assert hub["owner"] == "carol"
    assert svc.admin.delete(f"/v1/jobs/{sid}").status_code == 200


def test_a_running_sandbox_says_where_it_listens(svc: Service) -> None:
    url = "http://127.0.0.1:40123/user/ann/"
    got = svc.admin.post("/v1/sandboxes", json=box(cpus=2, memory_gb=8, env={"JUPYTERHUB_SERVICE_URL": url})).json()
    # A process on this machine: 127.0.0.1 and the port the hub gave it.
    assert got["address"] == {"host": "127.0.0.1", "port": 40123} and got["url"] == "http://127.0.0.1:40123"
    assert svc.admin.get(f"/v1/sandboxes/{got['id']}").json()["address"] == got["address"]
    launch = svc.executor.launched[0]
    assert (launch.cpus, launch.memory_gb) == (2, 8)  # the pod's requests on Kubernetes
    job = svc.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 0, "command": "x"}).json()["id"]
    svc.tick()
    assert svc.executor.launched[-1].cpus is None and svc.executor.launched[-1].memory_gb is None  # not asked
    assert svc.admin.get(f"/v1/sandboxes/{job}").status_code == 404  # a job is not a sandbox
    svc.admin.delete(f"/v1/sandboxes/{got['id']}")
    assert svc.admin.get(f"/v1/sandboxes/{got['id']}").json()["address"] is None  # ended: nowhere


@dataclass
class PodExecutor(ScriptedExecutor):
    """A scripted executor that knows where its attempts listen, as the Kubernetes one does (a pod's IP)."""

    addresses: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def address(self, job_id: str, attempt: int) -> tuple[str, int] | None:
        return self.addresses.get((job_id, attempt))


def test_the_executor_says_where_a_sandbox_listens(db_url: str, tmp_path: Path) -> None:
    ex = PodExecutor()
    svc = make_service(db_url, tmp_path, ex)
    assert isinstance(ex, KnowsAddresses)
    sid = svc.admin.post("/v1/sandboxes", json=box()).json()["id"]
    got = svc.admin.get(f"/v1/sandboxes/{sid}").json()
    assert got["state"] == "running" and got["address"] is None and got["url"] is None  # no pod IP yet
    ex.addresses[(str(sid), 1)] = ("fd00::7", 8888)
    got = svc.admin.get(f"/v1/sandboxes/{sid}").json()
    assert got["address"] == {"host": "fd00::7", "port": 8888} and got["url"] == "http://[fd00::7]:8888"


def test_a_sandbox_request_has_the_job_specs_bounds_at_the_edge(svc: Service) -> None:
    """Pool, workdir, image, env and command are the job spec's fields with the job spec's bounds (specs.py), checked
    before the request is read any further, not only once a JobSubmit is built from it."""
    for name, value, words in (
        ("pool", "p" * 10_000, "at most 200 characters"),
        ("workdir", "/" + "w" * 10_000, "at most 4096 characters"),
        ("workdir", "relative/dir", "not an absolute path"),
        ("image", "i" * 10_000, "at most 1024 characters"),
        ("env", {"A=B": "x"}, "is not valid"),
        ("command", ["x"] * 5000, "at most 4096 items"),
    ):
        r = svc.admin.post("/v1/sandboxes", json=box(**{name: value}))
        assert r.status_code == 422, (name, r.text)
        assert words in r.text and r.json()["error"]["detail"], (name, r.text)  # the edge's list of problems
