"""kube-scheduler beside Corral on one real API server (issue 22, item 2): random pods of both schedulers arrive,
among them pods that tolerate every taint (as DaemonSets' do) created while Corral binds; no node Corral schedules is
ever over-committed in GPUs, CPUs or memory. kwok runs no kubelet, so nothing would refuse an over-committed pod: the
check is the sum of the requests of the live pods bound to each node, sampled from the API server all along.

Corral runs as the chart deploys it: its ServiceAccount's token, its ClusterRole, its binding webhook's
configuration as helm renders it (pointed at 127.0.0.1, since the test has no Service network, with a certificate of
the test's CA), the managed taint on its nodes.
"""

from __future__ import annotations

import base64
import contextlib
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.executor import KubernetesExecutor
from scheduler.backends.kubernetes.others import pod_held
from scheduler.service.api.webhook import BindingWebhook
from scheduler.service.core.assemble import build_core
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit
from tests.k8s_kit import ControlPlane, _cert, delete_namespaces, free_port, shared_plane, until
from tests.test_k8s_backend import IMAGE, ROOT, TEST_LABEL

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

NODES, GPUS, CPUS, MEMORY_GI = 3, 8, 16, 64
SECONDS = 40.0  # of random arrivals
TEST_NS_LABEL = "corral.dev/shared-nodes-test"


def chart_webhook(plane: ControlPlane) -> tuple[dict[str, Any], str]:
    """The chart's ValidatingWebhookConfiguration as helm renders it, and the path token of its Secret."""
    out = [d for d in yaml.safe_load_all(plane.helm_template("--set", "config.backend=kubernetes")) if d]
    (hook,) = [d for d in out if d["kind"] == "ValidatingWebhookConfiguration"]
    (secret,) = [d for d in out if d["kind"] == "Secret" and "path-token" in d.get("data", {})]
    return hook, base64.b64decode(secret["data"]["path-token"]).decode()


def webhook_config(hook: dict[str, Any], name: str, port: int, ca: bytes, tag: str) -> dict[str, Any]:
    """The chart's configuration pointed at this process (no Service network here: a URL at its path) and at this
    test's namespaces only (the plane is shared by other tests' schedulers)."""
    hook["metadata"] = {"name": name}
    for w in hook["webhooks"]:
        path = w["clientConfig"]["service"]["path"]
        w["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()}
        w["namespaceSelector"] = {"matchLabels": {TEST_NS_LABEL: tag}}
    return hook


def over_committed(api: Any, nodes: list[str]) -> list[str]:
    """Nodes whose live pods request more than they have, from one list of the API server."""
    sums: dict[str, Counter[str]] = {n: Counter() for n in nodes}
    for p in api.list_pod_for_all_namespaces().items:
        node = p.spec.node_name
        if node in sums and p.status.phase not in ("Succeeded", "Failed"):
            h = pod_held(p.spec)
            sums[node].update({"gpus": h.gpus, "mcpu": round(h.cpus * 1000), "mib": round(h.memory_gb * 1024)})
    return [
        f"{n}: {dict(s)}"
        for n, s in sums.items()
        if s["gpus"] > GPUS or s["mcpu"] > CPUS * 1000 or s["mib"] > MEMORY_GI * 1024
    ]


def has_default_account(api: Any, ns: str) -> bool:
    try:
        return bool(api.read_namespaced_service_account("default", ns))
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def other_pod(name: str, rnd: random.Random, node: str | None) -> dict[str, Any]:
    """A pod of kube-scheduler's: tolerating every taint (a DaemonSet's, pinned to `node` by affinity as the
    DaemonSet controller does), or an ordinary one."""
    cpu, memory = rnd.choice([250, 500, 1000, 2000, 3000]), rnd.choice([256, 1024, 4096])
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "c",
                "image": IMAGE,
                "resources": {
                    "requests": {"cpu": f"{cpu}m", "memory": f"{memory}Mi"},
                    "limits": {k8s.GPU: str(rnd.choice([0, 0, 1, 2]))},
                },
            }
        ],
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 0,
    }
    if node is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                    ]
                }
            }
        }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def managed(request: pytest.FixtureRequest) -> Iterator[tuple[ControlPlane, list[str], str]]:
    plane = shared_plane(request.config)
    tag = uuid.uuid4().hex[:5]
    names = [f"sh-{tag}-{i}" for i in range(NODES)]
    for n in names:
        plane.create_gpu_node(
            n, product=f"SHARED-{tag}", gpus=GPUS, cpu=str(CPUS), memory=f"{MEMORY_GI}Gi", labels={TEST_LABEL: tag}
        )
        plane.core().patch_node(n, {"spec": {"taints": [{"key": k8s.MANAGED_TAINT, "effect": "NoSchedule"}]}})
    for n in names:
        plane.wait_node_ready(n)
    yield plane, names, tag
    for n in names:
        with contextlib.suppress(ApiException):
            plane.core().delete_node(n)


def test_kube_scheduler_beside_corral_never_over_commits_a_node(
    managed: tuple[ControlPlane, list[str], str], tmp_path: Path
) -> None:
    plane, nodes, tag = managed
    admin = plane.core()
    rnd = random.Random(22)
    prefix = f"s{tag}-"
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=0,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={tag}",
        watch_s=2,
        foreign_pods=False,
    )
    core = build_core(
        ServiceSettings(data_dir=tmp_path / "data", grace_s=0, tick_s=0.2), executor=ex, nodes=ex.discover()
    )
    pool = f"SHARED-{tag}"
    core.apply_queues(ROOT, {"queues": [{"name": "team", "quota": {pool: NODES * GPUS}}]}, "one team")
    others_ns = f"o{tag}"
    admin.create_namespace({"metadata": {"name": others_ns, "labels": {TEST_NS_LABEL: tag}}})
    until("the namespace's service account", lambda: has_default_account(admin, others_ns))
    # The webhook's certificate, from the test CA the API server trusts for it (caBundle).
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes((plane.pki / "ca.crt").read_bytes())
    (tls / "ca.key").write_bytes((plane.pki / "ca.key").read_bytes())
    _cert(tls, "webhook", "/CN=corral-webhook", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    (tls / "tls.crt").write_bytes((tls / "webhook.crt").read_bytes())
    (tls / "tls.key").write_bytes((tls / "webhook.key").read_bytes())
    rendered, token = chart_webhook(plane)
    (tls / "path-token").write_text(token)  # as the chart's Secret mounts it
    hook = BindingWebhook(core, free_port(), tls, host="127.0.0.1").start()
    admission = client.AdmissionregistrationV1Api(plane.api_client())
    hook_name = f"corral-binding-{tag}"
    admission.create_validating_webhook_configuration(
        webhook_config(rendered, hook_name, hook.port, (plane.pki / "ca.crt").read_bytes(), tag)
    )
    stop = threading.Event()
    violations: list[str] = []
    samples = [0]

    def sample() -> None:
        while not stop.is_set():
            found = over_committed(admin, nodes)
            violations.extend(found)
            samples[0] += 1
            stop.wait(0.2)

    def corral_loop() -> None:
        core.run(stop)

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, corral_loop)]
    for t in threads:
        t.start()
    made: list[str] = []
    jobs: list[int] = []
    try:
        # Corral's nodes are not empty when it starts: a DaemonSet's pod on each (it must count them first).
        for n in nodes:
            name = f"ds-{n}"
            admin.create_namespaced_pod(others_ns, other_pod(name, rnd, n))
            made.append(name)
        deadline = time.monotonic() + SECONDS
        i = 0
        while time.monotonic() < deadline:
            i += 1
            # A burst of Corral's jobs and, at the same moment, pods of kube-scheduler's that may land beside them.
            for _ in range(rnd.randint(1, 4)):
                row, _ = core.submit(
                    ROOT,
                    JobSubmit(
                        queue="team",
                        pool=pool,
                        gpus=rnd.choice([1, 2, 4]),
                        cpus=rnd.choice([0.5, 1, 2, 4]),
                        memory_gb=rnd.choice([1, 4, 8]),
                        command="sleep inf",
                    ),
                )
                jobs.append(int(row["id"]))
            for _ in range(rnd.randint(1, 3)):
                name = f"p{i}-{len(made)}"
                admin.create_namespaced_pod(others_ns, other_pod(name, rnd, rnd.choice([*nodes, None])))
                made.append(name)
            core.wake.set()
            # Some work ends: Corral's jobs are cancelled, others' pods deleted (room comes back to both).
            if jobs and rnd.random() < 0.5:
                with contextlib.suppress(Exception):
                    core.cancel(ROOT, jobs.pop(rnd.randrange(len(jobs))))
            if made and rnd.random() < 0.4:
                with contextlib.suppress(ApiException):
                    admin.delete_namespaced_pod(made.pop(rnd.randrange(len(made))), others_ns, grace_period_seconds=0)
            time.sleep(rnd.uniform(0.05, 0.6))
        time.sleep(3)  # the last binds land
        violations.extend(over_committed(admin, nodes))
        bound = [p for p in admin.list_namespaced_pod(others_ns).items if p.spec.node_name in nodes]
        corral_pods = [
            p
            for p in admin.list_pod_for_all_namespaces(label_selector=f"{k8s.MANAGED_BY}=corral").items
            if p.spec.node_name in nodes
        ]
        refused = [
            e for e in admin.list_namespaced_event(others_ns).items if "scheduled by Corral" in (e.message or "")
        ]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        with contextlib.suppress(ApiException):
            admission.delete_validating_webhook_configuration(hook_name)
        hook.close()
        ex.close()
        with contextlib.suppress(ApiException):
            admin.delete_namespace(others_ns)
        delete_namespaces(admin, prefix)
    assert violations == [], violations[:10]
    assert samples[0] > 20
    # The test means something only if both schedulers placed pods on these nodes and Corral refused some binds.
    assert len(bound) >= NODES and len(corral_pods) >= 3, (len(bound), len(corral_pods))
    assert refused, "no bind of kube-scheduler's was refused: the nodes never filled up"


def test_a_restarted_corral_counts_what_others_hold_before_its_first_bind(
    managed: tuple[ControlPlane, list[str], str], tmp_path: Path
) -> None:
    """Pods others bound while Corral was away are counted before Corral's first cycle places anything."""
    plane, nodes, tag = managed
    admin = plane.core()
    ns = f"r{tag}"
    admin.create_namespace({"metadata": {"name": ns}})
    until("the namespace's service account", lambda: has_default_account(admin, ns))
    prefix = f"q{tag}-"
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp_path / "k8s",
        IMAGE,
        grace_s=0,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={tag}",
        watch_s=2,
        foreign_pods=False,
    )
    try:
        for n in nodes:  # 6 of each node's 8 GPUs taken by pods bound straight to it
            pod = other_pod(f"held-{n}", random.Random(0), None)
            pod["spec"]["nodeName"] = n
            pod["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1"}, "limits": {k8s.GPU: "6"}}
            admin.create_namespaced_pod(ns, pod)
        core: Core = build_core(
            ServiceSettings(data_dir=tmp_path / "data", grace_s=0), executor=ex, nodes=ex.discover()
        )
        pool = f"SHARED-{tag}"
        core.apply_queues(ROOT, {"queues": [{"name": "team", "quota": {pool: NODES * GPUS}}]}, "one team")
        ids = [
            int(core.submit(ROOT, JobSubmit(queue="team", pool=pool, gpus=g, command="sleep inf"))[0]["id"])
            for g in (4, 2)
        ]
        for _ in range(3):
            core.tick()
        with core.db.connect() as conn:
            states = [core.readable(conn, ROOT, j)["state"] for j in ids]
        assert states == ["pending", "running"]
        assert over_committed(admin, nodes) == []
    finally:
        ex.close()
        with contextlib.suppress(ApiException):
            admin.delete_namespace(ns)
        delete_namespaces(admin, prefix)
