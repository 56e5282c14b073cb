"""The pure builders of scheduler/backends/kubernetes/objects.py, checked as the dicts they return (no cluster)."""

from __future__ import annotations

import pytest

from scheduler.backends.kubernetes import objects as k8s


def test_pod_is_for_corral_to_bind_with_labels_gpus_env_and_grace() -> None:
    p = k8s.pod(
        "42",
        3,
        1,
        namespace="corral-nlp",
        node="n2",
        gpus=4,
        image="img:1",
        command=["python", "t.py"],
        env={"CORRAL_QUEUE": "nlp", "CORRAL_OWNER": "ann", "X": "y"},
        workers=2,
        workdir="/w",
        grace_s=12.4,
    )
    assert p["apiVersion"] == "v1" and p["kind"] == "Pod"
    meta, spec = p["metadata"], p["spec"]
    assert meta["name"] == "corral-42-3-1" and meta["namespace"] == "corral-nlp"
    assert meta["labels"] == {
        k8s.MANAGED_BY: "corral",
        k8s.JOB_LABEL: "42",
        k8s.ATTEMPT_LABEL: "3",
        k8s.WORKER_LABEL: "1",
        k8s.GROUP_LABEL: "corral-42-3",
        k8s.KIND_LABEL: "job",
        k8s.QUEUE_LABEL: "nlp",
        k8s.OWNER_LABEL: "ann",
    }
    assert meta["annotations"] == {k8s.NODE_ANNOTATION: "n2", k8s.WORKERS_ANNOTATION: "2"}
    assert spec["schedulerName"] == "corral" and "nodeName" not in spec  # bound through the Binding API
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 12
    (c,) = spec["containers"]
    assert c["image"] == "img:1" and c["command"] == ["python", "t.py"] and c["workingDir"] == "/w"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {
        "CORRAL_QUEUE": "nlp",
        "CORRAL_OWNER": "ann",
        "X": "y",
        "CORRAL_JOB_ID": "42",
        "CORRAL_ATTEMPT": "3",
        "CORRAL_WORKER": "1",
        "CORRAL_WORKERS": "2",
        "CORRAL_NODE": "n2",
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": k8s.MANAGED_TAINT, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_every_pod_runs_confined_and_without_api_credentials() -> None:
    """The trust model (docs/kubernetes.md): never root, whatever the image's USER; no privilege escalation, no
    capabilities, the runtime's seccomp profile (Pod Security "restricted"), and no service-account token."""
    p = k8s.pod("42", 3, 1, namespace="corral-nlp", node="n2", gpus=4, image="img:1", command=["t"])
    spec = p["spec"]
    assert spec["securityContext"] == RESTRICTED_POD
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["securityContext"] == RESTRICTED_CONTAINER
    assert "privileged" not in c["securityContext"] and "hostNetwork" not in spec and "hostPID" not in spec
    other = k8s.pod("42", 3, 1, namespace="n", node="n2", gpus=1, image="i", command=["t"], run_as_user=2000)
    assert other["spec"]["securityContext"]["runAsUser"] == 2000
    # An Indexed Job's template carries the same, and the user it was given.
    j = k8s.batch_job("42", 3, namespace="n", workers=[("n1", 1), ("n2", 1)], image="i", command="x", run_as_user=3000)
    tpl = j["spec"]["template"]["spec"]
    assert tpl["securityContext"] == {**RESTRICTED_POD, "runAsUser": 3000}
    assert tpl["automountServiceAccountToken"] is False
    assert tpl["containers"][0]["securityContext"] == RESTRICTED_CONTAINER
    for root in (0, -1):
        with pytest.raises(ValueError, match="never run as root"):
            k8s.pod("1", 1, 0, namespace="n", node="a", gpus=1, image="i", command="x", run_as_user=root)


def test_a_command_string_runs_in_a_shell_and_an_empty_one_is_refused() -> None:
    p = k8s.pod("1", 1, 0, namespace="n", node="a", gpus=1, image="i", command="echo hi && sleep 1")
    assert p["spec"]["containers"][0]["command"] == ["/bin/sh", "-c", "echo hi && sleep 1"]
    assert k8s.argv(["echo hi"]) == ["/bin/sh", "-c", "echo hi"]
    assert "workingDir" not in p["spec"]["containers"][0]
    with pytest.raises(ValueError):
        k8s.argv("  ")
    with pytest.raises(ValueError):
        k8s.argv([])


def test_binding_targets_the_node() -> None:
    assert k8s.binding("corral-1-1-0", "ns", "node-7") == {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "corral-1-1-0", "namespace": "ns"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-7"},
    }


def test_names_are_dns_labels() -> None:
    assert k8s.team_namespace("Research/Vision") == "corral-research-vision"
    assert k8s.team_namespace("nlp", prefix="") == "nlp"
    assert len(k8s.dns_label("x" * 100)) == 63
    assert k8s.selector("7", 2) == "corral.dev/job=7,corral.dev/attempt=2"
    with pytest.raises(ValueError):
        k8s.dns_label("///")


def test_split_workers_follows_the_gang_shape() -> None:
    assert k8s.split_workers({"a": [0, 1, 2, 3]}, 2) == [("a", 2), ("a", 2)]
    assert k8s.split_workers({"a": [0, 1], "b": [4, 5]}, 2) == [("a", 2), ("b", 2)]
    assert k8s.split_workers({"a": [0, 1], "b": [4]}, 0) == [("a", 2), ("b", 1)]
    assert k8s.split_workers({"a": [0, 1, 2]}, 2) == [("a", 3)]  # does not divide: one worker per node
    with pytest.raises(ValueError):
        k8s.split_workers({}, 1)


def test_team_objects() -> None:
    assert k8s.namespace("corral-nlp", "nlp") == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": "corral-nlp",
            "labels": {
                k8s.MANAGED_BY: "corral",
                k8s.TEAM_LABEL: "nlp",
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }
    rb = k8s.role_binding("corral-nlp", "team-nlp")
    assert rb["kind"] == "RoleBinding" and rb["metadata"]["namespace"] == "corral-nlp"
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}
    assert rb["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "team-nlp"}]
    q = k8s.resource_quota("corral-nlp", 16)
    assert q["kind"] == "ResourceQuota" and q["spec"] == {"hard": {"requests.nvidia.com/gpu": "16"}}
    np = k8s.network_policy("corral-nlp", "hub")
    assert np["kind"] == "NetworkPolicy" and np["spec"]["policyTypes"] == ["Ingress"]
    assert np["spec"]["podSelector"] == {"matchLabels": {k8s.KIND_LABEL: "sandbox"}}
    (rule,) = np["spec"]["ingress"]
    assert rule == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "hub"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "hub"}},
            }
        ]
    }


def test_cpus_and_memory_are_requests_and_memory_also_the_limit() -> None:
    p = k8s.pod("1", 1, 0, namespace="n", node="a", gpus=2, image="i", command="x", cpus=3.5, memory_gb=48)
    assert p["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": "2", "memory": "49152Mi"},
        "requests": {"cpu": "3500m", "memory": "49152Mi"},
    }
    assert k8s.resources(0, cpus=0.0001) == {"limits": {"nvidia.com/gpu": "0"}, "requests": {"cpu": "1m"}}
    assert k8s.resources(1, memory_gb=0.5) == {
        "limits": {"nvidia.com/gpu": "1", "memory": "512Mi"},
        "requests": {"memory": "512Mi"},
    }
    assert k8s.resources(1, None, None) == {"limits": {"nvidia.com/gpu": "1"}}  # not asked: no requests


def test_batch_job_is_one_indexed_job_whose_pods_corral_binds_by_index() -> None:
    j = k8s.batch_job(
        "42",
        3,
        namespace="corral-nlp",
        workers=[("n1", 4), ("n2", 4)],
        image="img:1",
        command="train",
        env={"CORRAL_QUEUE": "nlp", "CORRAL_OWNER": "ann"},
        grace_s=5,
    )
    assert j["apiVersion"] == "batch/v1" and j["kind"] == "Job"
    meta, spec = j["metadata"], j["spec"]
    assert meta["name"] == "corral-42-3" and meta["namespace"] == "corral-nlp"
    labels = {
        k8s.MANAGED_BY: "corral",
        k8s.JOB_LABEL: "42",
        k8s.ATTEMPT_LABEL: "3",
        k8s.GROUP_LABEL: "corral-42-3",
        k8s.KIND_LABEL: "job",
        k8s.QUEUE_LABEL: "nlp",
        k8s.OWNER_LABEL: "ann",
    }
    notes = {k8s.NODES_ANNOTATION: "n1,n2", k8s.WORKERS_ANNOTATION: "2"}
    assert meta["labels"] == labels and meta["annotations"] == notes
    assert (spec["completions"], spec["parallelism"], spec["completionMode"], spec["backoffLimit"]) == (
        2,
        2,
        "Indexed",
        0,
    )
    tpl = spec["template"]
    assert tpl["metadata"] == {"labels": labels, "annotations": notes}  # what poll, adopt and terminate look for
    assert tpl["spec"]["schedulerName"] == "corral" and tpl["spec"]["restartPolicy"] == "Never"
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 5 and "nodeName" not in tpl["spec"]
    (c,) = tpl["spec"]["containers"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["CORRAL_WORKERS"] == "2" and env["CORRAL_JOB_ID"] == "42"
    assert env["CORRAL_WORKER"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{k8s.JOB_INDEX}']"}}
    assert env["CORRAL_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    with pytest.raises(ValueError, match="one template"):
        k8s.batch_job("1", 1, namespace="n", workers=[("a", 2), ("b", 1)], image="i", command="x")


def test_chosen_node_of_a_pod_and_of_a_jobs_pod_by_its_index() -> None:
    assert k8s.chosen_node({k8s.NODE_ANNOTATION: "a"}) == "a"
    jobs_pod = {k8s.NODES_ANNOTATION: "a,b"}
    assert k8s.chosen_node({**jobs_pod, k8s.JOB_INDEX: "1"}) == "b"
    assert k8s.chosen_node({**jobs_pod, k8s.JOB_INDEX: "2"}) is None  # not an index Corral placed
    assert k8s.chosen_node(jobs_pod) is None and k8s.chosen_node({}) is None
