"""With fakes of the API: the watches keep the events they got when the connection drops mid-watch
(k8s_nodes.watch_from), and a gang whose bind fails part way is cleaned up whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import Launch, NodeChange
from scheduler.backends.kubernetes import nodes as k8s_nodes
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.attempts import Attempt
from scheduler.backends.kubernetes.executor import KubernetesExecutor
from scheduler.backends.kubernetes.nodes import NodeWatcher
from scheduler.backends.kubernetes.pods import GROUP_SIZE, POD_GROUP_ENV, PodGangs
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
        status=SimpleNamespace(
            conditions=[SimpleNamespace(type="Ready", status="True" if ready else "False")],
            allocatable={"nvidia.com/gpu": "8"},
            addresses=[],
        ),
    )


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


class BindingCore(FakeCore):
    """Binds as scripted per pod: None binds, an exception fails; records deletions."""

    def __init__(self, pods: list[Any], namespaces: dict[str, Any], outcome: dict[str, Exception | None]) -> None:
        super().__init__(pods, namespaces)
        self.api_client = None
        self.outcome, self.deleted = outcome, []  # type: list[str]

    def create_namespaced_pod_binding(self, name: str, ns: str, body: dict[str, Any], **_: Any) -> Any:
        err = self.outcome[body["metadata"]["name"]]
        if err is not None:
            raise err
        return SimpleNamespace(read=lambda: b"")

    def delete_namespaced_pod(self, name: str, ns: str, **_: Any) -> None:
        self.deleted.append(name)


@pytest.mark.parametrize(
    "failure", [ConnectionResetError("dropped"), ApiException(status=500), ApiException(status=403)]
)
def test_a_gang_whose_bind_fails_part_way_is_cleaned_up_whole(tmp_path: Path, failure: Exception) -> None:
    gang = {k8s.GROUP_LABEL: "g", GROUP_SIZE: "2"}
    api = BindingCore(
        [pending("g-0", "team", gang), pending("g-1", "team", gang)],
        {"team": ns({k8s.QUEUE_LABEL: "nlp"})},
        {"g-0": None, "g-1": failure},
    )
    ex = KubernetesExecutor(api, tmp_path, "img")
    assert ex.gangs is not None
    (a,) = ex.gangs.resync()
    with pytest.raises(OSError):
        ex.launch(Launch("9", 1, "pods", {"n1": [0, 1], "n2": [0, 1]}, {POD_GROUP_ENV: a.key}))
    ex.close()
    if isinstance(failure, ApiException) and failure.status < 500:  # g-1 was refused: it waits again
        assert api.deleted == ["g-0"] and set(ex.gangs.gangs[("team", "g")]) == {"uid-team-g-1"}
        assert ex.gangs.taken == {"uid-team-g-0"}  # until its deletion is seen
    else:  # no answer, or the server's own failure: g-1 may be bound, so it goes too
        assert sorted(api.deleted) == ["g-0", "g-1"] and ("team", "g") not in ex.gangs.gangs


def test_a_gang_whose_every_bind_is_refused_is_told_why_and_not_offered_again(tmp_path: Path) -> None:
    gang = {k8s.GROUP_LABEL: "g", GROUP_SIZE: "2"}
    refused = ApiException(status=403, reason="Forbidden")
    api = BindingCore(
        [pending("g-0", "team", gang), pending("g-1", "team", gang)],
        {"team": ns({k8s.QUEUE_LABEL: "nlp"})},
        {"g-0": refused, "g-1": refused},
    )
    events: list[Any] = []
    api.create_namespaced_event = lambda namespace, body, **_: events.append(body)  # type: ignore[method-assign]
    ex = KubernetesExecutor(api, tmp_path, "img")
    assert ex.gangs is not None
    (a,) = ex.gangs.resync()
    with pytest.raises(OSError, match="Forbidden"):
        ex.launch(Launch("9", 1, "pods", {"n1": [0, 1], "n2": [0, 1]}, {POD_GROUP_ENV: a.key}))
    ex.close()
    assert api.deleted == []
    assert sorted(e["involvedObject"]["name"] for e in events) == ["g-0", "g-1"]
    assert {e["reason"] for e in events} == {"FailedScheduling"} and "Forbidden" in events[0]["message"]
    assert ex.gangs.resync() == []  # the same pods, the same key: not offered again


def test_a_node_back_under_a_deleted_nodes_name_is_no_longer_gone(tmp_path: Path) -> None:
    ex = KubernetesExecutor(BindingCore([], {}, {}), tmp_path, "img", foreign_pods=False)
    info = k8s_nodes.node_info(node("a", True, "1"))
    ex._feeds["corral-k8s-nodes"] = SimpleNamespace(  # type: ignore[assignment]
        drain=lambda: [NodeChange("a", None, deleted=True), NodeChange("a", info)], close=lambda: None
    )
    ex.node_changes(0.0)
    assert ex._gone == set()  # its pods get their grace again: a kubelet confirms their deletion
    ex.close()


def test_a_stopping_attempt_whose_pods_were_not_deleted_is_deleted_again(tmp_path: Path) -> None:
    running = SimpleNamespace(
        metadata=SimpleNamespace(
            name="corral-5-1-0",
            namespace="ns",
            labels={k8s.JOB_LABEL: "5", k8s.ATTEMPT_LABEL: "1"},
            annotations={},
            deletion_timestamp=None,
        ),
        spec=SimpleNamespace(node_name="n1"),
        status=SimpleNamespace(phase="Running"),
    )
    api = BindingCore([running], {}, {})
    ex = KubernetesExecutor(api, tmp_path, "img", foreign_pods=False)
    ex._attempts[("5", 1)] = Attempt("ns", 1, stopping=True, grace=3)  # terminate's delete failed
    assert ex.poll(0.0) == [] and api.deleted == ["corral-5-1-0"]
    ex.close()


def test_an_evicted_pod_that_fails_on_a_cordoned_node_is_drained_not_failed(tmp_path: Path) -> None:
    """A real kubelet ends an evicted pod as Failed (exit 143): on a cordoned node that is a drain, not the job's
    failure (kwok deletes evicted pods at once, so the control-plane test cannot show this)."""
    ex = KubernetesExecutor(BindingCore([], {}, {}), tmp_path, "img", foreign_pods=False)
    info = k8s_nodes.node_info(node("n1", True, "1"))
    assert info is not None
    ex.nodes.known["n1"] = dataclasses.replace(info, cordoned=True)
    a = Attempt("ns", 1, nodes={"n1"}, foreign=["corral-j-1-0"])  # others' pods: nothing to clean up after
    ex._attempts[("j", 1)] = a
    failed = SimpleNamespace(
        metadata=SimpleNamespace(name="corral-j-1-0", deletion_timestamp="now", labels={}, annotations={}),
        spec=SimpleNamespace(node_name="n1"),
        status=SimpleNamespace(
            phase="Failed",
            conditions=[SimpleNamespace(type="DisruptionTarget", status="True")],
            container_statuses=[
                SimpleNamespace(state=SimpleNamespace(terminated=SimpleNamespace(exit_code=143, reason="Error")))
            ],
            reason=None,
        ),
    )
    e = ex._check("j", 1, a, [failed], "")
    assert e is not None and e.drained and "drained" in e.detail


def test_the_clients_connection_pool_holds_every_launch_in_flight_and_the_watches(tmp_path: Path) -> None:
    """The client's pool keeps cpu_count x 5 connections (10 on 2 CPUs): with more launches in flight plus the
    feeds' watches, connections beyond it were closed after each call and opened again (a TLS handshake each)."""
    api = client.ApiClient(client.Configuration(host="https://127.0.0.1:1"))
    ex = KubernetesExecutor(api, tmp_path / "k8s")
    try:
        kept = api.rest_client.pool_manager.connection_pool_kw["maxsize"]
        assert kept >= ex.launch_parallelism + 4  # the launches, and the nodes', gangs', others' and bound watches
    finally:
        ex.close()
