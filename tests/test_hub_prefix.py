"""Corral answers under the JupyterHub service's prefix (/services/corral/...) as at its root: the hub's proxy
forwards the whole path, and the SDK inside a notebook finds Corral there with no configuration."""

from __future__ import annotations

from pathlib import Path

from scheduler.service.api.hubprefix import hub_prefixes
from tests.service_kit import make_service


def test_the_hub_prefix_answers_as_the_root(tmp_path: Path) -> None:
    svc = make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)
    r = svc.admin.post("/services/corral/v1/jobs", json={"queue": "nlp", "gpus": 1, "command": "true"})
    assert r.status_code == 201, r.text
    svc.tick()
    for path in ("/v1/jobs", "/v1/queues", f"/v1/jobs/{r.json()['id']}/explain", "/healthz"):
        direct, through = svc.admin.get(path), svc.admin.get(f"/services/corral{path}")
        assert (through.status_code, through.content) == (direct.status_code, direct.content), path
    assert svc.admin.get("/services/corral/openapi.json").status_code == 200
    assert svc.admin.get("/services/corralx/v1/jobs").status_code == 404  # only the whole segment
    assert svc.admin.get("/services/other/v1/jobs").status_code == 404


def test_the_prefix_follows_the_hub_base_url() -> None:
    assert hub_prefixes(None, None) == ["/services/corral"]
    assert hub_prefixes(None, "http://127.0.0.1:8081/hub/api") == ["/services/corral"]
    assert hub_prefixes(None, "http://hub:8081/jhub/hub/api/") == ["/jhub/services/corral", "/services/corral"]
    assert hub_prefixes("/gpu/", "http://hub:8081/jhub/hub/api") == ["/gpu"]


def test_a_configured_prefix(tmp_path: Path) -> None:
    svc = make_service(f"sqlite:///{tmp_path}/c.db", tmp_path, hub_service_prefix="/jhub/services/corral")
    assert svc.admin.get("/jhub/services/corral/v1/jobs").json() == svc.admin.get("/v1/jobs").json()
