"""Pure parts of the foreign-pod path: the binding and event bodies as dicts, and how a pod reads as a gang member."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from scheduler.backends import k8s_objects as k8s
from scheduler.backends.k8s_pods import GROUP_SIZE, POOL_LABEL, gang_key, waiting


def pod(labels: dict[str, str] | None = None, notes: dict[str, str] | None = None, gpus: str = "2",
        selector: dict[str, str] | None = None) -> Any:
    container = SimpleNamespace(image="img", resources=SimpleNamespace(limits={k8s.GPU: gpus}))
    return SimpleNamespace(
        metadata=SimpleNamespace(uid="u1", namespace="ns", name="p-0", labels=labels, annotations=notes),
        spec=SimpleNamespace(containers=[container, container], node_selector=selector,
                             termination_grace_period_seconds=5))


def test_binding_carries_marks_as_annotations() -> None:
    assert k8s.binding("p", "ns", "n1") == {"apiVersion": "v1", "kind": "Binding",
                                            "metadata": {"name": "p", "namespace": "ns"},
                                            "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"}}
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
