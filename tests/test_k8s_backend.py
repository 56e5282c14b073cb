"""The Kubernetes backend on the real test control plane (tests/k8s_kit.py) with kwok GPU nodes.

Two pools of two 8-GPU kwok nodes each, made once for the module. kwok runs bound pods (phase Running) but has no
kubelet to end a bare pod, so where a test needs a pod to succeed or fail it writes the pod's status as a kubelet
would. Each test's executor uses its own namespace prefix, and its namespaces are deleted afterwards.
Needs the tools from scripts/k8s-tools; skips without them (fails when CORRAL_REQUIRE_K8S=1).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import CLUSTER_OWNER, Arrival, Exit, Handle, Launch, NodeInfo
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.executor import KubernetesExecutor, NodeChange, NodeWatcher, discover_nodes
from scheduler.backends.kubernetes.pods import GROUP_SIZE, POD_GROUP_ENV, POOL_LABEL
from scheduler.service.api.auth import Principal, Role
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit
from scheduler.service.store.db import events
from scheduler.service.store.db import jobs as jobs_table
from tests.k8s_kit import ControlPlane, delete_namespaces, kubelet, shared_plane, until

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

IMAGE = "busybox:1.36"
ROOT = Principal("root", Role.PLATFORM_ADMIN)


TEST_LABEL = "corral.dev/test"  # the nodes of one test module or test: executors select only theirs


@dataclass
class Cluster:
    plane: ControlPlane
    pools: list[str]  # two pools
    nodes: dict[str, list[str]]  # pool -> its two nodes
    tag: str

    def ours(self, found: list[NodeInfo]) -> list[NodeInfo]:
        return [n for n in found if n.pool in self.pools]


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    plane = shared_plane(request.config)
    tag = uuid.uuid4().hex[:5]
    pools = [f"NVIDIA-H100-{tag}", f"NVIDIA-A100-{tag}"]
    nodes = {p: [f"kb-{tag}-{i}-{j}" for j in range(2)] for i, p in enumerate(pools)}
    for p, names in nodes.items():
        for n in names:
            plane.create_gpu_node(n, product=p, gpus=8, labels={TEST_LABEL: tag})
    for names in nodes.values():
        for n in names:
            plane.wait_node_ready(n)
    yield Cluster(plane, pools, nodes, tag)
    for names in nodes.values():
        for n in names:
            with contextlib.suppress(ApiException):
                plane.core().delete_node(n)


@pytest.fixture
def executor(cluster: Cluster, tmp_path: Path) -> Iterator[KubernetesExecutor]:
    prefix = f"c{uuid.uuid4().hex[:5]}-"
    ex = KubernetesExecutor(
        cluster.plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={cluster.tag}",
        watch_s=2,
        foreign_pods=False,
    )
    yield ex
    ex.close()
    core = cluster.plane.core()
    delete_namespaces(core, prefix)


def pods_of(ex: KubernetesExecutor, job: str, attempt: int = 1) -> list[Any]:
    items = ex.core.list_pod_for_all_namespaces(label_selector=k8s.selector(job, attempt)).items
    return sorted(items, key=lambda p: p.metadata.name)


def running(ex: KubernetesExecutor, job: str, n: int, attempt: int = 1) -> list[Any]:
    until(f"{n} pods of {job} running", lambda: [p.status.phase for p in pods_of(ex, job, attempt)] == ["Running"] * n)
    return pods_of(ex, job, attempt)


def finish(ex: KubernetesExecutor, pod: Any, code: int) -> None:
    """End a pod as its kubelet would: phase and the container's terminated state."""
    phase = "Succeeded" if code == 0 else "Failed"
    status = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": k8s.CONTAINER,
                "image": IMAGE,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}},
            }
        ],
    }
    kubelet().patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})


def wait_exits(ex: KubernetesExecutor, want: set[tuple[str, int]], timeout: float = 60) -> dict[str, Exit]:
    got: dict[str, Exit] = {}

    def done() -> bool:
        got.update({e.job_id: e for e in ex.poll(time.time())})
        return {(j, e.attempt) for j, e in got.items()} >= want

    until(f"exits of {want}", done, timeout)
    return got


def launch(
    job: str, gpus: dict[str, list[int]], workers: int = 1, queue: str = "nlp", command: str = "sleep inf"
) -> Launch:
    return Launch(job, 1, command, gpus, {"CORRAL_QUEUE": queue, "CORRAL_WORKERS": str(workers)})


def watch_for(watcher: NodeWatcher, node: str) -> list[NodeChange]:
    """Node changes from the watch until one about `node` arrives."""
    changes: list[NodeChange] = []

    def seen() -> bool:
        changes.extend(watcher.changes(1))
        return any(c.name == node for c in changes)

    until(f"a change of {node} seen by the watch", seen)
    return changes


def test_discovery_pools_and_node_changes(cluster: Cluster) -> None:
    api = cluster.plane.corral_client()
    found = cluster.ours(discover_nodes(api))
    assert sorted(n.name for n in found) == sorted(n for ns in cluster.nodes.values() for n in ns)
    assert {n.pool for n in found} == set(cluster.pools)
    assert all(len(n.gpus) == 8 and n.cpus == 64 and n.memory_gb == 512 for n in found)
    assert found[0].gpus[0].model == found[0].pool
    # A cordoned node stays, marked cordoned (its jobs stay); the watch, resumed from the list's resourceVersion,
    # says so; uncordoning opens it again.
    watcher = NodeWatcher(api)
    watcher.resync()
    node = cluster.nodes[cluster.pools[1]][1]
    core = cluster.plane.core()
    core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        assert [n.cordoned for n in discover_nodes(api) if n.name == node] == [True]
        changes = watch_for(watcher, node)
        assert [(c.info.cordoned, len(c.info.gpus)) for c in changes if c.name == node and c.info] == [(True, 8)]
    finally:
        core.patch_node(node, {"spec": {"unschedulable": False}})
    changes = watch_for(watcher, node)
    up = [c.info for c in changes if c.name == node]
    assert up and up[0] is not None and len(up[0].gpus) == 8 and not up[0].cordoned
    # A version the server no longer has (410 Gone) falls back to a full list.
    watcher.resource_version = "1"
    watcher.changes(1)
    assert node in watcher.known


def test_pods_are_bound_where_corral_chose_and_terminate_deletes_them(
    cluster: Cluster, executor: KubernetesExecutor
) -> None:
    (a, b), (c, _) = cluster.nodes.values()
    t = uuid.uuid4().hex[:5]
    one, gang, packed = f"one{t}", f"gang{t}", f"pack{t}"
    executor.launch(launch(one, {b: [6, 7]}))
    executor.launch(launch(gang, {a: [0, 1, 2, 3], c: [0, 1, 2, 3]}, workers=2))
    executor.launch(launch(packed, {b: [0, 1, 2, 3]}, workers=2))  # two workers on one node
    p1 = running(executor, one, 1)
    assert p1[0].spec.node_name == b and p1[0].spec.scheduler_name == "corral"
    assert p1[0].spec.containers[0].resources.limits == {"nvidia.com/gpu": "2"}
    assert p1[0].metadata.namespace == f"{executor.prefix}nlp"
    assert [p.spec.node_name for p in running(executor, gang, 2)] == [a, c]
    assert [p.spec.node_name for p in running(executor, packed, 2)] == [b, b]
    assert all(executor.alive(j, 1) for j in (one, gang, packed))
    # Binding was Corral's: kube-scheduler never touched them (its events would say "Scheduled" by default).
    events = cluster.plane.core().list_namespaced_event(p1[0].metadata.namespace).items
    assert not [e for e in events if e.reason == "Scheduled" and e.involved_object.name == p1[0].metadata.name]
    assert executor.poll(time.time()) == []
    executor.terminate(gang, 1, 1.0, time.time())
    executor.terminate(one, 1, 1.0, time.time())
    got = wait_exits(executor, {(gang, 1), (one, 1)})
    assert got[gang] == Exit(gang, 1, -15, "stopped by Corral") and got[one].code == -15
    assert pods_of(executor, gang) == [] and not executor.alive(gang, 1)
    out, err = executor.logs(packed, 1)  # kwok's pods have no kubelet logs: the files exist and are empty
    assert Path(out).read_text() == "" and Path(err).exists()


def test_exits_succeeded_failed_and_deleted(cluster: Cluster, executor: KubernetesExecutor) -> None:
    (a, b), _ = cluster.nodes.values()
    t = uuid.uuid4().hex[:5]
    ok, bad, gang, gone = f"ok{t}", f"bad{t}", f"g{t}", f"gone{t}"
    executor.launch(launch(ok, {a: [0]}))
    executor.launch(launch(bad, {a: [1]}))
    executor.launch(launch(gang, {a: [2, 3], b: [2, 3]}, workers=2))
    executor.launch(launch(gone, {b: [0]}))
    finish(executor, running(executor, ok, 1)[0], 0)
    finish(executor, running(executor, bad, 1)[0], 3)
    finish(executor, running(executor, gang, 2)[1], 7)  # one worker fails: the gang ends, the other is deleted
    p = running(executor, gone, 1)[0]
    executor.core.delete_namespaced_pod(p.metadata.name, p.metadata.namespace)  # someone else deleted it
    got = wait_exits(executor, {(ok, 1), (bad, 1), (gang, 1), (gone, 1)})
    assert got[ok].code == 0 and got[bad].code == 3 and got[gang].code == 7 and got[gone].code == -15
    assert pods_of(executor, gang) == []  # the surviving worker was deleted with the gang


def test_a_new_executor_adopts_pods_by_label(cluster: Cluster, executor: KubernetesExecutor, tmp_path: Path) -> None:
    (a, b), _ = cluster.nodes.values()
    t = uuid.uuid4().hex[:5]
    long, done, unbound = f"long{t}", f"done{t}", f"unb{t}"
    executor.launch(launch(long, {a: [4, 5], b: [4, 5]}, workers=2))
    executor.launch(launch(done, {a: [6]}))
    finish(executor, running(executor, done, 1)[0], 0)
    running(executor, long, 2)
    # Crashed between creating a pod and binding it: the pod waits, Pending and unbound.
    ns = f"{executor.prefix}nlp"
    executor.core.create_namespaced_pod(
        ns,
        k8s.pod(
            unbound, 1, 0, namespace=ns, node=b, gpus=1, image=IMAGE, command="sleep inf", env={"CORRAL_QUEUE": "nlp"}
        ),
    )
    again = KubernetesExecutor(
        cluster.plane.corral_client(), tmp_path / "k8s2", IMAGE, grace_s=1, namespace_prefix=executor.prefix
    )
    assert again.adopt(Handle(long, 1, None, 0.0)) is None
    assert again.adopt(Handle(done, 1, None, 0.0)) == Exit(done, 1, 0, "ended while Corral was down")
    gone = again.adopt(Handle(f"never{t}", 1, None, 0.0))
    assert gone is not None and gone.code is None
    assert again.adopt(Handle(unbound, 1, None, 0.0)) is None  # bound now, onto the node the engine chose
    assert running(again, unbound, 1)[0].spec.node_name == b
    assert again.alive(long, 1) and again.poll(time.time()) == []
    again.terminate(long, 1, 1.0, time.time())
    again.terminate(unbound, 1, 1.0, time.time())
    assert wait_exits(again, {(long, 1), (unbound, 1)})[long].code == -15


def test_a_look_alike_pod_elsewhere_neither_ends_the_gang_nor_gets_bound(
    cluster: Cluster, executor: KubernetesExecutor
) -> None:
    """Marks are only text: a pod copying an attempt's labels, in another namespace or under another name, is not
    one of its workers."""
    (a, b), _ = cluster.nodes.values()
    job = f"real{uuid.uuid4().hex[:5]}"
    executor.launch(launch(job, {a: [0]}))
    running(executor, job, 1)
    core = cluster.plane.core()
    fakes = []
    for ns, name in (("default", k8s.pod_name(job, 1, 0)), (f"{executor.prefix}nlp", f"x-{job}")):
        fake = k8s.pod(
            job, 1, 0, namespace=ns, node=b, gpus=1, image=IMAGE, command="sleep inf", env={"CORRAL_QUEUE": "nlp"}
        )
        fake["metadata"]["name"] = name
        core.create_namespaced_pod(ns, fake)
        fakes.append((ns, name))
        finish(executor, core.read_namespaced_pod(name, ns), 9)  # a failed worker would end the real gang
    for _ in range(3):
        assert executor.poll(time.time()) == [] and executor.alive(job, 1)
    for ns, name in fakes:  # never bound by Corral (kwok "finished" it unbound)
        assert core.read_namespaced_pod(name, ns).spec.node_name is None
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    executor.terminate(job, 1, 0, time.time())
    wait_exits(executor, {(job, 1)})


def test_binding_twice_is_handled(cluster: Cluster, executor: KubernetesExecutor) -> None:
    (a, b), _ = cluster.nodes.values()
    job = f"twice{uuid.uuid4().hex[:5]}"
    first = launch(job, {a: [7]})
    executor.launch(first)
    executor.launch(first)  # a retried launch: the pod exists (409) and is bound already (409): carry on
    (p,) = running(executor, job, 1)
    assert p.spec.node_name == a
    with pytest.raises(ApiException) as e:  # bound elsewhere than asked: a real conflict, not swallowed
        executor._bind(p.metadata.namespace, p.metadata.name, b)
    assert e.value.status == 409
    executor.terminate(job, 1, 0, time.time())
    wait_exits(executor, {(job, 1)})


def test_team_objects_are_accepted_by_the_api_server(cluster: Cluster, executor: KubernetesExecutor) -> None:
    ns = f"{executor.prefix}team"
    cluster.plane.core().create_namespace(k8s.namespace(ns, "team"))
    made = cluster.plane.apply(
        ns, [k8s.role_binding(ns, "team-group"), k8s.resource_quota(ns, 16), k8s.network_policy(ns, "hub")]
    )
    assert [m.kind for m in made] == ["RoleBinding", "ResourceQuota", "NetworkPolicy"]


def test_end_to_end_two_teams_reclaim_and_a_cordoned_node(
    cluster: Cluster, executor: KubernetesExecutor, tmp_path: Path
) -> None:
    api = cluster.plane.corral_client()  # Corral as the chart deploys it
    nodes = cluster.ours(discover_nodes(api))
    p1, p2 = cluster.pools
    settings = ServiceSettings(data_dir=tmp_path / "data", grace_s=1)
    core = build_core(settings, executor=executor, nodes=nodes)
    assert core.capacity == {p1: 16, p2: 16}
    # Pool 2's quotas fit in one node: a restart with a node cordoned must still hold them (Core.start refuses
    # a tree whose quotas exceed the pools it finds).
    core.apply_queues(
        ROOT,
        {
            "queues": [
                {"name": "alpha", "quota": {p1: 8, p2: 4}, "limit": {p1: 16, p2: 16}},
                {"name": "beta", "quota": {p1: 8, p2: 4}},
            ]
        },
        "two teams",
    )

    def submit(queue: str, pool: str, workers: int, gpus: int) -> str:
        row, _ = core.submit(ROOT, JobSubmit(queue=queue, pool=pool, workers=workers, gpus=gpus, command="sleep inf"))
        return str(row["id"])

    def state(c: Core, job: str) -> str:
        with c.db.connect() as conn:
            from_db = c.readable(conn, ROOT, int(job))
        return str(from_db["state"])

    def tick_until(c: Core, what: str, cond: Callable[[], bool]) -> None:
        until(what, lambda: bool(c.tick() or True) and cond(), 90)

    # alpha fills pool 1 with two 2x4 gangs, borrowing beta's guarantee.
    g1, g2 = submit("alpha", p1, 2, 4), submit("alpha", p1, 2, 4)
    tick_until(core, "alpha's gangs running", lambda: state(core, g1) == state(core, g2) == "running")
    for g in (g1, g2):
        assert {p.spec.node_name for p in running(executor, g, 2)} <= set(cluster.nodes[p1])
    # beta reclaims its guarantee: one of alpha's gangs is preempted, its pods deleted, beta's gang bound.
    mine = submit("beta", p1, 2, 4)
    tick_until(core, "beta running", lambda: state(core, mine) == "running")
    victim = next(g for g in (g1, g2) if state(core, g) == "pending")
    assert pods_of(executor, victim, 1) == []
    beta_pods = running(executor, mine, 2)
    assert beta_pods[0].metadata.namespace == f"{executor.prefix}beta"
    # When beta's gang finishes, the victim's job is created again, as attempt 2.
    for p in beta_pods:
        finish(executor, p, 0)
    tick_until(core, "the victim back", lambda: state(core, mine) == "completed" and state(core, victim) == "running")
    assert len(running(executor, victim, 2, attempt=2)) == 2

    # kubectl cordon (issue 22, item 5): the job on the node keeps running; nothing new lands there, neither
    # while Corral watches nor after a restart that rediscovers the nodes and adopts the running pods.
    first = submit_to(core, "alpha", p2, gpus=4)
    tick_until(core, "a p2 job running", lambda: state(core, first) == "running")
    cordoned = running(executor, first, 1)[0].spec.node_name
    other = next(n for n in cluster.nodes[p2] if n != cordoned)
    cluster.plane.core().patch_node(cordoned, {"spec": {"unschedulable": True}})
    again: KubernetesExecutor | None = None
    try:
        tick_until(core, "the cordon seen", lambda: core.cluster.nodes[cordoned].cordoned)
        second, third = submit_to(core, "alpha", p2, gpus=4), submit_to(core, "alpha", p2)
        tick_until(core, "the second on the other node", lambda: state(core, second) == "running")
        assert running(executor, second, 1)[0].spec.node_name == other  # best fit alone would pick the cordoned
        for _ in range(3):
            core.tick()
        assert state(core, first) == "running" and state(core, third) == "pending"
        assert [p.metadata.deletion_timestamp for p in pods_of(executor, first)] == [None]
        resynced = cluster.ours(discover_nodes(api))
        assert {n.name: n.cordoned for n in resynced if n.pool == p2} == {cordoned: True, other: False}
        again = KubernetesExecutor(
            api,
            tmp_path / "k8s2",
            IMAGE,
            grace_s=1,
            namespace_prefix=executor.prefix,
            node_selector=f"{TEST_LABEL}={cluster.tag}",
            foreign_pods=False,
        )
        core2 = build_core(settings, executor=again, nodes=resynced)
        assert core2.capacity == {p1: 16, p2: 16} and state(core2, victim) == "running"
        for _ in range(3):
            core2.tick()
        assert [state(core2, j) for j in (first, second, third)] == ["running", "running", "pending"]
        on_cordoned = cluster.plane.core().list_pod_for_all_namespaces(field_selector=f"spec.nodeName={cordoned}")
        assert [p.metadata.labels.get(k8s.JOB_LABEL) for p in on_cordoned.items] == [k8s.dns_label(first)]
    finally:
        if again is not None:
            again.close()
        cluster.plane.core().patch_node(cordoned, {"spec": {"unschedulable": False}})


def submit_to(core: Core, queue: str, pool: str, gpus: int = 8) -> str:
    row, _ = core.submit(ROOT, JobSubmit(queue=queue, pool=pool, workers=1, gpus=gpus, command="sleep inf"))
    return str(row["id"])


def state_of(c: Core, job: int | str) -> str:
    with c.db.connect() as conn:
        return str(c.readable(conn, ROOT, int(job))["state"])


def ticking(c: Core, what: str, cond: Callable[[], bool], timeout: float = 90) -> None:
    until(what, lambda: bool(c.tick() or True) and cond(), timeout)


def live_pods_on(cluster: Cluster, node: str) -> list[Any]:
    pods = cluster.plane.core().list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
    return [p for p in pods if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")]


def test_nodes_cordoned_uncordoned_and_deleted_while_corral_runs(cluster: Cluster, tmp_path: Path) -> None:
    """Cordon (issue 22, item 5): the node's job keeps running and nothing new is bound there; uncordon: new work
    lands there again; drain (cordon, evict): the evicted job waits again; delete: its job is requeued and the pool
    shrinks. All seen by the node watch while Core
    cycles."""
    plane, t = cluster.plane, uuid.uuid4().hex[:5]
    pool, (n1, n2) = f"NVIDIA-L4-{t}", [f"kl-{t}-{i}" for i in range(2)]
    for n in (n1, n2):
        plane.create_gpu_node(n, product=pool, gpus=8, labels={TEST_LABEL: t})
        plane.wait_node_ready(n)
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=f"n{t}-",
        node_selector=f"{TEST_LABEL}={t}",
        watch_s=2,
        foreign_pods=False,
    )
    k8s_core = plane.core()
    try:
        core = build_core(ServiceSettings(data_dir=tmp_path / "data", grace_s=1), executor=ex, nodes=ex.discover())
        assert core.capacity == {pool: 16}
        jobs = [
            str(core.submit(ROOT, JobSubmit(queue="default", gpus=8, command="sleep inf"))[0]["id"]) for _ in range(2)
        ]
        ticking(core, "both jobs running", lambda: all(state_of(core, j) == "running" for j in jobs))
        on = {running(ex, j, 1)[0].spec.node_name: j for j in jobs}
        k8s_core.patch_node(n1, {"spec": {"unschedulable": True}})
        ticking(core, "the cordon seen", lambda: core.cluster.nodes[n1].cordoned)
        for _ in range(5):
            core.tick()
        assert core.cluster.down == set() and core.capacity == {pool: 16} and state_of(core, on[n1]) == "running"
        assert [p.metadata.name for p in live_pods_on(cluster, n1)] == [p.metadata.name for p in pods_of(ex, on[n1])]
        # Its job ends: the cordoned node is empty, and still nothing new lands there.
        core.cancel(ROOT, int(on[n1]))
        until("the cancelled job's pod gone", lambda: bool(core.tick() or True) and live_pods_on(cluster, n1) == [])
        third = str(core.submit(ROOT, JobSubmit(queue="default", gpus=8, command="sleep inf"))[0]["id"])
        for _ in range(5):
            core.tick()
        assert live_pods_on(cluster, n1) == [] and state_of(core, third) == "pending"
        k8s_core.patch_node(n1, {"spec": {"unschedulable": False}})
        ticking(core, "the third job on the uncordoned node", lambda: state_of(core, third) == "running")
        pod = running(ex, third, 1)[0]
        assert pod.spec.node_name == n1
        # kubectl drain: cordon, then evict. The evicted job waits again (not failed), and runs once there is room.
        k8s_core.patch_node(n1, {"spec": {"unschedulable": True}})
        ticking(core, "the cordon seen", lambda: core.cluster.nodes[n1].cordoned)
        k8s_core.create_namespaced_pod_eviction(
            pod.metadata.name,
            pod.metadata.namespace,
            {
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": pod.metadata.name, "namespace": pod.metadata.namespace},
            },
        )
        ticking(core, "the drained job back in the queue", lambda: state_of(core, third) == "pending")
        with core.db.connect() as conn:
            drained = (
                conn.execute(
                    sa.select(events.c.data).where(events.c.job_id == int(third), events.c.kind == "preempted")
                )
                .scalars()
                .all()
            )
        assert [d["cause"] for d in drained] == ["node_drained"]
        k8s_core.patch_node(n1, {"spec": {"unschedulable": False}})
        ticking(core, "the drained job running again", lambda: state_of(core, third) == "running")
        assert running(ex, third, 1, attempt=2)[0].spec.node_name == n1
        k8s_core.delete_node(n2)
        ticking(core, "the deletion seen", lambda: n2 not in core.cluster.nodes and state_of(core, on[n2]) == "pending")
        assert core.capacity == {pool: 8}
        until("the deleted node's pod gone", lambda: pods_of(ex, on[n2]) == [])
        with core.db.connect() as conn:
            kinds = [
                e["kind"]
                for e in conn.execute(sa.select(events.c.kind).where(events.c.job_id == int(on[n2]))).mappings()
            ]
        assert kinds.count("preempted") == 1
    finally:
        ex.close()
        for n in (n1, n2):
            with contextlib.suppress(ApiException):
                k8s_core.delete_node(n)


def foreign_pod(
    name: str,
    gpus: int,
    labels: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
    product: str | None = None,
) -> dict[str, Any]:
    """A pod someone else made for Corral to schedule."""
    spec: dict[str, Any] = {
        "schedulerName": "corral",
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "main", "image": IMAGE, "resources": {"limits": {k8s.GPU: str(gpus)}}}],
        "tolerations": [{"key": k8s.GPU, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if product:
        spec["nodeSelector"] = {k8s.GPU_PRODUCT: product}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "spec": spec,
        "metadata": {"name": name, "labels": labels or {}, "annotations": notes or {}},
    }


def created(api: Any, ns: str, pod: dict[str, Any]) -> bool:
    """Create `pod`; False while admission does not know its PriorityClass yet (it learns new ones from a watch)."""
    try:
        api.create_namespaced_pod(ns, pod)
    except client.ApiException as e:
        if e.status == 403 and "PriorityClass" in str(e.body):
            return False
        raise
    return True


def cluster_job(c: Core, name: str) -> tuple[int, str]:
    with c.db.connect() as conn:
        row = conn.execute(
            sa.select(jobs_table.c.id, jobs_table.c.state)
            .where(jobs_table.c.owner == CLUSTER_OWNER, jobs_table.c.name == name)
            .order_by(jobs_table.c.id.desc())
        ).first()
    return (row.id, row.state) if row is not None else (0, "none")


def test_pods_of_others_are_gangs_bound_on_admission_and_deleted_on_preemption(
    cluster: Cluster, tmp_path: Path
) -> None:
    plane = cluster.plane
    (a, b), _ = cluster.nodes.values()
    p1, p2 = cluster.pools
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=f"f{uuid.uuid4().hex[:5]}-",
        node_selector=f"{TEST_LABEL}={cluster.tag}",
        watch_s=2,
    )
    api = plane.core()
    scheduling, spare = client.SchedulingV1Api(plane.api_client()), f"spare-{uuid.uuid4().hex[:5]}"
    with plane.namespace("fp") as ns:
        api.patch_namespace(ns, {"metadata": {"labels": {k8s.QUEUE_LABEL: "alpha"}}})
        try:
            core = build_core(ServiceSettings(data_dir=tmp_path / "data", grace_s=1), executor=ex, nodes=ex.discover())
            core.apply_queues(
                ROOT,
                {
                    "queues": [
                        {"name": "alpha", "quota": {p1: 8, p2: 8}, "limit": {p1: 16}},
                        {"name": "beta", "quota": {p1: 8, p2: 8}},
                    ]
                },
            )
            gang = {k8s.GROUP_LABEL: "train"}
            for i in range(2):  # a gang of two 4-GPU pods, in alpha (its namespace's queue)
                api.create_namespaced_pod(ns, foreign_pod(f"train-{i}", 4, gang, {GROUP_SIZE: "2"}, product=p1))
            api.create_namespaced_pod(ns, foreign_pod("lost", 1, {k8s.QUEUE_LABEL: "nope", POOL_LABEL: p1}))
            api.create_namespaced_pod(
                ns, foreign_pod("half-0", 1, {k8s.GROUP_LABEL: "half", GROUP_SIZE: "2"}, product=p1)
            )  # waits for its second pod
            ticking(core, "the gang running", lambda: cluster_job(core, "train")[1] == "running")
            # alpha borrows beyond quota, with a PriorityClass and CPU and memory requests, which its job keeps
            # (issue 22: they were dropped, so nodes were over-committed and the class ignored).
            scheduling.create_priority_class({"metadata": {"name": spare}, "value": -5})
            solo = foreign_pod("solo", 4, {POOL_LABEL: p1})
            solo["spec"]["priorityClassName"] = spare
            solo["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "3", "memory": "6Gi"}
            until("the new PriorityClass known to admission", lambda: created(api, ns, solo))
            ticking(core, "the solo pod running", lambda: cluster_job(core, "solo")[1] == "running")
            with core.db.connect() as conn:
                asked = conn.execute(
                    sa.select(jobs_table.c.spec).where(jobs_table.c.id == cluster_job(core, "solo")[0])
                ).scalar_one()
            assert (asked["cpus"], asked["memory_gb"], asked["priority"], asked["preemptible"]) == (3, 6, -5, True)
            pods = {p.metadata.name: p for p in api.list_namespaced_pod(ns).items}
            assert {pods[f"train-{i}"].spec.node_name for i in range(2)} <= {a, b}
            job_id = cluster_job(core, "train")[0]
            # The Binding API copied Corral's marks onto the pods: a restarted Corral finds them by these.
            assert pods["train-0"].metadata.annotations[k8s.JOB_LABEL] == str(job_id)
            assert pods["half-0"].spec.node_name is None and cluster_job(core, "half")[1] == "none"
            assert pods["lost"].spec.node_name is None and cluster_job(core, "lost")[1] == "none"
            until(
                "a warning event on the refused pod",
                lambda: any(
                    e.reason == "FailedScheduling" and "nope" in e.message
                    for e in api.list_namespaced_event(ns, field_selector="involvedObject.name=lost").items
                ),
            )
            # beta reclaims its quota: alpha's borrowing pod is deleted (its grace), its job ends, not requeued.
            mine = str(
                core.submit(ROOT, JobSubmit(queue="beta", pool=p1, workers=2, gpus=4, command="sleep inf"))[0]["id"]
            )
            ticking(core, "beta running", lambda: state_of(core, mine) == "running")
            assert cluster_job(core, "solo")[1] == "cancelled" and cluster_job(core, "train")[1] == "running"
            until(
                "the preempted pod gone",
                lambda: not [p for p in api.list_namespaced_pod(ns).items if p.metadata.name == "solo"],
            )
            # The gang's pods succeed: the job completes, and its pods stay for their owner to count.
            for i in range(2):
                finish(ex, pods[f"train-{i}"], 0)
            ticking(core, "the gang completed", lambda: cluster_job(core, "train")[1] == "completed")
            assert {p.metadata.name for p in api.list_namespaced_pod(ns).items} >= {"train-0", "train-1"}
            # A pending gang that loses a pod before admission is withdrawn: its job is cancelled.
            api.create_namespaced_pod(
                ns, foreign_pod("half-1", 1, {k8s.GROUP_LABEL: "half", GROUP_SIZE: "2"}, product=p1)
            )
            core.apply_queues(
                ROOT,
                {
                    "queues": [
                        {"name": "alpha", "quota": {p1: 8, p2: 8}, "limit": {p1: 8}},
                        {"name": "beta", "quota": {p1: 8, p2: 8}},
                    ]
                },
            )
            for i in range(2):  # fill alpha's limit, so the half gang waits
                api.create_namespaced_pod(ns, foreign_pod(f"fill-{i}", 4, {POOL_LABEL: p1}))
            ticking(
                core,
                "the fillers running and the half gang waiting",
                lambda: cluster_job(core, "fill-1")[1] == "running" and cluster_job(core, "half")[1] == "pending",
            )
            api.delete_namespaced_pod("half-1", ns, grace_period_seconds=0)
            ticking(core, "the half gang withdrawn", lambda: cluster_job(core, "half")[1] == "cancelled")
            # A restart finds the running pods of others by the marks on them, and offers nothing twice.
            ex.close()
            ex = KubernetesExecutor(
                plane.corral_client(),
                tmp_path / "k8s2",
                IMAGE,
                grace_s=1,
                namespace_prefix=ex.prefix,
                node_selector=f"{TEST_LABEL}={cluster.tag}",
                watch_s=2,
            )
            again = build_core(ServiceSettings(data_dir=tmp_path / "data", grace_s=1), executor=ex, nodes=ex.discover())
            with again.db.connect() as conn:
                before = conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar_one()
            again.tick()
            assert cluster_job(again, "fill-0")[1] == cluster_job(again, "fill-1")[1] == "running"
            finish(ex, api.read_namespaced_pod("fill-0", ns), 0)
            ticking(
                again, "a filler completed after the restart", lambda: cluster_job(again, "fill-0")[1] == "completed"
            )
            with again.db.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar_one() == before
        finally:
            ex.close()
            with contextlib.suppress(client.ApiException):  # not made, if the test failed before
                scheduling.delete_priority_class(spare)


def test_a_pod_bound_by_someone_else_is_not_bound_twice(cluster: Cluster, tmp_path: Path) -> None:
    plane = cluster.plane
    (a, b), _ = cluster.nodes.values()
    ex = KubernetesExecutor(
        plane.corral_client(), tmp_path / "k8s", IMAGE, node_selector=f"{TEST_LABEL}={cluster.tag}", watch_s=2
    )
    with plane.namespace("fb") as ns:
        plane.core().patch_namespace(ns, {"metadata": {"labels": {k8s.QUEUE_LABEL: "q"}}})  # its team
        try:
            plane.core().create_namespaced_pod(ns, foreign_pod("raced", 1, {k8s.QUEUE_LABEL: "q"}))
            offered: list[Arrival] = []
            until(
                "the pod offered",
                lambda: bool(
                    offered.extend(ex.arrivals(0.0))
                    or any(x.spec is not None and x.spec["name"] == "raced" for x in offered)
                ),
            )
            key = next(x.key for x in offered if x.spec is not None and x.spec["name"] == "raced")
            plane.bind(ns, "raced", b)  # another scheduler got there first
            with pytest.raises(OSError, match="409"):
                ex.launch(Launch("77", 1, "pods", {a: [0]}, {POD_GROUP_ENV: key}))
            assert plane.core().read_namespaced_pod("raced", ns).spec.node_name == b
            with pytest.raises(OSError, match="gone"):  # taken once: a second launch finds nothing to bind
                ex.launch(Launch("77", 1, "pods", {a: [0]}, {POD_GROUP_ENV: key}))
        finally:
            ex.close()
