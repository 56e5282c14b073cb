"""Attempts as batch/v1 Jobs (workload "job") on the real test control plane: the Job controller of
kube-controller-manager makes the pods, Corral binds each to the node chosen for its index, and the Job's end is
the attempt's exit. kwok runs bound pods and completes the pods of Jobs (its pod-complete stage).
Needs the tools from scripts/k8s-tools; skips without them (fails when CORRAL_REQUIRE_K8S=1).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from scheduler.backends.base import Exit, Handle, Launch
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.executor import WORKLOAD_ENV, KubernetesExecutor
from tests import test_k8s_backend as kb
from tests.test_k8s_backend import IMAGE, Cluster, finish, launch, pods_of, until

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

cluster, executor = kb.cluster, kb.executor  # the backend tests' fixtures: four kwok nodes, an executor


def as_job(launch: Launch) -> Launch:
    return Launch(launch.job_id, launch.attempt, launch.command, launch.gpus, {**launch.env, WORKLOAD_ENV: "job"})


def jobs_of(ex: KubernetesExecutor, job: str) -> list[Any]:
    return list(ex.batch.list_job_for_all_namespaces(label_selector=k8s.selector(job, 1)).items)


def appeared(ex: KubernetesExecutor, job: str, n: int) -> list[Any]:
    """The Job's n pods, once its controller has made them (unbound: nobody polled yet)."""
    until(f"{n} pods of the Job {job}", lambda: len(pods_of(ex, job)) == n)
    return sorted(pods_of(ex, job), key=lambda p: p.metadata.annotations[k8s.JOB_INDEX])


def test_a_jobs_pods_are_bound_by_index_and_its_completion_is_the_exit(cluster: Cluster, tmp_path: Path) -> None:
    (a, b), (c, _) = cluster.nodes.values()
    prefix = f"j{uuid.uuid4().hex[:5]}-"
    ex = KubernetesExecutor(
        cluster.plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=prefix,
        foreign_pods=False,
        workload="job",
    )
    job = f"idx{uuid.uuid4().hex[:5]}"
    try:
        ex.launch(launch(job, {c: [0, 1, 2, 3], a: [4, 5, 6, 7]}, workers=2))
        (j,) = jobs_of(ex, job)
        assert j.spec.completion_mode == "Indexed" and j.spec.completions == 2 and j.spec.backoff_limit == 0
        pods = appeared(ex, job, 2)
        assert [p.spec.node_name for p in pods] == [None, None]
        assert all(p.spec.scheduler_name == "corral" for p in pods)  # kube-scheduler left them alone
        # A restarted Corral adopts the Job and binds its pods: index 0 on c, index 1 on a, as the engine chose.
        again = KubernetesExecutor(
            cluster.plane.corral_client(),
            tmp_path / "k8s2",
            IMAGE,
            grace_s=1,
            namespace_prefix=prefix,
            foreign_pods=False,
        )
        assert again.adopt(Handle(job, 1, None, 0.0)) is None
        nodes = {p.metadata.name: p.spec.node_name for p in pods_of(ex, job)}
        assert [nodes[p.metadata.name] for p in pods] == [c, a]
        # kwok runs the pods and completes them; the Job controller says Complete: the attempt exits 0.
        got: list[Exit] = []
        until("the Job's exit", lambda: bool(got.extend(again.poll(time.time())) or got))
        assert got == [Exit(job, 1, 0, "")]
        until("the Job and its pods deleted", lambda: not jobs_of(ex, job) and not pods_of(ex, job))
    finally:
        ex.close()


def test_a_failed_pod_fails_the_job_and_terminate_deletes_it(cluster: Cluster, executor: KubernetesExecutor) -> None:
    (a, b), _ = cluster.nodes.values()
    t = uuid.uuid4().hex[:5]
    bad, stopped = f"bad{t}", f"stop{t}"
    executor.launch(as_job(launch(bad, {a: [0, 1], b: [0, 1]}, workers=2)))
    executor.launch(as_job(launch(stopped, {b: [2]})))
    finish(executor, appeared(executor, bad, 2)[1], 3)  # before Corral bound it, as good a failure as any
    appeared(executor, stopped, 1)
    executor.terminate(stopped, 1, 1.0, time.time())
    assert jobs_of(executor, stopped) == []  # deleted at once; its pods go with their grace
    got: dict[str, Exit] = {}
    until(
        "both exits",
        lambda: bool(got.update({e.job_id: e for e in executor.poll(time.time())})) or set(got) == {bad, stopped},
    )
    assert got[bad].code == 3 and got[stopped] == Exit(stopped, 1, -15, "stopped by Corral")
    until(
        "their Jobs and pods gone",
        lambda: not any(jobs_of(executor, j) or pods_of(executor, j) for j in (bad, stopped)),
    )
