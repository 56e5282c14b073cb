"""Issue 20 on the Kubernetes backend: the real test control plane (tests/k8s_kit.py) with two kwok GPU nodes.

Corral runs as in tests/test_k8s_backend.py (the core over its own database, the KubernetesExecutor binding pods to
the nodes it chose). It is dropped without a stop while its pods run and started again, with a new executor that
finds the pods by their labels. Needs the tools from scripts/k8s-tools; skips without them (fails when
CORRAL_REQUIRE_K8S=1).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.executor import KubernetesExecutor
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings
from tests.k8s_kit import delete_namespaces, kubelet, shared_plane, until
from tests.restart_kit import Backend, issue_case, job_row, scripted_twin

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

IMAGE = "busybox:1.36"
TEST_LABEL = "corral.dev/test"


def finish(ex: KubernetesExecutor, pod: Any) -> None:
    """End a pod as its kubelet would (kwok has none to do it): phase Succeeded, its container exited 0."""
    status = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": k8s.CONTAINER,
                "image": IMAGE,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
            }
        ],
    }
    kubelet().patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})


def test_a_restart_over_running_pods_decides_as_without_one(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Demand and fair shares after the restart are those an engine built from scratch finds, and the team's 4-GPU
    job takes back the borrower's GPUs as a service never restarted decides (a scripted twin fed the same events)."""
    plane, t = shared_plane(request.config), uuid.uuid4().hex[:5]
    pool, names = f"NVIDIA-H100-{t}", [f"kr-{t}-{i}" for i in range(2)]
    for n in names:
        plane.create_gpu_node(n, product=pool, gpus=8, labels={TEST_LABEL: t})
        plane.wait_node_ready(n)
    prefix = f"r{t}-"
    settings = ServiceSettings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'c.db'}", grace_s=1)
    executors: list[KubernetesExecutor] = []

    def make() -> Core:
        """The service starting (again): a new executor finds the nodes, and the pods by their labels."""
        ex = KubernetesExecutor(
            plane.corral_client(),
            tmp_path / f"k8s{len(executors)}",
            IMAGE,
            grace_s=1,
            namespace_prefix=prefix,
            node_selector=f"{TEST_LABEL}={t}",
            watch_s=2,
            foreign_pods=False,
        )
        executors.append(ex)
        return build_core(settings, executor=ex, nodes=ex.discover())

    def end(core: Core, name: str) -> None:
        job = job_row(core, name)
        ex = executors[-1]
        selector = k8s.selector(str(job["id"]), job["attempt"])
        until(
            f"the pod of {name} running",
            lambda: (
                [p.status.phase for p in ex.core.list_pod_for_all_namespaces(label_selector=selector).items]
                == ["Running"]
            ),
        )
        for pod in ex.core.list_pod_for_all_namespaces(label_selector=selector).items:
            finish(ex, pod)

    try:
        real = Backend(make, pool, 4, command=lambda name: "sleep inf", finish=end, image=IMAGE, timeout_s=90)
        restarted = issue_case(real, restart_it=True)
        twin_nodes = executors[0].discover()
        assert restarted == issue_case(scripted_twin(tmp_path, twin_nodes, pool, 4), restart_it=False)
        assert ("Preempted", "b2") in restarted["decided"], restarted
    finally:
        for ex in executors:
            ex.close()
        delete_namespaces(plane.core(), prefix)
        for n in names:
            with contextlib.suppress(ApiException):
                plane.core().delete_node(n)
