"""Kueue interop: the typed models, `export` of a queue tree, `corral kueue export`, and (against the test API
server with Kueue's own CRDs installed, from scripts/kueue-crds) that the real schema and CEL rules take the export
and refuse what Kueue refuses.

The last test runs Kueue's controller (scripts/kueue, tests/kueue_kit.py) and shows it admitting a batch/v1 Job through
an exported tree. The end-to-end tests need the control plane (scripts/k8s-tools) and Go with the module proxy
(scripts/kueue-crds, scripts/kueue); they skip without them, and fail instead when CORRAL_REQUIRE_K8S=1."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from typer.testing import CliRunner

from quotas import QueueSpec
from scheduler.cli.main import app
from scheduler.kueue import ClusterQueue, Cohort, ExportError, LocalQueue, ResourceFlavor, export, from_dict, losses
from scheduler.kueue.client import KueueClient
from scheduler.kueue.export import export_objects
from tests.factories import queue, queue_tree
from tests.k8s_kit import REQUIRE_ENV, ControlPlane, require_bin_dir, shared_plane, wait_for
from tests.kueue_kit import QUEUE_LABEL, KueueController, condition, require_kueue, wait_until
from tests.marks import starts_processes

ROOT = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
CAPACITY = {"h100": 16, "a100": 4}
FLAVORS = {"h100": "h100", "a100": "a100"}


def specs(suffix: str = "") -> list[QueueSpec]:
    """Two departments; research's quota exceeds its teams' by 2; nlp may borrow 2; adhoc (top-level) has none."""
    return [
        queue(f"research{suffix}", quota={"h100": 8, "a100": 1}, limit={"h100": 12}, weight=2),
        queue(f"nlp{suffix}", f"research{suffix}", quota={"h100": 4}, limit={"h100": 6}),
        queue(f"vision{suffix}", f"research{suffix}", quota={"h100": 2, "a100": 1}, weight=0.5),
        queue(f"product{suffix}", quota={"h100": 4}),
        queue(f"ranking{suffix}", f"product{suffix}", quota={"h100": 4}),
        queue(f"adhoc{suffix}", limit={"a100": 2}),
    ]


def by_kind(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def gpus(obj: dict[str, Any], flavor: str) -> dict[str, Any]:
    (group,) = obj["spec"]["resourceGroups"]
    assert group["coveredResources"] == [GPU]
    (res,) = next(f for f in group["flavors"] if f["name"] == flavor)["resources"]
    assert res["name"] == GPU
    return {k: v for k, v in res.items() if k != "name"}


# ----- unit -----------------------------------------------------------------------------------------------


def test_export_maps_the_tree() -> None:
    objs = export(queue_tree(*specs(), gpus=CAPACITY), FLAVORS, lambda q: f"team-{q.name}")
    assert all(o["apiVersion"] == "kueue.x-k8s.io/v1beta2" for o in objs)
    # Creation order: what is referenced comes first.
    kinds = [o["kind"] for o in objs]
    assert kinds == sorted(kinds, key=["ResourceFlavor", "Cohort", "ClusterQueue", "LocalQueue"].index)
    o = by_kind(objs)
    assert o["ResourceFlavor", "h100"]["spec"] == {"nodeLabels": {"nvidia.com/gpu.product": "h100"}}
    # The root cohort holds what no top-level queue is guaranteed: 16 - 8 - 4 h100, 4 - 1 a100.
    root = o["Cohort", "corral"]["spec"]
    assert "parentName" not in root
    assert gpus(o["Cohort", "corral"], "h100") == {"nominalQuota": 4}
    assert gpus(o["Cohort", "corral"], "a100") == {"nominalQuota": 3}
    # A department: its own share beyond its teams' quotas (8 - 4 - 2), and borrowing up to its limit.
    research = o["Cohort", "research"]["spec"]
    assert research["parentName"] == "corral"
    assert research["fairSharing"] == {"weight": 2}
    assert gpus(o["Cohort", "research"], "h100") == {"nominalQuota": 2, "borrowingLimit": 4}
    assert gpus(o["Cohort", "research"], "a100") == {"nominalQuota": 0}  # all of it is vision's
    nlp = o["ClusterQueue", "nlp"]["spec"]
    assert nlp["cohortName"] == "research"
    assert gpus(o["ClusterQueue", "nlp"], "h100") == {"nominalQuota": 4, "borrowingLimit": 2}
    assert gpus(o["ClusterQueue", "nlp"], "a100") == {"nominalQuota": 0}  # unlimited: no borrowingLimit
    assert nlp["preemption"] == {
        "reclaimWithinCohort": "Any",
        "borrowWithinCohort": {"policy": "Never"},
        "withinClusterQueue": "LowerPriority",
    }
    assert nlp["queueingStrategy"] == "BestEffortFIFO"
    assert nlp["namespaceSelector"] == {}
    assert o["ClusterQueue", "vision"]["spec"]["fairSharing"] == {"weight": "0.5"}  # a quantity, not a float
    adhoc = o["ClusterQueue", "adhoc"]
    assert adhoc["spec"]["cohortName"] == "corral"
    assert gpus(adhoc, "a100") == {"nominalQuota": 0, "borrowingLimit": 2}
    assert o["LocalQueue", "adhoc"]["metadata"]["namespace"] == "team-adhoc"
    assert o["LocalQueue", "adhoc"]["spec"] == {"clusterQueue": "adhoc"}
    # Inner queues have no ClusterQueue or LocalQueue: jobs go to leaves only.
    assert ("ClusterQueue", "research") not in o and ("LocalQueue", "product") not in o


def test_export_covers_cpu_and_memory_at_the_root() -> None:
    """Kueue leaves pending a workload asking a resource its ClusterQueue does not cover: with the pools' CPU and
    memory given, they are covered in the GPUs' resource group, all held by the root cohort, 0 of their own (no
    borrowingLimit) everywhere else, so any queue may use them as in Corral."""
    totals = {"h100": {"cpu": 256, "memory": "2Ti"}, "a100": {"cpu": "64", "memory": "512Gi"}}
    o = by_kind(export(queue_tree(*specs(), gpus=CAPACITY), FLAVORS, lambda q: "ns", pool_resources=totals))

    def quotas(obj: dict[str, Any], flavor: str) -> dict[str, dict[str, Any]]:
        (group,) = obj["spec"]["resourceGroups"]
        assert group["coveredResources"] == [GPU, "cpu", "memory"]
        res = next(f for f in group["flavors"] if f["name"] == flavor)["resources"]
        assert [r["name"] for r in res] == [GPU, "cpu", "memory"]  # Kueue's CEL rule: in coveredResources' order
        return {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in res}

    assert quotas(o["Cohort", "corral"], "h100") == {
        GPU: {"nominalQuota": 4},
        "cpu": {"nominalQuota": 256},
        "memory": {"nominalQuota": "2Ti"},
    }
    assert quotas(o["Cohort", "corral"], "a100")["cpu"] == {"nominalQuota": 64}  # "64" read as the server sends it
    assert quotas(o["Cohort", "research"], "h100") == {
        GPU: {"nominalQuota": 2, "borrowingLimit": 4},
        "cpu": {"nominalQuota": 0},
        "memory": {"nominalQuota": 0},
    }
    assert quotas(o["ClusterQueue", "nlp"], "h100") == {
        GPU: {"nominalQuota": 4, "borrowingLimit": 2},
        "cpu": {"nominalQuota": 0},
        "memory": {"nominalQuota": 0},
    }
    for obj in export_objects(queue_tree(*specs(), gpus=CAPACITY), FLAVORS, lambda q: "ns", pool_resources=totals):
        assert from_dict(obj.to_dict()) == obj
    # Every exported pool needs both totals, as quantities.
    with pytest.raises(ExportError) as e:
        export(
            queue_tree(*specs(), gpus=CAPACITY),
            FLAVORS,
            lambda q: "ns",
            pool_resources={"h100": {"cpu": "lots", "memory": "1Ti", "gpu": 1}},
        )
    assert "pool 'a100' has no total cpu" in str(e.value)
    assert "pool 'h100': cpu 'lots' is not a quantity" in str(e.value)
    assert "pool 'h100': gpu is not a resource Corral exports" in str(e.value)


def test_models_round_trip_and_refuse_what_kueue_refuses() -> None:
    for obj in export_objects(queue_tree(*specs(), gpus=CAPACITY), FLAVORS, lambda q: "ns"):
        again = from_dict(obj.to_dict())
        assert again == obj and type(again) is type(obj)
    cq = by_kind(export(queue_tree(*specs(), gpus=CAPACITY), FLAVORS, lambda q: "ns"))["ClusterQueue", "nlp"]
    bad = copy.deepcopy(cq)
    bad["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = -1
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ClusterQueue.from_dict(bad)
    with pytest.raises(ValidationError, match="metadata.namespace is required"):
        LocalQueue.from_dict({"metadata": {"name": "x"}, "spec": {"clusterQueue": "x"}})
    with pytest.raises(ValueError, match="expected kind Cohort"):
        Cohort.from_dict(cq)
    # What the server hands back: quantities as strings, extra fields.
    served = {**cq, "status": {"pendingWorkloads": 0}, "metadata": {**cq["metadata"], "uid": "u", "generation": 1}}
    served["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = "4"
    assert ClusterQueue.from_dict(served).spec.resource_groups[0].flavors[0].resources[0].nominal_quota == 4


def test_export_refuses_names_kubernetes_refuses_and_reports_losses() -> None:
    tree = queue_tree(queue("Team_A"), queue("corral"), gpus={"h100": 8})
    with pytest.raises(ExportError) as e:
        export(tree, {"h100": "h100"}, lambda q: "ns")
    assert "queue 'Team_A' is not a Kubernetes name" in str(e.value)
    assert "the root cohort 'corral' has the name of a queue" in str(e.value)
    tree = queue_tree(queue("a", weight={"h100": 2}), gpus=CAPACITY)
    assert losses(tree, {"h100": "h100"}) == [
        "pool 'a100' is not exported (no flavor given): its quotas and limits are dropped"
    ]
    assert "Kueue has one weight per queue: exported as 1" in losses(tree, FLAVORS)[0]


def test_cli_export(tmp_path: Path) -> None:
    doc = {
        "queues": [
            {"name": "research", "quota": {"h100": 8}},
            {"name": "nlp", "parent": "research", "quota": {"h100": 4}, "limit": {"h100": 8}},
        ]
    }
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(doc))
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "kueue",
            "export",
            "-f",
            str(tmp_path / "q.yaml"),
            "--pools",
            "h100=16",
            "--flavor",
            "h100=h100-sxm",
            "--product",
            "h100=NVIDIA-H100-80GB-HBM3",
            "--namespace",
            "ml-{queue}",
        ],
    )
    assert r.exit_code == 0, r.output
    o = by_kind(list(yaml.safe_load_all(r.stdout)))
    assert o["ResourceFlavor", "h100-sxm"]["spec"]["nodeLabels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert gpus(o["ClusterQueue", "nlp"], "h100-sxm") == {"nominalQuota": 4, "borrowingLimit": 4}
    assert o["LocalQueue", "nlp"]["metadata"]["namespace"] == "ml-nlp"
    r = runner.invoke(app, ["kueue", "export", "-f", str(tmp_path / "q.yaml"), "--pools", "h100=16", "-o", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "List"
    r = runner.invoke(app, ["kueue", "export", "-f", str(tmp_path / "q.yaml"), "--pools", "h100=4"])
    assert r.exit_code == 2 and "more than the pool's capacity of 4" in r.stderr
    # Without the pools' CPU and memory only GPUs are covered, and the note says what Kueue then needs.
    r = runner.invoke(app, ["kueue", "export", "-f", str(tmp_path / "q.yaml"), "--pools", "h100=16"])
    assert r.exit_code == 0 and "resources.excludeResourcePrefixes: [cpu, memory]" in r.stderr
    r = runner.invoke(
        app,
        [
            "kueue",
            "export",
            "-f",
            str(tmp_path / "q.yaml"),
            "--pools",
            "h100=16",
            "--cpu",
            "h100=128",
            "--memory",
            "h100=1Ti",
        ],
    )
    assert r.exit_code == 0 and "excludeResourcePrefixes" not in r.stderr
    o = by_kind(list(yaml.safe_load_all(r.stdout)))
    root = o["Cohort", "corral"]["spec"]["resourceGroups"][0]
    assert root["coveredResources"] == [GPU, "cpu", "memory"]
    assert root["flavors"][0]["resources"][1:] == [
        {"name": "cpu", "nominalQuota": 128},
        {"name": "memory", "nominalQuota": "1Ti"},
    ]
    r = runner.invoke(app, ["kueue", "export", "-f", str(tmp_path / "q.yaml"), "--pools", "h100=16", "--cpu", "h100=8"])
    assert r.exit_code == 2 and "pool 'h100' has no total memory" in r.stderr


# ----- end to end: the real CRDs on the test API server ---------------------------------------------------


def kueue_crds_dir() -> Path:
    """scripts/kueue-crds' dir; skip (or fail under CORRAL_REQUIRE_K8S=1) when Go or the proxy is not there."""
    try:
        out = subprocess.run([str(ROOT / "scripts" / "kueue-crds")], capture_output=True, text=True, timeout=300)
        why = out.stderr.strip() if out.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why:
        msg = f"Kueue's CRDs are not available: {why}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(msg)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
@starts_processes
def kueue(request: pytest.FixtureRequest) -> KueueClient:
    """The shared control plane with Kueue's CRDs installed and Established (once per session: they stay)."""
    plane: ControlPlane = shared_plane(request.config)
    crds = kueue_crds_dir()
    ext = client.ApiextensionsV1Api(plane.api_client())
    names = []
    for path in sorted(crds.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            names.append(doc["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(doc)
            except ApiException as e:
                if e.status != 409:  # installed by an earlier test module of this session
                    raise

    def established() -> bool:
        for name in names:
            status = ext.read_custom_resource_definition(name).status
            conds = (status.conditions if status else None) or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    wait_for("Kueue's CRDs Established", established, 60, plane.procs)
    return KueueClient(plane.api_client())


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> Iterator[str]:
    with shared_plane(request.config).namespace("kueue") as name:
        yield name


def rejection(e: pytest.ExceptionInfo[ApiException]) -> str:
    assert e.value.status == 422, e.value.body
    return str(json.loads(e.value.body or "{}")["message"])


def test_export_is_valid_under_kueues_crds(kueue: KueueClient, ns: str) -> None:
    suffix = f"-{uuid.uuid4().hex[:6]}"  # cluster-scoped names: unique per run of the shared control plane
    tree = queue_tree(*specs(suffix), gpus=CAPACITY)
    flavors = {p: f"{p}{suffix}" for p in CAPACITY}
    objects = export_objects(tree, flavors, lambda q: ns, root=f"corral{suffix}")
    made = kueue.apply_all(objects)
    # The server kept every field (no pruning by the structural schema) and defaulted none we left out.
    assert [m.to_dict()["spec"] for m in made] == [o.to_dict()["spec"] for o in objects]
    nlp = next(o for o in objects if isinstance(o, ClusterQueue) and o.metadata.name == f"nlp{suffix}")
    assert kueue.get(ClusterQueue, f"nlp{suffix}").spec == nlp.spec
    assert {q.metadata.name for q in kueue.list(LocalQueue, ns)} == {q.name for q in tree.leaves}
    assert {
        c.spec.parent_name
        for c in kueue.list(Cohort, label_selector="app.kubernetes.io/managed-by=corral")
        if c.metadata.name.endswith(suffix)
    } == {None, f"corral{suffix}"}
    # apply again: a replace of what is there, with a change.
    again = export_objects(
        queue_tree(
            *specs(suffix)[:1],
            queue(f"nlp{suffix}", f"research{suffix}", quota={"h100": 5}),
            *specs(suffix)[2:],
            gpus=CAPACITY,
        ),
        flavors,
        lambda q: ns,
        root=f"corral{suffix}",
    )
    nlp = next(o for o in again if isinstance(o, ClusterQueue) and o.metadata.name == f"nlp{suffix}")
    assert kueue.apply(nlp).spec.resource_groups[0].flavors[0].resources[0].nominal_quota == 5
    for o in reversed(made):
        kueue.delete(type(o), o.metadata.name, o.metadata.namespace)
    assert not any(f.metadata.name == flavors["h100"] for f in kueue.list(ResourceFlavor))


def test_kueues_cel_rules_refuse_bad_objects(kueue: KueueClient, ns: str) -> None:
    suffix = f"-{uuid.uuid4().hex[:6]}"
    objects = export(
        queue_tree(queue(f"team{suffix}", quota={"h100": 2}, limit={"h100": 4}), gpus={"h100": 8}),
        {"h100": f"h100{suffix}"},
        lambda q: ns,
        root=f"corral{suffix}",
    )
    cq = next(o for o in objects if o["kind"] == "ClusterQueue")
    api = kueue.api

    def create(body: dict[str, Any]) -> None:
        # Raw, past Corral's models: what reaches the server is only what its CRD schema and CEL rules allow.
        api.create_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "clusterqueues", body)

    # A borrowingLimit outside any cohort: the ClusterQueue spec's CEL rule.
    lone = copy.deepcopy(cq)
    del lone["spec"]["cohortName"]
    with pytest.raises(ApiException) as e:
        create(lone)
    assert "borrowingLimit must be nil when cohort is empty" in rejection(e)
    # Borrowing preemption while never reclaiming: the preemption CEL rule.
    odd = copy.deepcopy(cq)
    odd["spec"]["preemption"] = {"reclaimWithinCohort": "Never", "borrowWithinCohort": {"policy": "LowerPriority"}}
    with pytest.raises(ApiException) as e:
        create(odd)
    assert "reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never" in rejection(e)
    # A flavor that does not cover every covered resource: the resource group's CEL rule.
    short = copy.deepcopy(cq)
    short["spec"]["resourceGroups"][0]["coveredResources"].append("cpu")
    with pytest.raises(ApiException) as e:
        create(short)
    assert "flavors must have the same number of resources as the coveredResources" in rejection(e)
    # A weight that is not a quantity: the schema's pattern.
    heavy = copy.deepcopy(cq)
    heavy["spec"]["fairSharing"] = {"weight": "lots"}
    with pytest.raises(ApiException) as e:
        create(heavy)
    assert "spec.fairSharing.weight" in rejection(e)

    # The schema alone takes a negative nominalQuota (its quantity pattern allows a sign): only Kueue's webhook,
    # which a bare CRD install lacks, refuses it. Corral's models refuse it before it is sent.
    negative = copy.deepcopy(cq)
    negative["metadata"]["name"] = f"negative{suffix}"
    negative["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = -1
    negative["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0].pop("borrowingLimit")
    create(negative)
    api.delete_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "clusterqueues", f"negative{suffix}")
    with pytest.raises(ValidationError):
        ClusterQueue.from_dict(negative)

    # A LocalQueue's clusterQueue is immutable (CEL transition rule self == oldSelf).
    lq = LocalQueue.from_dict(next(o for o in objects if o["kind"] == "LocalQueue"))
    kueue.create(lq)
    moved = lq.model_copy(update={"spec": lq.spec.model_copy(update={"cluster_queue": "elsewhere"})})
    with pytest.raises(ApiException) as e:
        kueue.apply(moved)
    assert "field is immutable" in rejection(e)


# ----- end to end: Kueue's controller, run for real (tests/kueue_kit.py) ------------------------------------


PRODUCT = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
@starts_processes
def kueue_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, KueueController]]:
    """A control plane of its own with Kueue's controller and webhooks (so no other test's Jobs go through Kueue's
    webhooks), and two kwok nodes of 8 H100s, 64 CPUs and 512Gi each."""
    bin_dir = require_bin_dir()
    kueue_bin = require_kueue()
    plane = ControlPlane(bin_dir, tmp_path_factory.mktemp("kueue-plane"))
    plane.start()
    controller = KueueController(plane, kueue_bin)
    try:
        controller.start()
        for i in range(2):
            plane.create_gpu_node(f"kueue-h100-{i}", product=PRODUCT, gpus=8, cpu="64", memory="512Gi")
            plane.wait_node_ready(f"kueue-h100-{i}")
        yield plane, controller
    finally:
        controller.stop()
        plane.stop()


def gpu_job(name: str, queue: str, gpus: int, cpu: str = "4", memory: str = "16Gi") -> dict[str, Any]:
    """A batch/v1 Job for Kueue: suspended, labelled with its LocalQueue, its pod asking GPUs, CPU and memory."""
    res = {"nvidia.com/gpu": str(gpus), "cpu": cpu, "memory": memory}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
        "spec": {
            "suspend": True,
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {"name": "main", "image": "busybox:1.36", "resources": {"requests": res, "limits": res}}
                    ],
                }
            },
        },
    }


def workload_of(kueue: KueueController, ns: str, job: str) -> dict[str, Any] | None:
    for w in kueue.workloads(ns):
        if any(o.get("kind") == "Job" and o.get("name") == job for o in w["metadata"].get("ownerReferences", [])):
            return w
    return None


def test_kueue_admits_a_job_through_the_exported_tree(kueue_plane: tuple[ControlPlane, KueueController]) -> None:
    """Item 7: the export, applied, lets Kueue admit a Job asking GPUs, CPU and memory; Kueue unsuspends it,
    kube-controller-manager makes its pod, kube-scheduler binds it to a node of the flavor. A Job over its queue's
    limit stays suspended. Without the pools' CPU and memory in the export, Kueue leaves the Job pending."""
    plane, kueue = kueue_plane
    suffix = f"-{uuid.uuid4().hex[:6]}"
    tree = queue_tree(
        queue(f"research{suffix}", quota={"h100": 8}),
        queue(f"nlp{suffix}", f"research{suffix}", quota={"h100": 4}, limit={"h100": 6}),
        queue(f"vision{suffix}", f"research{suffix}", quota={"h100": 2}),
        gpus={"h100": 16},
    )
    with plane.namespace("team") as ns:
        objects = export_objects(
            tree,
            {"h100": f"h100{suffix}"},
            lambda q: ns,
            products={"h100": PRODUCT},
            root=f"corral{suffix}",
            pool_resources={"h100": {"cpu": 128, "memory": "1Ti"}},
        )
        kc = KueueClient(plane.api_client())
        kc.apply_all(objects)  # through Kueue's own validating and defaulting webhooks
        api = client.CustomObjectsApi(plane.api_client())
        wait_until(
            "the ClusterQueues Active",
            lambda: all(
                (
                    condition(
                        api.get_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "clusterqueues", q.name), "Active"
                    )
                    or {}
                ).get("status")
                == "True"
                for q in tree.leaves
            ),
            60,
            kueue,
        )
        batch = client.BatchV1Api(plane.api_client())
        batch.create_namespaced_job(ns, gpu_job("fits", f"nlp{suffix}", gpus=2))
        batch.create_namespaced_job(ns, gpu_job("too-big", f"nlp{suffix}", gpus=7))  # over nlp's limit of 6

        def admitted() -> bool:
            w = workload_of(kueue, ns, "fits")
            return w is not None and (condition(w, "Admitted") or {}).get("status") == "True"

        wait_until("the Job's Workload admitted", admitted, 60, kueue)
        w = workload_of(kueue, ns, "fits")
        assert w is not None
        admission = w["status"]["admission"]
        assert admission["clusterQueue"] == f"nlp{suffix}"
        (ps,) = admission["podSetAssignments"]
        assert ps["flavors"] == {"nvidia.com/gpu": f"h100{suffix}", "cpu": f"h100{suffix}", "memory": f"h100{suffix}"}
        core = plane.core()

        def bound() -> list[Any]:
            pods = core.list_namespaced_pod(ns, label_selector="job-name=fits").items
            return [p for p in pods if p.spec.node_name]

        wait_until("the Job's pod bound", lambda: bool(bound()), 60, kueue)
        (pod,) = bound()
        assert pod.spec.node_name.startswith("kueue-h100-")
        assert pod.spec.node_selector == {"nvidia.com/gpu.product": PRODUCT}  # the flavor's node labels
        assert pod.spec.scheduler_name == "default-scheduler"
        assert batch.read_namespaced_job("fits", ns).spec.suspend is False

        # Over the limit: Kueue keeps it suspended, with no pod, and says why.
        def pending() -> bool:
            w = workload_of(kueue, ns, "too-big")
            c = condition(w, "QuotaReserved") if w is not None else None
            return c is not None and c["status"] == "False" and c["reason"] == "Pending"

        wait_until("the big Job's Workload pending", pending, 60, kueue)
        time.sleep(2)
        assert batch.read_namespaced_job("too-big", ns).spec.suspend is True
        assert not core.list_namespaced_pod(ns, label_selector="job-name=too-big").items
        w = workload_of(kueue, ns, "too-big")
        assert w is not None and (condition(w, "Admitted") or {}).get("status") != "True"
        assert "nvidia.com/gpu" in (condition(w, "QuotaReserved") or {})["message"]

    # The same, exported with GPUs only: Kueue leaves a Job asking CPU and memory pending (item 7's problem).
    suffix = f"-{uuid.uuid4().hex[:6]}"
    with plane.namespace("team") as ns:
        kc.apply_all(
            export_objects(
                queue_tree(queue(f"solo{suffix}", quota={"h100": 4}), gpus={"h100": 16}),
                {"h100": f"h100{suffix}"},
                lambda q: ns,
                products={"h100": PRODUCT},
                root=f"corral{suffix}",
            )
        )
        batch.create_namespaced_job(ns, gpu_job("asks-cpu", f"solo{suffix}", gpus=1))

        def refused() -> bool:
            w = workload_of(kueue, ns, "asks-cpu")
            c = condition(w, "QuotaReserved") if w is not None else None
            return c is not None and c["status"] == "False" and "cpu" in c["message"]

        wait_until("the Job pending for want of cpu in its ClusterQueue", refused, 60, kueue)
        assert batch.read_namespaced_job("asks-cpu", ns).spec.suspend is True
