"""Sandboxes through the API: start now within the guarantee, refused at once with what is free, closed at once."""

from __future__ import annotations

from typing import Any

from scheduler.service.auth import Role
from tests.service_kit import Service


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


def test_over_guarantee_is_refused_at_once_with_what_is_free(svc: Service) -> None:
    svc.admin.post("/v1/sandboxes", json=box(gpus=1))
    r = svc.admin.post("/v1/sandboxes", json=box(gpus=2))
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["message"].startswith("queue nlp has 1 of its 2 guaranteed GPUs of local free (1 in use); "
                                     "this sandbox asks 2")
    assert err["detail"]["free_in_guarantee"] == 1
    assert len(svc.admin.get("/v1/jobs").json()["jobs"]) == 1  # nothing was stored for the refusal


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
    assert bob.post("/v1/sandboxes", json=box()).status_code == 403
    assert alice.post("/v1/sandboxes", json=box(owner="bob")).status_code == 403
    hub = svc.admin.post("/v1/sandboxes", json=box(queue="vision", owner="carol")).json()
    assert hub["owner"] == "carol"
    assert svc.admin.delete(f"/v1/jobs/{sid}").status_code == 200
