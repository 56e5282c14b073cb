"""The test control plane (tests/k8s_kit.py) comes up, and kwok simulates GPU nodes and pod lifecycles on it.

Needs the tools from scripts/k8s-tools; skips without them (fails when CORRAL_REQUIRE_K8S=1)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from scheduler.backends.kubernetes import objects as k8s
from tests.k8s_kit import GPU, GPU_PRODUCT, POOL_LABEL, ControlPlane, shared_plane, wait_for

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

K8S_VERSION = "v1.36.3"


@pytest.fixture(scope="session")
def plane(request: pytest.FixtureRequest) -> ControlPlane:
    return shared_plane(request.config)


@pytest.fixture
def ns(plane: ControlPlane) -> Iterator[str]:
    with plane.namespace("cp") as name:
        yield name


@pytest.fixture
def gpu_node(plane: ControlPlane) -> Iterator[str]:
    name = f"kwok-gpu-{uuid.uuid4().hex[:6]}"
    plane.create_gpu_node(name, product="NVIDIA-A100-SXM4-80GB", gpus=4, pool=f"pool-{name}")
    yield name
    plane.core().delete_node(name)


def gpu_pod(name: str, gpus: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "busybox:1.36",
                    "command": ["sleep", "inf"],
                    "resources": {"limits": {GPU: str(gpus)}},
                }
            ],
            "terminationGracePeriodSeconds": 0,
            **spec,
        },
    }


def test_control_plane_is_up_with_rbac(plane: ControlPlane, ns: str) -> None:
    version = client.VersionApi(plane.api_client()).get_code()
    assert version.git_version == K8S_VERSION  # stamped by scripts/k8s-tools' -ldflags -X
    names = {n.metadata.name for n in plane.core().list_namespace().items}
    assert {"default", "kube-system", ns} <= names
    # RBAC is on: a fresh service account may do nothing; the admin (system:masters) anything.
    plane.core().create_namespaced_service_account(ns, {"metadata": {"name": "nobody"}})
    authz = client.AuthorizationV1Api(plane.api_client())

    def allowed(user: str, verb: str, resource: str, groups: list[str] | None = None) -> bool:
        review = authz.create_subject_access_review(
            {
                "spec": {
                    "user": user,
                    "groups": groups or [],
                    "resourceAttributes": {"namespace": ns, "verb": verb, "resource": resource},
                }
            }
        )
        return bool(review.status.allowed)

    assert not allowed(f"system:serviceaccount:{ns}:nobody", "list", "pods", ["system:serviceaccounts"])
    assert allowed("someone", "delete", "pods", ["system:masters"])


def test_kwok_gpu_node_shows_allocatable_gpus(plane: ControlPlane, gpu_node: str) -> None:
    node = plane.wait_node_ready(gpu_node)
    assert node.status.allocatable[GPU] == "4"
    assert node.status.capacity[GPU] == "4"
    assert node.metadata.labels[GPU_PRODUCT] == "NVIDIA-A100-SXM4-80GB"
    assert node.metadata.labels[POOL_LABEL] == f"pool-{gpu_node}"
    assert node.status.node_info.kubelet_version.startswith("kwok-")


def test_pod_bound_through_binding_api_runs(plane: ControlPlane, ns: str, gpu_node: str) -> None:
    plane.wait_node_ready(gpu_node)
    core = plane.core()
    # A scheduler name nobody serves: kube-scheduler leaves the pod alone, and we bind it as Corral would.
    core.create_namespaced_pod(ns, gpu_pod("bound", 2, schedulerName="corral"))
    assert core.read_namespaced_pod("bound", ns).status.phase == "Pending"
    plane.bind(ns, "bound", gpu_node)
    pod = plane.wait_pod(ns, "bound", "Running")  # kwok's pod-ready stage
    assert pod.spec.node_name == gpu_node
    assert pod.status.pod_ip and pod.status.container_statuses[0].ready
    # Deleting goes through kwok's pod-delete stage (the simulated kubelet confirms it).
    core.delete_namespaced_pod("bound", ns)
    wait_for("pod deleted", lambda: not [p for p in core.list_namespaced_pod(ns).items], 60, plane.procs)


def test_kube_scheduler_counts_gpus(plane: ControlPlane, ns: str, gpu_node: str) -> None:
    plane.wait_node_ready(gpu_node)
    core = plane.core()
    pin = {"nodeSelector": {POOL_LABEL: f"pool-{gpu_node}"}}
    core.create_namespaced_pod(ns, gpu_pod("fits", 3, **pin))
    assert plane.wait_pod(ns, "fits", "Running").spec.node_name == gpu_node
    # 3 of 4 GPUs are taken: a 2-GPU pod stays Pending, unschedulable for want of nvidia.com/gpu.
    core.create_namespaced_pod(ns, gpu_pod("waits", 2, **pin))

    def unschedulable() -> bool:
        conds = core.read_namespaced_pod("waits", ns).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" and GPU in (c.message or "") for c in conds)

    wait_for("pod 'waits' unschedulable", unschedulable, 60, plane.procs)


def test_job_pod_completes(plane: ControlPlane, ns: str, gpu_node: str) -> None:
    plane.wait_node_ready(gpu_node)
    batch = client.BatchV1Api(plane.api_client())
    tmpl = gpu_pod("x", 1, nodeSelector={POOL_LABEL: f"pool-{gpu_node}"}, restartPolicy="Never")
    batch.create_namespaced_job(
        ns, {"metadata": {"name": "train"}, "spec": {"backoffLimit": 0, "template": {"spec": tmpl["spec"]}}}
    )
    # kwok's pod-complete stage finishes pods owned by a Job; the job controller marks the Job complete.
    wait_for(
        "job train complete",
        lambda: (batch.read_namespaced_job("train", ns).status.succeeded or 0) == 1,
        90,
        plane.procs,
    )


def test_the_managed_taint_keeps_kube_scheduler_off_and_corrals_pods_tolerate_it(
    plane: ControlPlane, ns: str, gpu_node: str
) -> None:
    """docs/kubernetes.md: taint the nodes Corral manages, so kube-scheduler places nothing there that Corral does not
    count (issue 22, item 3). An ordinary pod pinned to the node stays unschedulable; the pod Corral builds, handed to
    kube-scheduler instead, is placed there: its tolerations match the taint."""
    core = plane.core()
    core.patch_node(
        gpu_node, {"spec": {"taints": [{"key": k8s.MANAGED_TAINT, "value": "true", "effect": "NoSchedule"}]}}
    )
    pin = {"nodeSelector": {"kubernetes.io/hostname": gpu_node}}
    core.create_namespaced_pod(ns, gpu_pod("ordinary", 1, **pin))
    corrals = k8s.pod("7", 1, 0, namespace=ns, node=gpu_node, gpus=1, image="busybox:1.36", command=["true"])
    corrals["spec"].update(schedulerName="default-scheduler", **pin)
    core.create_namespaced_pod(ns, corrals)

    def unschedulable() -> bool:
        conds = core.read_namespaced_pod("ordinary", ns).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_for("the ordinary pod refused by the taint", unschedulable, 60, plane.procs)
    name = corrals["metadata"]["name"]
    wait_for(
        "Corral's pod placed despite the taint",
        lambda: core.read_namespaced_pod(name, ns).spec.node_name == gpu_node,
        60,
        plane.procs,
    )
