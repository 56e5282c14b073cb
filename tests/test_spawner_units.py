"""Pure parts of the hub integration, tested as data: profiles, the sandbox request, hub users as principals."""

from __future__ import annotations

import pytest

from sandbox.profiles import Profile, allowed, parse_profiles
from sandbox.spawner import sandbox_request, team_queue
from scheduler.service.auth import NO_TEAM, Principal, Role, hub_principal


def test_profiles_parse_and_are_restricted_per_group() -> None:
    ps = parse_profiles([{"name": "cpu", "display": "CPU only"},
                         {"name": "h100", "display": "1 x H100", "gpus": 1, "idle_timeout_s": 600, "groups": ["ml"]}])
    assert [p.name for p in allowed(ps, ["ml"])] == ["cpu", "h100"]
    assert [p.name for p in allowed(ps, ["sales"])] == ["cpu"]
    assert parse_profiles([])[0].display == "CPU only"
    with pytest.raises(ValueError, match=r"profiles\[0\].*unknown keys: \['gpu'\]"):
        parse_profiles([{"name": "x", "gpu": 1}])
    with pytest.raises(ValueError, match="gpus must be >= 0"):
        parse_profiles([{"name": "x", "gpus": -1}])


def test_sandbox_request_is_a_plain_body() -> None:
    p = Profile("h100", "1 x H100", gpus=1, memory_gb=64, idle_timeout_s=900)
    body = sandbox_request("alice", "nlp", p, ["jupyterhub-singleuser"], {"JUPYTERHUB_API_TOKEN": "t"})
    assert body == {"name": "jupyter-alice", "queue": "nlp", "owner": "alice", "gpus": 1, "memory_gb": 64,
                    "idle_timeout_s": 900, "command": ["jupyterhub-singleuser"],
                    "env": {"JUPYTERHUB_API_TOKEN": "t"}, "profile": "h100"}


def test_team_queue_is_the_first_mapped_group() -> None:
    assert team_queue(["zeta", "alpha", "ml"], {"ml": "nlp", "zeta": "vision"}) == "nlp"
    assert team_queue(["sales"], {"ml": "nlp"}) is None


def test_hub_users_become_principals() -> None:
    groups = {"team-a": "nlp"}
    assert hub_principal("ann", [], ["custom:corral:admin"], groups) == Principal("ann", Role.PLATFORM_ADMIN)
    assert hub_principal("al", ["team-a"], ["self", "custom:corral:submit!group=team-a"], groups) == Principal(
        "al", Role.MEMBER, "nlp")
    assert hub_principal("vi", ["team-a"], ["self"], groups) == Principal("vi", Role.VIEWER, "nlp")
    assert hub_principal("x", ["other"], ["custom:corral:submit"], groups) == Principal("x", Role.MEMBER, NO_TEAM)
