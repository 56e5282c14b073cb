"""Pure parts of the foreign-pod path: the binding and event bodies as dicts, and how a pod reads as a gang member."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.pods import (
    GROUP_SIZE,
    POOL_LABEL,
    PREEMPTIBLE,
    PodGangs,
    gang_key,
    namespace_team,
    waiting,
)
from scheduler.backends.kubernetes.teams import QUEUE_ANNOTATION


def pod(
    labels: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
    gpus: str = "2",
    selector: dict[str, str] | None = None,
) -> Any:
    container = SimpleNamespace(image="img", resources=SimpleNamespace(limits={k8s.GPU: gpus}))
    return SimpleNamespace(
        metadata=SimpleNamespace(uid="u1", namespace="ns", name="p-0", labels=labels, annotations=notes),
        spec=SimpleNamespace(
            containers=[container, container], node_selector=selector, termination_grace_period_seconds=5
        ),
    )


def test_binding_carries_marks_as_annotations() -> None:
    assert k8s.binding("p", "ns", "n1") == {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "p", "namespace": "ns"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"},
    }
    assert k8s.binding("p", "ns", "n1", {k8s.JOB_LABEL: "7"})["metadata"]["annotations"] == {k8s.JOB_LABEL: "7"}


def test_pod_event() -> None:
    e = k8s.pod_event("ns", "p", "u1", "FailedScheduling", "no queue", "2026-11-26T00:00:00Z")
    assert e["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "ns", "name": "p", "uid": "u1"}
    assert (e["type"], e["reason"], e["metadata"]["generateName"]) == ("Warning", "FailedScheduling", "p.")


def test_a_pod_as_a_gang_member() -> None:
    solo = waiting(pod(selector={k8s.GPU_PRODUCT: "H100"}))
    assert (solo.group, solo.size, solo.gpus, solo.pool, solo.queue) == ("p-0", 1, 4, "H100", None)
    member = waiting(pod({k8s.GROUP_LABEL: "g", k8s.QUEUE_LABEL: "nlp", POOL_LABEL: "A100"}, {GROUP_SIZE: "3"}))
    assert (member.group, member.size, member.pool, member.queue) == ("g", 3, "A100", "nlp")
    bad = waiting(pod({k8s.GROUP_LABEL: "g"}))
    assert isinstance(bad.size, str) and GROUP_SIZE in bad.size
    assert gang_key("ns", "g", ["b", "a"]) == gang_key("ns", "g", ["a", "b"]) != gang_key("ns", "g", ["a", "c"])


def test_a_pods_requests_and_priority_class_travel_with_it() -> None:
    """Issue 22: other users' pods lost their CPU and memory requests (nodes over-committed: 161 of 64 CPUs) and
    their PriorityClass. Requests (or limits standing for them) are summed over containers; spec.priority, which the
    API server resolves from the PriorityClass, is clamped into Corral's range; corral.dev/preemptible=false makes
    the gang non-preemptible."""

    def container(requests: dict[str, str] | None, limits: dict[str, str]) -> Any:
        return SimpleNamespace(image="img", resources=SimpleNamespace(requests=requests, limits=limits))

    p = pod({k8s.GROUP_LABEL: "g", PREEMPTIBLE: "false"}, {GROUP_SIZE: "2"})
    p.spec.containers = [
        container({"cpu": "1500m", "memory": "3Gi"}, {k8s.GPU: "2"}),
        container(None, {"cpu": "2", "memory": "1Gi", k8s.GPU: "0"}),
    ]
    p.spec.priority = 1_000_000
    got = waiting(p)
    assert (got.cpus, got.memory_gb, got.priority, got.preemptible, got.gpus) == (3.5, 4.0, 1000, False, 2)
    low = pod()
    low.spec.priority = -5
    assert (waiting(low).priority, waiting(low).preemptible, waiting(low).cpus) == (-5, True, 0.0)
    gangs = PodGangs(FakeCore([], {}))
    spec = gangs._spec("k", ("ns", "g"), [got, replace(got, cpus=4.0001, priority=3)], "nlp")
    assert isinstance(spec, dict)
    assert (spec["cpus"], spec["memory_gb"], spec["priority"], spec["preemptible"]) == (4.001, 4.0, 1000, False)


class FakeCore(CoreV1Api):
    """Just the calls PodGangs makes: a list of pending pods, namespaces to read, a watch that raises."""

    def __init__(self, pods: list[Any], namespaces: dict[str, Any]) -> None:
        self.pods, self.namespaces, self.reads = pods, namespaces, 0

    def list_pod_for_all_namespaces(self, **_: Any) -> Any:
        return SimpleNamespace(items=list(self.pods), metadata=SimpleNamespace(resource_version="1"))

    def read_namespace(self, name: str, **kw: Any) -> Any:
        assert "_request_timeout" in kw
        self.reads += 1
        got = self.namespaces.get(name)
        if isinstance(got, Exception):
            raise got
        if got is None:
            raise ApiException(status=404)
        return got


def ns(labels: dict[str, str] | None = None, notes: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(labels=labels, annotations=notes))


def pending(name: str, namespace: str, labels: dict[str, str] | None = None) -> Any:
    p = pod(labels, gpus="1")
    p.metadata = SimpleNamespace(
        uid=f"uid-{namespace}-{name}",
        namespace=namespace,
        name=name,
        labels=labels,
        annotations=None,
        deletion_timestamp=None,
    )
    return p


def test_the_namespace_decides_the_team_never_the_pods_label() -> None:
    assert namespace_team(ns({k8s.QUEUE_LABEL: "nlp"})) == "nlp"
    assert namespace_team(ns({k8s.MANAGED_BY: "corral"}, {QUEUE_ANNOTATION: "Research/Vision"})) == "Research/Vision"
    assert namespace_team(ns({}, {QUEUE_ANNOTATION: "forged"})) is None  # not a Corral team namespace
    api = FakeCore(
        [pending("p", "team", {k8s.QUEUE_LABEL: "nlp-sub"}), pending("q", "free", {k8s.QUEUE_LABEL: "nlp"})],
        {"team": ns({k8s.QUEUE_LABEL: "nlp"}), "free": ns({})},
    )
    gangs = PodGangs(api)
    offered = {a.key.split("/")[0]: a for a in gangs.resync()}
    assert set(offered) == {"team"} and offered["team"].scope == "nlp" and offered["team"].spec is not None
    assert offered["team"].spec["queue"] == "nlp-sub"  # the pod's pick, within the team: the intake checks it
    ((key, why),) = gangs.drain_problems()
    assert key.startswith("free/") and "belongs to no team" in why


def test_a_namespace_lookup_is_not_remembered_when_it_finds_no_team_or_fails() -> None:
    api = FakeCore([pending("p", "ns1")], {"ns1": TimeoutError("slow")})
    gangs = PodGangs(api)
    assert gangs.resync() == [] and gangs.drain_problems() == [] and gangs.unsure == {("ns1", "p")}
    api.namespaces["ns1"] = ns({k8s.QUEUE_LABEL: "nlp"})  # the API server answers again
    assert [a.scope for a in gangs._settle(("ns1", "p"), gangs._teams({"ns1"}))] == ["nlp"]
    reads = api.reads
    gangs._teams({"ns1"})
    assert api.reads == reads  # a team found is remembered
    api.namespaces["ns2"] = ns({})
    gangs._teams({"ns2"})
    gangs._teams({"ns2"})
    assert api.reads == reads + 2 and "ns2" not in gangs.ns_teams  # a miss is asked again


def test_a_resync_withdraws_gangs_whose_pods_vanished_in_the_gap() -> None:
    api = FakeCore([pending("p", "team"), pending("q", "team")], {"team": ns({k8s.QUEUE_LABEL: "nlp"})})
    gangs = PodGangs(api)
    first = {a.key for a in gangs.resync()}
    api.pods = api.pods[1:]  # p deleted while the watch was away (a 410 follows)
    again = gangs.resync()
    (gone,) = [a.key for a in again if a.spec is None]
    assert gone in first and gone.startswith("team/p/") and not [a for a in again if a.spec is not None]
