"""The node and pod watches keep the events they got when the connection drops mid-watch (k8s_nodes.watch_from)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.backends import k8s_nodes
from scheduler.backends.base import NodeChange
from scheduler.backends.k8s_nodes import NodeWatcher
from scheduler.backends.k8s_pods import PodGangs
from tests.test_k8s_pods import FakeCore, ns, pending


class DroppingWatch:
    """A watch that yields the scripted events, then fails as a dropped connection would."""

    script: list[list[dict[str, Any]]] = []

    def stream(self, *_: Any, **__: Any) -> Iterator[dict[str, Any]]:
        yield from DroppingWatch.script.pop(0)
        raise ConnectionResetError("connection dropped")

    def stop(self) -> None:
        pass


def node(name: str, ready: bool, rv: str) -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, deletion_timestamp=None, labels={}, resource_version=rv),
        spec=SimpleNamespace(unschedulable=False),
        status=SimpleNamespace(conditions=[SimpleNamespace(type="Ready", status="True" if ready else "False")],
                               allocatable={"nvidia.com/gpu": "8"}, addresses=[]))


def test_node_changes_seen_before_a_dropped_watch_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_nodes.watch, "Watch", DroppingWatch)
    w = NodeWatcher(FakeCore([], {}))
    w.resource_version = "1"
    w._apply("a", k8s_nodes.node_info(node("a", True, "1")))
    DroppingWatch.script = [[{"type": "MODIFIED", "object": node("a", False, "5")}], []]
    assert w.changes(1) == [NodeChange("a", None)] and w.resource_version == "5"
    with pytest.raises(ConnectionResetError):  # nothing to lose: the error reaches the Feed, which pauses
        w.changes(1)
    assert w.down == {"a"} and w.resource_version == "5"


def test_pod_arrivals_seen_before_a_dropped_watch_are_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_nodes.watch, "Watch", DroppingWatch)
    p = pending("p", "team")
    p.metadata.resource_version = "7"
    gangs = PodGangs(FakeCore([], {"team": ns({"corral.dev/queue": "nlp"})}))
    gangs.resource_version = "1"
    DroppingWatch.script = [[{"type": "ADDED", "object": p}]]
    (a,) = gangs.changes(1)
    assert a.spec is not None and a.scope == "nlp" and gangs.resource_version == "7"
