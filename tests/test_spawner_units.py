"""The hub integration without a hub: profiles, the sandbox request and hub users as principals as data; the
spawner against a fake Corral API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from sandbox import spawner as spawner_module
from sandbox.profiles import Profile, allowed, parse_profiles
from sandbox.spawner import CorralSpawner, SandboxRefused, sandbox_request, team_queue
from scheduler.backends.base import server_port
from scheduler.service.api.auth import NO_TEAM, Principal, Role, hub_principal


def test_profiles_parse_and_are_restricted_per_group() -> None:
    ps = parse_profiles(
        [
            {"name": "cpu", "display": "CPU only"},
            {"name": "h100", "display": "1 x H100", "gpus": 1, "idle_timeout_s": 600, "groups": ["ml"]},
        ]
    )
    assert [p.name for p in allowed(ps, ["ml"])] == ["cpu", "h100"]
    assert [p.name for p in allowed(ps, ["sales"])] == ["cpu"]
    assert parse_profiles([])[0].display == "CPU only"
    with pytest.raises(ValueError, match=r"profiles\[0\].*unknown keys: \['gpu'\]"):
        parse_profiles([{"name": "x", "gpu": 1}])
    with pytest.raises(ValueError, match="gpus must be >= 0"):
        parse_profiles([{"name": "x", "gpus": -1}])


def test_profiles_with_a_share_of_a_gpu_or_a_mig_slice() -> None:
    quarter, mig = parse_profiles(
        [
            {"name": "h100-quarter", "display": "1/4 H100", "gpus": 0.25},
            {"name": "mig-1g", "display": "1g.10gb MIG", "mig": "1g.10gb"},
        ]
    )
    assert (quarter.gpus, quarter.mig) == (0.25, None) and (mig.gpus, mig.mig) == (0.142857, "1g.10gb")
    assert sandbox_request("al", "nlp", quarter, ["lab"], {})["gpus"] == 0.25
    body = sandbox_request("al", "nlp", mig, ["lab"], {})
    assert body["mig"] == "1g.10gb" and "gpus" not in body  # the service counts the slice's fraction
    for bad, words in [
        ({"gpus": 1.5}, "above 1 it must be a whole number"),
        ({"gpus": float("nan")}, "a number of GPUs"),
        ({"mig": "5g.1tb"}, "not a MIG profile"),
        ({"mig": "1g.10gb", "gpus": 0.25}, "gpus or mig, not both"),
    ]:
        with pytest.raises(ValueError, match=rf"profiles\[0\] \(x\).*{words}"):
            parse_profiles([{"name": "x", **bad}])


def test_sandbox_request_is_a_plain_body() -> None:
    p = Profile("h100", "1 x H100", gpus=1, memory_gb=64, idle_timeout_s=900)
    body = sandbox_request("alice", "nlp", p, ["jupyterhub-singleuser"], {"JUPYTERHUB_API_TOKEN": "t"})
    assert body == {
        "name": "jupyter-alice",
        "queue": "nlp",
        "owner": "alice",
        "gpus": 1,
        "memory_gb": 64,
        "idle_timeout_s": 900,
        "command": ["jupyterhub-singleuser"],
        "env": {"JUPYTERHUB_API_TOKEN": "t"},
        "profile": "h100",
    }


def test_named_servers_and_refusals_read_plainly() -> None:
    p = Profile("cpu", "CPU only")
    assert sandbox_request("alice", "nlp", p, ["lab"], {}, server="second")["name"] == "jupyter-alice-second"
    assert sandbox_request("alice", "nlp", p, ["lab"], {})["gpus"] == 0  # a CPU-only sandbox
    no = SandboxRefused("team nlp holds 1 non-preemptible GPUs")
    # The hub shows jupyterhub_message (else str()): Corral's sentence, not "409 SandboxRefused(reason=...)".
    assert no.jupyterhub_message == str(no) == "team nlp holds 1 non-preemptible GPUs"
    assert (no.status_code, no.reason) == (409, "corral_refused")


def test_team_queue_is_the_first_mapped_group() -> None:
    assert team_queue(["zeta", "alpha", "ml"], {"ml": "nlp", "zeta": "vision"}) == "nlp"
    assert team_queue(["sales"], {"ml": "nlp"}) is None


def test_hub_users_become_principals() -> None:
    groups = {"team-a": "nlp"}
    assert hub_principal("ann", [], ["custom:corral:admin"], groups) == Principal("ann", Role.PLATFORM_ADMIN)
    assert hub_principal("al", ["team-a"], ["self", "custom:corral:submit!group=team-a"], groups) == Principal(
        "al", Role.MEMBER, "nlp"
    )
    assert hub_principal("vi", ["team-a"], ["self"], groups) == Principal("vi", Role.VIEWER, "nlp")
    assert hub_principal("x", ["other"], ["custom:corral:submit"], groups) == Principal("x", Role.MEMBER, NO_TEAM)


# ----- CorralSpawner against a fake Corral API -----


class FakeCorral:
    """Corral's sandbox API as scripted answers: POST /v1/sandboxes answers `opened` (or what it makes of the
    body), each GET the next view."""

    def __init__(
        self,
        opened: httpx.Response | Callable[[dict[str, Any]], httpx.Response],
        views: list[httpx.Response] | None = None,
    ) -> None:
        self.opened, self.views = opened, views or []
        self.calls: list[tuple[str, str, dict[str, Any] | None]] = []

    async def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        self.calls.append((method, path, body))
        if method == "POST":
            assert body is not None
            r = self.opened(body) if callable(self.opened) else self.opened
        else:
            r = self.views.pop(0)
        r.request = httpx.Request(method, f"http://corral{path}")
        return r


def view(state: str, address: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(200, json={"id": 7, "state": state, "address": address})


def spawner(api: FakeCorral, monkeypatch: pytest.MonkeyPatch) -> CorralSpawner:
    user = SimpleNamespace(name="ann", groups=[SimpleNamespace(name="team-a")])
    sp = CorralSpawner(
        user=user,
        group_queues={"team-a": "nlp"},
        cmd=["jupyterhub-singleuser"],
        profiles=[{"name": "h100", "display": "1 x H100", "gpus": 1}],
    )
    monkeypatch.setattr(sp, "_call", api)
    monkeypatch.setattr(sp, "get_env", lambda: {"JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:{sp.port}/user/ann/"})
    monkeypatch.setattr(spawner_module, "POLL_S", 0)
    return sp


def test_start_connects_where_corral_says_the_sandbox_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    # On Kubernetes: admitted, then running, and only then the pod's IP.
    api = FakeCorral(
        httpx.Response(201, json={"id": 7, "state": "starting", "address": None}),
        [view("running"), view("running", {"host": "10.244.0.9", "port": 8888})],
    )
    sp = spawner(api, monkeypatch)
    assert asyncio.run(sp.start()) == ("10.244.0.9", 8888)
    (_, _, body), *gets = api.calls
    assert body is not None and body["queue"] == "nlp" and body["gpus"] == 1 and body["owner"] == "ann"
    assert body["env"]["CORRAL_URL"] == sp.corral_url
    assert gets == [("GET", "/v1/sandboxes/7", None)] * 2
    assert sp.get_state()["corral_job"] == 7


def test_start_uses_the_address_in_the_answer_when_it_runs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The local executor: running at once, a process on Corral's machine at the port the hub gave it.
    api = FakeCorral(
        lambda body: httpx.Response(
            201, json={"id": 7, "state": "running", "address": {"host": "127.0.0.1", "port": server_port(body["env"])}}
        )
    )
    sp = spawner(api, monkeypatch)
    assert asyncio.run(sp.start()) == ("127.0.0.1", sp.port) and len(api.calls) == 1


def test_start_fails_when_the_sandbox_ends_before_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeCorral(
        httpx.Response(201, json={"id": 7, "state": "starting", "address": None}),
        [view("starting"), httpx.Response(404, json={})],
    )
    with pytest.raises(SandboxRefused, match=r"ended before it started \(gone\)"):
        asyncio.run(spawner(api, monkeypatch).start())
    refused = FakeCorral(httpx.Response(409, json={"error": {"message": "queue nlp has 0 of its 1 ..."}}))
    with pytest.raises(SandboxRefused, match="queue nlp has 0 of its 1"):
        asyncio.run(spawner(refused, monkeypatch).start())


def test_poll_follows_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeCorral(
        httpx.Response(201),
        [view("running", {"host": "h", "port": 1}), view("cancelled"), httpx.Response(404, json={})],
    )
    sp = spawner(api, monkeypatch)
    assert asyncio.run(sp.poll()) == 0  # nothing started
    sp.job_id = 7
    assert [asyncio.run(sp.poll()) for _ in range(3)] == [None, 0, 0]
