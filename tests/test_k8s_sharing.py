"""GPU sharing on Kubernetes: the NVIDIA device plugin's time-slicing replicas and MIG resources as nodes advertise
them (pure functions, tested as dicts), and pods of fractional and MIG jobs bound on the test control plane's kwok
nodes by Corral as the chart deploys it (its ServiceAccount), where the replicas each node's pods ask never exceed
what it advertises."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from quotas import QueueSpec, QueueTree
from scheduler.backends.base import GpuSharing, Launch
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes import sandbox as k8s_sandbox
from scheduler.backends.kubernetes.executor import KubernetesExecutor
from scheduler.backends.kubernetes.nodes import node_info
from scheduler.backends.kubernetes.others import pod_held
from scheduler.backends.kubernetes.pods import FRACTION, PodGangs, waiting
from scheduler.backends.kubernetes.sharing import GPU, SHARED, gpu_limits, gpu_sharing, replicas_for
from scheduler.backends.kubernetes.teams import TeamConfig, desired
from scheduler.backends.sharing import overfull
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit
from scheduler.service.store.db import attempts
from scheduler.service.store.db import jobs as jobs_table
from tests.k8s_kit import ControlPlane, delete_namespaces, shared_plane, until
from tests.test_k8s_backend import IMAGE, ROOT, TEST_LABEL
from tests.test_k8s_backend import pods_of as all_pods_of
from tests.test_k8s_pods import FakeCore

H100 = "NVIDIA-H100-80GB-HBM3"
SLICED = {"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing"}


# ----- what nodes advertise -----


@pytest.mark.parametrize(
    ("labels", "alloc", "physical", "sharing"),
    [
        ({}, {GPU: "8"}, 8, None),  # plain whole GPUs: as before sharing
        (SLICED, {GPU: "8"}, 2, GpuSharing(GPU, 4)),  # 2 GPUs x 4 replicas
        (SLICED, {SHARED: "8", GPU: "0"}, 2, GpuSharing(SHARED, 4)),  # renameByDefault: true
        (SLICED, {GPU: "10"}, 2, GpuSharing(GPU, 4)),  # not a multiple: whole GPUs only (and a warning)
        (
            {"nvidia.com/mig.strategy": "mixed"},
            {GPU: "1", "nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "0", "nvidia.com/mig-x": "2"},
            1,
            GpuSharing(GPU, 1, {"1g.10gb": 7}),
        ),
        (
            {"nvidia.com/mig.strategy": "single", "nvidia.com/gpu.product": f"{H100}-MIG-1g.10gb"},
            {GPU: "14"},
            0,
            GpuSharing(GPU, 1, {"1g.10gb": 14}, mig_single=True),
        ),
    ],
)
def test_gpu_sharing_from_labels_and_allocatable(
    labels: dict[str, str], alloc: dict[str, str], physical: int, sharing: GpuSharing | None
) -> None:
    assert gpu_sharing(labels, alloc) == (physical, sharing)


def v1_node(name: str, labels: dict[str, str], alloc: dict[str, str]) -> Any:
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"nvidia.com/gpu.product": H100, **labels}),
        spec=client.V1NodeSpec(),
        status=client.V1NodeStatus(
            allocatable={"cpu": "64", "memory": "512Gi", **alloc},
            conditions=[client.V1NodeCondition(type="Ready", status="True")],
        ),
    )


def test_node_info_reads_shared_and_mig_nodes() -> None:
    sliced = node_info(v1_node("ts", SLICED, {GPU: "8"}))
    assert sliced is not None and len(sliced.gpus) == 2 and sliced.sharing == GpuSharing(GPU, 4)
    assert sliced.spec().gpus == 2 and sliced.mig_counts() == {}
    # A node whose GPUs are all cut into MIG instances is a GPU node too (it had no nvidia.com/gpu before).
    only_mig = node_info(v1_node("m", {}, {GPU: "0", "nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-2g.20gb": "2"}))
    assert only_mig is not None and only_mig.spec().gpus == 0
    assert only_mig.mig_counts() == {"1g.10gb": 7, "2g.20gb": 2}
    assert node_info(v1_node("cpu", {}, {GPU: "0"})) is None


# ----- what pods ask -----


@pytest.mark.parametrize(
    ("fraction", "replicas", "asked"), [(0.25, 4, 1), (0.5, 4, 2), (0.1, 4, 1), (0.3, 8, 2), (0.75, 4, 3)]
)
def test_replicas_for_a_fraction(fraction: float, replicas: int, asked: int) -> None:
    assert replicas_for(fraction, replicas) == asked


def test_gpu_limits() -> None:
    sliced, renamed = GpuSharing(GPU, 4), GpuSharing(SHARED, 4)
    mixed, single = GpuSharing(GPU, 1, {"1g.10gb": 7}), GpuSharing(GPU, 1, {"1g.10gb": 14}, mig_single=True)
    assert gpu_limits(sliced, 1, 0.25) == {GPU: "1"}
    assert gpu_limits(renamed, 1, 0.5) == {SHARED: "2"}
    assert gpu_limits(sliced, 2) == {GPU: "8"}  # whole GPUs of a time-sliced node: all their replicas
    assert gpu_limits(None, 2) == {GPU: "2"}
    assert gpu_limits(mixed, 0, mig="1g.10gb") == {"nvidia.com/mig-1g.10gb": "1"}
    assert gpu_limits(single, 0, mig="1g.10gb") == {GPU: "1"}
    with pytest.raises(ValueError, match="needs time-slicing"):
        gpu_limits(None, 1, 0.25)
    with pytest.raises(ValueError, match="no MIG 2g.20gb"):
        gpu_limits(mixed, 0, mig="2g.20gb")
    with pytest.raises(ValueError, match="MIG jobs only"):
        gpu_limits(single, 1)


def test_pods_carry_the_limits() -> None:
    common: dict[str, Any] = dict(namespace="ns", node="n", gpus=1, image="i", command="true")
    pod = k8s.pod("j", 1, 0, gpu_limits={SHARED: "1"}, cpus=2, **common)
    assert pod["spec"]["containers"][0]["resources"] == {"limits": {SHARED: "1"}, "requests": {"cpu": "2000m"}}
    assert k8s.pod("j", 1, 0, **common)["spec"]["containers"][0]["resources"] == {"limits": {GPU: "1"}}
    job = k8s.batch_job(
        "j",
        1,
        workers=[("n", 0)],
        gpu_limits={"nvidia.com/mig-1g.10gb": "1"},
        **{k: v for k, v in common.items() if k not in ("node", "gpus")},
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    notebook = k8s_sandbox.pod("s", 1, 0, gpu_limits={GPU: "1"}, **{**common, "gpus": 0})
    assert notebook["spec"]["containers"][0]["resources"]["limits"] == {GPU: "1"}


def test_the_team_gpu_quota_counts_replicas() -> None:
    assert k8s.resource_quota("ns", 8)["spec"]["hard"] == {"requests.nvidia.com/gpu": "8"}
    # 8 GPUs of 4-replica nodes are 32 replicas: a quota of 8 would refuse the team's third whole-GPU pod.
    assert k8s.resource_quota("ns", 8, 4, shared=True)["spec"]["hard"] == {
        "requests.nvidia.com/gpu": "32",
        "requests.nvidia.com/gpu.shared": "32",
    }
    tree = QueueTree([QueueSpec("nlp", None, {"p": 2}, {"p": 8})], {"p": 16})
    [quota] = [o for o in desired(tree, {"p": 16}, TeamConfig(gpu_replicas=4)) if o["kind"] == "ResourceQuota"]
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "32"}


def test_others_pods_holding_replicas_count_as_whole_gpus() -> None:
    def container(limits: dict[str, str]) -> Any:
        return client.V1Container(name="c", resources=client.V1ResourceRequirements(limits=limits))

    spec = client.V1PodSpec(containers=[container({SHARED: "1"}), container({GPU: "2", "cpu": "1"})])
    assert pod_held(spec).gpus == 3  # the plugin picked their GPUs: Corral keeps off as much as they could take
    assert pod_held(client.V1PodSpec(containers=[container({"nvidia.com/mig-1g.10gb": "1"})])).gpus == 0


def test_others_pods_may_ask_a_share_or_a_mig_slice() -> None:
    """Pods of others (schedulerName corral) asking a MIG slice, or replicas with corral.dev/gpu-fraction, arrive as
    jobs of a share or a slice, which the intake checks as any submission (JobSubmit)."""

    def foreign(limits: dict[str, str], notes: dict[str, str] | None = None, name: str = "p") -> Any:
        c = SimpleNamespace(image="img", resources=SimpleNamespace(requests=None, limits=limits))
        meta = SimpleNamespace(uid=f"u-{name}", namespace="ns", name=name, labels={}, annotations=notes)
        spec = SimpleNamespace(containers=[c], node_selector=None, termination_grace_period_seconds=5)
        return SimpleNamespace(metadata=meta, spec=spec)

    gangs = PodGangs(FakeCore([], {}))
    mig = waiting(foreign({"nvidia.com/mig-1g.10gb": "1"}))
    assert (mig.mig, mig.gpus) == ("1g.10gb", 0)
    spec = gangs._spec("k", ("ns", "p"), [mig], "nlp")
    assert isinstance(spec, dict) and spec["mig"] == "1g.10gb" and "gpus" not in spec
    assert JobSubmit.model_validate(spec).gpus == 0.142857
    share = waiting(foreign({GPU: "1"}, {FRACTION: "0.25"}))
    spec = gangs._spec("k", ("ns", "p"), [share], "nlp")
    assert isinstance(spec, dict) and spec["gpus"] == 0.25 and JobSubmit.model_validate(spec).gpus == 0.25
    two = waiting(foreign({"nvidia.com/mig-1g.10gb": "1", "nvidia.com/mig-2g.20gb": "1"}))
    assert "several profiles" in str(gangs._spec("k", ("ns", "p"), [two], "nlp"))
    bad = waiting(foreign({GPU: "1"}, {FRACTION: "a quarter"}))
    assert "not a number" in str(gangs._spec("k", ("ns", "p"), [bad], "nlp"))


# ----- on the control plane -----


@pytest.fixture
def plane_nodes(request: pytest.FixtureRequest) -> Iterator[tuple[ControlPlane, str, dict[str, str]]]:
    """Three kwok nodes: time-sliced (2 GPUs x 4 replicas), renamed time-sliced (2 x 4 as nvidia.com/gpu.shared),
    both in pool H100-SHARED-<tag> (as GPU feature discovery names a time-sliced node's product), and MIG (one
    whole GPU, one cut into seven 1g.10gb) in pool H100-<tag>."""
    plane = shared_plane(request.config)
    tag = uuid.uuid4().hex[:5]
    nodes = {"sliced": f"ks-{tag}-ts", "renamed": f"ks-{tag}-rn", "mig": f"ks-{tag}-mig"}
    shapes: dict[str, tuple[dict[str, str], dict[str, str]]] = {
        "sliced": (SLICED, {GPU: "8"}),
        "renamed": (SLICED, {GPU: "0", SHARED: "8"}),
        "mig": ({"nvidia.com/mig.strategy": "mixed"}, {GPU: "1", "nvidia.com/mig-1g.10gb": "7"}),
    }
    for kind, name in nodes.items():
        labels, res = shapes[kind]
        product = f"{H100}-{tag}" if kind == "mig" else f"{H100}-SHARED-{tag}"
        plane.create_gpu_node(name, product=product, labels={TEST_LABEL: tag, **labels}, resources=res)
    for name in nodes.values():
        plane.wait_node_ready(name)
    yield plane, tag, nodes
    for name in nodes.values():
        with contextlib.suppress(ApiException):
            plane.core().delete_node(name)


def pods_of(ex: KubernetesExecutor, job: str) -> list[Any]:
    """The job's pods in this executor's namespaces: job ids start at 1 in every test, and the control plane is
    shared, so another test's job 11 may still have pods (the full run found a whole-GPU job's pod that way)."""
    return [p for p in all_pods_of(ex, job) if p.metadata.namespace.startswith(ex.prefix)]


def asked(pod: Any) -> dict[str, int]:
    """The GPU resources a pod's container asks (the device plugin's; its CPU and memory aside)."""
    limits = pod.spec.containers[0].resources.limits or {}
    return {k: int(v) for k, v in limits.items() if k.startswith("nvidia.com/")}


@pytest.mark.integration
def test_shared_and_mig_pods_on_kwok_nodes(
    plane_nodes: tuple[ControlPlane, str, dict[str, str]], tmp_path: Path
) -> None:
    plane, tag, nodes = plane_nodes
    prefix = f"s{uuid.uuid4().hex[:5]}-"
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={tag}",
        watch_s=2,
        foreign_pods=False,
    )
    try:
        found = {n.name: n for n in ex.discover()}
        assert set(found) == set(nodes.values())
        sliced, renamed, mig = (found[nodes[k]] for k in ("sliced", "renamed", "mig"))
        assert (sliced.spec().gpus, renamed.spec().gpus, mig.spec().gpus) == (2, 2, 1)
        assert renamed.sharing == GpuSharing(SHARED, 4) and mig.mig_counts() == {"1g.10gb": 7}
        # What the engine would place: shares of each physical GPU summing to 1, MIG slices by profile, one whole.
        t = uuid.uuid4().hex[:4]
        plan: list[tuple[str, str, list[int], float | None, str | None]] = [
            *[(f"q{t}{i}", sliced.name, [i // 4], 0.25, None) for i in range(8)],
            (f"h{t}0", renamed.name, [0], 0.5, None),
            (f"h{t}1", renamed.name, [0], 0.5, None),
            (f"h{t}2", renamed.name, [1], 0.75, None),
            *[(f"m{t}{i}", mig.name, [], None, "1g.10gb") for i in range(7)],
            (f"w{t}", mig.name, [0], None, None),
        ]
        for job, node, gpus, fraction, profile in plan:
            env = {"CORRAL_QUEUE": "shared", "CORRAL_WORKERS": "1"}
            ex.launch(Launch(job, 1, "sleep inf", {node: gpus}, env, gpu_fraction=fraction, mig=profile))
        until(
            "every pod running", lambda: all([p.status.phase for p in pods_of(ex, j)] == ["Running"] for j, *_ in plan)
        )
        pods = {job: pods_of(ex, job)[0] for job, *_ in plan}
        assert {j: p.spec.node_name for j, p in pods.items()} == {j: n for j, n, *_ in plan}
        assert asked(pods[f"q{t}0"]) == {GPU: 1} and asked(pods[f"h{t}0"]) == {SHARED: 2}
        assert asked(pods[f"h{t}2"]) == {SHARED: 3} and asked(pods[f"m{t}0"]) == {"nvidia.com/mig-1g.10gb": 1}
        assert asked(pods[f"w{t}"]) == {GPU: 1}
        # The actual assignment, from the API server: per node, the replicas asked fit what it advertises (the
        # device plugin picks each replica's physical GPU there); per GPU Corral chose, shares sum to at most 1.
        replicas_fit(plane, list(nodes.values()))
        held = [((node, g), fraction or 1.0) for _, node, gpus, fraction, _ in plan for g in gpus]
        assert overfull(held) == {}
        # A share where the plugin shares nothing, a profile the node lacks: refused at launch, nothing made.
        with pytest.raises(OSError, match="needs time-slicing"):
            ex.launch(Launch(f"x{t}", 1, "true", {mig.name: [0]}, {"CORRAL_QUEUE": "shared"}, gpu_fraction=0.5))
        with pytest.raises(OSError, match="no MIG 3g.40gb"):
            ex.launch(Launch(f"y{t}", 1, "true", {mig.name: []}, {"CORRAL_QUEUE": "shared"}, mig="3g.40gb"))
        assert pods_of(ex, f"x{t}") == [] and pods_of(ex, f"y{t}") == []
    finally:
        ex.close()
        delete_namespaces(plane.core(), prefix)


def replicas_fit(plane: ControlPlane, nodes: list[str]) -> None:
    """Per node, the device plugin's resources its live pods ask fit what it advertises (from the API server)."""
    per_node: dict[str, Counter[str]] = {n: Counter() for n in nodes}
    for p in plane.core().list_pod_for_all_namespaces().items:
        if p.spec.node_name in per_node and p.status.phase not in ("Succeeded", "Failed"):
            per_node[p.spec.node_name].update(asked(p))
    for name, used in per_node.items():
        advertised = plane.core().read_node(name).status.allocatable
        assert all(n <= int(advertised.get(r, "0")) for r, n in used.items()), (name, used, advertised)


@pytest.mark.integration
def test_the_service_places_shares_and_slices_on_kwok_nodes(
    plane_nodes: tuple[ControlPlane, str, dict[str, str]], tmp_path: Path
) -> None:
    """The whole path: the engine places shares and MIG slices on the nodes as discovered, the executor binds
    their pods asking the plugin's resources; per GPU the engine counted the shares sum to at most 1, per node
    the replicas asked fit what it advertises."""
    plane, tag, nodes = plane_nodes
    prefix = f"v{uuid.uuid4().hex[:5]}-"
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=1,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={tag}",
        watch_s=2,
        foreign_pods=False,
    )
    shared, whole = f"{H100}-SHARED-{tag}", f"{H100}-{tag}"
    try:
        core = build_core(ServiceSettings(data_dir=tmp_path / "data", grace_s=1), executor=ex, nodes=ex.discover())
        core.apply_queues(ROOT, {"queues": [{"name": "team", "quota": {shared: 4, whole: 1}}]}, "one team")
        ids = [
            *(submit(core, shared, gpus=f) for f in [0.25] * 8 + [0.5, 0.5]),
            *(submit(core, whole, mig="1g.10gb") for _ in range(8)),
        ]
        for _ in range(3):
            core.tick()
        states = [core_state(core, i) for i in ids]
        assert states[:17] == ["running"] * 17 and states[17] == "pending", states  # 7 slices of 1g.10gb
        with core.db.connect() as conn:
            rows = conn.execute(sa.select(attempts.c.job_id, attempts.c.placement, attempts.c.gpus)).mappings().all()
        held = [((n, g), float(r["gpus"])) for r in rows for n, gs in r["placement"] for g in gs]
        assert overfull(held) == {} and sum(f for _, f in held) == pytest.approx(3.0)
        until("every pod running", lambda: all(p.status.phase == "Running" for j in ids[:17] for p in pods_of(ex, j)))
        assert sorted(asked(pods_of(ex, ids[8])[0]).values()) == [2]  # a half of a 4-replica GPU
        assert asked(pods_of(ex, ids[10])[0]) == {"nvidia.com/mig-1g.10gb": 1}
        replicas_fit(plane, list(nodes.values()))
    finally:
        ex.close()
        delete_namespaces(plane.core(), prefix)


def submit(core: Core, pool: str, gpus: float | None = None, mig: str | None = None) -> str:
    body: dict[str, Any] = {"queue": "team", "pool": pool, "command": "sleep inf"}
    body.update({"mig": mig} if mig is not None else {"gpus": gpus})
    row, _ = core.submit(ROOT, JobSubmit.model_validate(body))
    return str(row["id"])


def core_state(core: Core, job: str) -> str:
    with core.db.connect() as conn:
        return str(conn.execute(sa.select(jobs_table.c.state).where(jobs_table.c.id == int(job))).scalar_one())
