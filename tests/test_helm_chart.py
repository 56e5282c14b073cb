"""The Helm chart (charts/corral): helm lint, `helm template | kubeconform -strict` against schemas generated from
the Kubernetes release's OpenAPI document, and the rendered manifests applied to the test control plane, where
kube-scheduler puts the Deployment's pod on a kwok node. The Grafana dashboard only uses metrics the service
exports.

Needs the tools from scripts/k8s-tools; skips without them (fails when CORRAL_REQUIRE_K8S=1). The dashboard test
needs nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from scheduler.backends.kubernetes.executor import KubernetesExecutor
from tests.k8s_kit import ROOT, ControlPlane, require_bin_dir, schemas_dir, shared_plane, wait_for

pytestmark = pytest.mark.integration  # helm, kubeconform and the Kubernetes test control plane

CHART = ROOT / "charts" / "corral"
LOCAL_SCHEMAS = ROOT / "scripts" / "k8s-tools.d" / "schemas"  # CRDs the release has no schema for
SCHEMA_TEMPLATE = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
DB_URL = "postgresql+psycopg://corral:s3cret@postgres.db.svc:5432/corral"


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return require_bin_dir()


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def helm(bin_dir: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def render(bin_dir: Path, env: dict[str, str], *args: str, release: str = "corral", namespace: str = "corral") -> str:
    return helm(bin_dir, env, "template", release, str(CHART), "--namespace", namespace, *args).stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def hook(doc: dict[str, Any]) -> str | None:
    """The helm.sh/hook annotation of a rendered object (helm template renders hooks with the release)."""
    hooks: str | None = (doc["metadata"].get("annotations") or {}).get("helm.sh/hook")
    return hooks


def by_kind(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in rendered}


SERVICE_MONITOR_CRD = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")  # as if the CRD were installed
FULL = (
    "--set",
    f"database.url={DB_URL}",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "grafana.dashboard.enabled=true",
    *SERVICE_MONITOR_CRD,
)
K8S = ("--set", "config.backend=kubernetes")  # the binding webhook comes with backend kubernetes
# Issue 23: two replicas (PostgreSQL), their PodDisruptionBudget, the NetworkPolicy, an Ingress with TLS.
HARDENED = (
    "--set",
    "replicaCount=2",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "ingress.enabled=true",
    "--set",
    "ingress.className=nginx",
    "--set",
    "ingress.hosts[0].host=corral.example.com",
    "--set",
    "ingress.tls[0].secretName=corral-tls",
    "--set",
    "ingress.tls[0].hosts[0]=corral.example.com",
)


# --- lint and schema ------------------------------------------------------------------------------------------


def test_helm_lint(bin_dir: Path, helm_env: dict[str, str]) -> None:
    out = helm(bin_dir, helm_env, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout
    helm(bin_dir, helm_env, "lint", "--strict", str(CHART), *FULL[:-2])  # lint takes no --api-versions


def kubeconform(bin_dir: Path, manifests: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(bin_dir / "kubeconform"),
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            "1.36.3",
            "-schema-location",
            f"{schemas_dir(bin_dir)}/{SCHEMA_TEMPLATE}",
            "-schema-location",
            f"{LOCAL_SCHEMAS}/{SCHEMA_TEMPLATE}",
            "-",
        ],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kubeconform found problems:\n{out.stdout}\n{out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize(
    "args",
    [
        (),
        FULL,
        (
            "--set",
            "database.existingSecret=corral-db-managed",
            "--set",
            "persistence.existingClaim=corral-data",
            "--set",
            "rbac.create=false",
            "--set",
            "serviceAccount.create=false",
        ),
        (*K8S, *FULL),
        (
            *K8S,
            "--set",
            "kubernetes.bindingWebhook.existingSecret=my-tls",
            "--set",
            "kubernetes.bindingWebhook.caBundle=Q0E=",
        ),
        (*K8S, *FULL, *HARDENED),
    ],
    ids=[
        "defaults",
        "everything-on",
        "existing-secret-and-claim",
        "kubernetes-webhook",
        "kubernetes-webhook-existing-tls",
        "hardened",
    ],
)
def test_rendered_manifests_pass_kubeconform_strict(
    bin_dir: Path, helm_env: dict[str, str], args: tuple[str, ...]
) -> None:
    rendered = render(bin_dir, helm_env, *args)
    result = kubeconform(bin_dir, rendered)
    summary = result["summary"]
    assert summary["valid"] == len(docs(rendered)) and summary["skipped"] == 0, summary


def test_kubeconform_strict_catches_an_unknown_field(bin_dir: Path) -> None:
    bad = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "x"},
            "spec": {"ports": [{"port": 80, "targetPort": "http", "prot": "TCP"}]},
        }
    )
    out = subprocess.run(
        [str(bin_dir / "kubeconform"), "-strict", "-schema-location", f"{schemas_dir(bin_dir)}/{SCHEMA_TEMPLATE}", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "prot" in out.stdout + out.stderr


def test_what_the_chart_renders(bin_dir: Path, helm_env: dict[str, str]) -> None:
    default = by_kind(docs(render(bin_dir, helm_env)))
    # No database URL: SQLite, no Secret, no hook; no ServiceMonitor.
    assert set(default) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "Pod",
    }
    assert default["Pod"]["metadata"]["annotations"]["helm.sh/hook"] == "test"  # `helm test`
    full = docs(render(bin_dir, helm_env, *FULL, "--set", "image.tag=0.1.1", "--set", "config.demo=true"))
    kinds = by_kind(full)
    assert {"Secret", "ServiceMonitor"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "corral:0.1.1" and c["command"] == ["corral", "serve", "--host", "0.0.0.0"]
    assert c["ports"] == [
        {"name": "http", "containerPort": 8265, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["env"] == [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "CORRAL_ADVERTISE_URL", "value": "http://$(POD_IP):8265"},  # where followers forward
        {"name": "CORRAL_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "corral-db", "key": "database-url"}}},
    ]
    settings = [d for d in full if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "corral"][0]["data"]
    assert settings["CORRAL_DEMO"] == "true" and settings["CORRAL_PORT"] == "8265"
    assert settings["CORRAL_DATA_DIR"] == "/var/lib/corral"
    (secret,) = [d for d in full if d["kind"] == "Secret" and not hook(d)]
    assert base64.b64decode(secret["data"]["database-url"]).decode() == DB_URL
    assert DB_URL not in yaml.safe_dump(kinds["Deployment"]) + yaml.safe_dump(settings)
    sm = kinds["ServiceMonitor"]["spec"]
    assert sm["endpoints"][0]["port"] == "metrics" and sm["endpoints"][0]["path"] == "/metrics"
    dash = [d for d in full if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")][0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["corral.json"])["uid"] == "corral-overview"
    rules = {(tuple(r["apiGroups"]), r2) for r in kinds["ClusterRole"]["rules"] for r2 in r["resources"]}
    assert {r for _, r in rules} == {
        "nodes",
        "namespaces",
        "pods",
        "pods/binding",
        "pods/log",
        "events",
        "serviceaccounts",
        "resourcequotas",
        "rolebindings",
        "clusterroles",
        "networkpolicies",
        "jobs",
        "persistentvolumeclaims",
    }
    assert settings["CORRAL_K8S_NOTEBOOK_STORAGE_SIZE"] == "10Gi"  # each user's notebooks survive a restart


@pytest.mark.parametrize(
    "bad",
    [
        "service.port=0",
        "image.pullPolicy=Sometimes",
        "config.port=9000",
        "database.url=not-a-url",
        "metrics.serviceMonitor.interval=often",
        "replicas=2",
        "kubernetes.bindingWebhook.failurePolicy=Sometimes",
        "config.k8s_managed_taint=x",
        "config.k8s_binding_webhook_port=9443",
        "kubernetes.managedTaint=not a key",
        "replicaCount=0",
        "metrics.port=0",
        "config.migrate_on_start=true",
        "config.metrics_port=9100",
        "ingress.hosts[0].paths[0].path=v1",
        "podDisruptionBudget.maxUnavailable=1",
    ],
)
def test_values_schema_rejects_bad_values(bin_dir: Path, helm_env: dict[str, str], bad: str) -> None:
    out = helm(bin_dir, helm_env, "template", "corral", str(CHART), "--set", bad, check=False)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, out.stderr


# --- sharing nodes with kube-scheduler: the managed taint and the binding webhook --------------------------------


def test_the_managed_taint_flows_to_the_service(bin_dir: Path, helm_env: dict[str, str]) -> None:
    for args, taint in [
        ((), "corral.dev/managed"),
        (K8S, "corral.dev/managed"),
        (("--set", "kubernetes.managedTaint=gpu.example.com/corral"), "gpu.example.com/corral"),
    ]:
        (cm,) = [d for d in docs(render(bin_dir, helm_env, *args)) if d["kind"] == "ConfigMap"]
        assert cm["data"]["CORRAL_K8S_MANAGED_TAINT"] == taint, args


def webhook_objects(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    """The webhook configuration, the TLS Secret (if any), the container, pod volumes, Service ports and settings."""
    kinds = by_kind(rendered)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return {
        "vwc": [d for d in rendered if d["kind"] == "ValidatingWebhookConfiguration"],
        "secrets": [d for d in rendered if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls"],
        "container": container,
        "volumes": pod["volumes"],
        "pod": kinds["Deployment"]["spec"]["template"],
        "service_ports": kinds["Service"]["spec"]["ports"],
        "settings": [d for d in rendered if d["kind"] == "ConfigMap"][0]["data"],
    }


def test_the_binding_webhook(bin_dir: Path, helm_env: dict[str, str]) -> None:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    o = webhook_objects(docs(render(bin_dir, helm_env, *K8S)))
    (vwc,) = o["vwc"]
    assert vwc["apiVersion"] == "admissionregistration.k8s.io/v1" and vwc["metadata"]["name"] == "corral"
    assert "namespace" not in vwc["metadata"]
    (hook,) = vwc["webhooks"]
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods/binding"],
            "scope": "Namespaced",
        }
    ]
    service = hook["clientConfig"]["service"]
    # The path carries the random token of the webhook's Secret: only the API server, which reads it here, knows it.
    token = service["path"].removeprefix("/bind/")
    assert len(token) == 32 and token.isalnum() and token.islower()
    assert [base64.b64decode(s["data"]["path-token"]).decode() for s in o["secrets"]] == [token]
    assert service == {"name": "corral", "namespace": "corral", "path": f"/bind/{token}", "port": 8443}
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    # Corral's own binds (as the chart's ServiceAccount) skip the call.
    assert hook["matchConditions"] == [
        {"name": "not-corral", "expression": 'request.userInfo.username != "system:serviceaccount:corral:corral"'}
    ]

    # The Secret's certificate serves the Service's DNS names and is signed by the CA the API server trusts.
    (secret,) = o["secrets"]
    assert secret["metadata"] == {**secret["metadata"], "name": "corral-webhook-tls", "namespace": "corral"}
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt", "path-token"}
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    assert base64.b64decode(secret["data"]["ca.crt"]) == base64.b64decode(hook["clientConfig"]["caBundle"])
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert {"corral.corral.svc", "corral.corral.svc.cluster.local"} <= set(names)
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), password=None)
    pem = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.PEM, pem) == cert.public_key().public_bytes(
        serialization.Encoding.PEM, pem
    )

    # The pod mounts the Secret read-only where the service reads it; the service listens on 8443 behind the Service.
    c = o["container"]
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
    assert {"name": "webhook-tls", "mountPath": "/etc/corral/webhook-tls", "readOnly": True} in c["volumeMounts"]
    assert {"name": "webhook-tls", "secret": {"secretName": "corral-webhook-tls", "defaultMode": 0o440}} in o["volumes"]
    assert {"name": "webhook", "port": 8443, "targetPort": "webhook", "protocol": "TCP"} in o["service_ports"]
    settings = o["settings"]
    assert settings["CORRAL_K8S_BINDING_WEBHOOK_PORT"] == "8443"
    assert settings["CORRAL_K8S_BINDING_WEBHOOK_TLS_DIR"] == "/etc/corral/webhook-tls"
    assert settings["CORRAL_K8S_MANAGED_TAINT"] == "corral.dev/managed" and settings["CORRAL_BACKEND"] == "kubernetes"
    assert "checksum/webhook-tls" in o["pod"]["metadata"]["annotations"]


def test_the_binding_webhook_follows_release_namespace_and_values(bin_dir: Path, helm_env: dict[str, str]) -> None:
    from cryptography import x509  # noqa: PLC0415

    o = webhook_objects(
        docs(
            render(
                bin_dir,
                helm_env,
                *K8S,
                "--set",
                "serviceAccount.name=corral-sa",
                "--set",
                "kubernetes.bindingWebhook.port=9443",
                "--set",
                "kubernetes.bindingWebhook.failurePolicy=Fail",
                "--set",
                "kubernetes.bindingWebhook.timeoutSeconds=3",
                release="gpus",
                namespace="sched",
            )
        )
    )
    (hook,) = o["vwc"][0]["webhooks"]
    assert o["vwc"][0]["metadata"]["name"] == "gpus-corral"
    service = hook["clientConfig"]["service"]
    assert service == {"name": "gpus-corral", "namespace": "sched", "path": service["path"], "port": 9443}
    assert service["path"].startswith("/bind/")
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 3
    assert (
        hook["matchConditions"][0]["expression"]
        == 'request.userInfo.username != "system:serviceaccount:sched:corral-sa"'
    )
    (secret,) = o["secrets"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert {"gpus-corral.sched.svc", "gpus-corral.sched.svc.cluster.local"} <= set(names)
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in o["container"]["ports"]
    assert o["settings"]["CORRAL_K8S_BINDING_WEBHOOK_PORT"] == "9443"


def test_the_binding_webhook_with_an_existing_secret(bin_dir: Path, helm_env: dict[str, str]) -> None:
    args = (*K8S, "--set", "kubernetes.bindingWebhook.existingSecret=my-tls")
    out = helm(bin_dir, helm_env, "template", "corral", str(CHART), *args, check=False)
    assert out.returncode != 0 and "caBundle is required" in out.stderr, out.stderr
    o = webhook_objects(docs(render(bin_dir, helm_env, *args, "--set", "kubernetes.bindingWebhook.caBundle=Q0E=")))
    assert o["secrets"] == []  # the user's Secret, not the chart's
    assert o["vwc"][0]["webhooks"][0]["clientConfig"]["caBundle"] == "Q0E="
    assert {"name": "webhook-tls", "secret": {"secretName": "my-tls", "defaultMode": 0o440}} in o["volumes"]


@pytest.mark.parametrize(
    "args", [(), ("--set", "kubernetes.bindingWebhook.enabled=false", *K8S)], ids=["backend-local", "disabled"]
)
def test_no_binding_webhook(bin_dir: Path, helm_env: dict[str, str], args: tuple[str, ...]) -> None:
    o = webhook_objects(docs(render(bin_dir, helm_env, *args)))
    assert o["vwc"] == [] and o["secrets"] == []
    assert [p["name"] for p in o["container"]["ports"]] == ["http", "metrics"]
    assert [p["name"] for p in o["service_ports"]] == ["http", "metrics"]
    assert "webhook-tls" not in {v["name"] for v in o["volumes"]} | {m["name"] for m in o["container"]["volumeMounts"]}
    assert not {"CORRAL_K8S_BINDING_WEBHOOK_PORT", "CORRAL_K8S_BINDING_WEBHOOK_TLS_DIR"} & set(o["settings"])
    assert o["settings"]["CORRAL_K8S_MANAGED_TAINT"] == "corral.dev/managed"


# --- applied to the test API server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane(request: pytest.FixtureRequest, bin_dir: Path) -> ControlPlane:
    return shared_plane(request.config)


@pytest.fixture
def ns(plane: ControlPlane) -> Iterator[str]:
    with plane.namespace("chart") as name:
        yield name


def test_manifests_apply_and_the_pod_lands_on_a_kwok_node(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str], tmp_path: Path
) -> None:
    node = f"kwok-cpu-{uuid.uuid4().hex[:6]}"
    plane.create_gpu_node(node, gpus=0, pool=f"pool-{node}")
    release = f"corral-{uuid.uuid4().hex[:6]}"
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "database": {"url": DB_URL},
                "grafana": {"dashboard": {"enabled": True}},
                "nodeSelector": {"corral.dev/pool": f"pool-{node}"},
            }
        )
    )
    rendered = docs(render(bin_dir, helm_env, "-f", str(values), release=release, namespace=ns))
    # What `helm install` applies as the release: not its hooks (the migration Job runs in its own test below).
    rendered = [d for d in rendered if not hook(d)]
    try:
        plane.apply(ns, rendered)  # no ServiceMonitor: the Prometheus Operator's CRD is not installed here
        apps = plane.apps()
        # kube-scheduler places the Deployment's pod on the kwok node; kwok runs it and marks it Ready.
        wait_for(
            "deployment available",
            lambda: (apps.read_namespaced_deployment(release, ns).status.available_replicas or 0) == 1,
            90,
            plane.procs,
        )
        (pod,) = plane.core().list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={release}").items
        assert pod.spec.node_name == node and pod.status.phase == "Running"
        assert pod.spec.service_account_name == release
        assert plane.core().read_namespaced_service(release, ns).spec.cluster_ip.startswith("10.0.0.")

        # The ClusterRole grants what the backend needs, and no more.
        authz = client.AuthorizationV1Api(plane.api_client())
        user = f"system:serviceaccount:{ns}:{release}"

        def allowed(verb: str, resource: str, sub: str = "", namespace: str = "jobs") -> bool:
            group, _, resource = resource.rpartition("/")  # "networking.k8s.io/networkpolicies"
            name = ""
            if ":" in resource:
                resource, name = resource.split(":")  # "clusterroles:admin"
            review = authz.create_subject_access_review(
                {
                    "spec": {
                        "user": user,
                        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                        "resourceAttributes": {
                            "namespace": namespace,
                            "verb": verb,
                            "resource": resource,
                            "group": group,
                            "subresource": sub,
                            "name": name,
                        },
                    }
                }
            )
            return bool(review.status.allowed)

        rbac_api = "rbac.authorization.k8s.io"
        for verb, res, sub in [
            ("watch", "nodes", ""),
            ("create", "pods", ""),
            ("create", "pods", "binding"),
            ("delete", "pods", ""),
            ("get", "pods", "log"),
            ("create", "events", ""),
            ("list", "namespaces", ""),
            ("create", "namespaces", ""),
            ("get", "serviceaccounts", ""),
            ("update", "resourcequotas", ""),
            ("create", f"{rbac_api}/rolebindings", ""),
            ("bind", f"{rbac_api}/clusterroles:admin", ""),
            ("delete", "networking.k8s.io/networkpolicies", ""),
        ]:
            assert allowed(verb, res, sub), (verb, res, sub)
        for verb, res, sub in [
            ("list", "secrets", ""),
            ("delete", "nodes", ""),
            ("create", "pods", "exec"),
            ("create", "deployments", ""),
            ("update", "nodes", "status"),
            ("bind", f"{rbac_api}/clusterroles:cluster-admin", ""),
            ("create", f"{rbac_api}/clusterrolebindings", ""),
            ("create", f"{rbac_api}/roles", ""),
        ]:
            assert not allowed(verb, res, sub), (verb, res, sub)

        # Not only granted on paper: the backend binds a pod authenticated as the chart's ServiceAccount (issue 22:
        # it posted to /namespaces/{ns}/bindings, which the ClusterRole rightly does not grant, and got 403).
        waiting = f"waits-{uuid.uuid4().hex[:6]}"
        plane.core().create_namespaced_pod(
            ns,
            {
                "metadata": {"name": waiting},
                "spec": {
                    "schedulerName": "nobody",  # kube-scheduler leaves it alone: only Corral binds it
                    "containers": [{"name": "main", "image": "busybox"}],
                },
            },
        )
        executor = KubernetesExecutor(plane.client_as(release, ns), tmp_path / "k8s")
        executor._bind(ns, waiting, node)
        assert plane.core().read_namespaced_pod(waiting, ns).spec.node_name == node
    finally:
        rbac = client.RbacAuthorizationV1Api(plane.api_client())
        for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
            with contextlib.suppress(client.ApiException):
                delete(release)
        plane.core().delete_node(node)


def test_helm_install_server_dry_run_and_notes(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str]
) -> None:
    # The API server itself validates every object (server-side dry run); helm prints NOTES.txt. Release "dry": the
    # plane's own Corral RBAC (ControlPlane.corral_client, release "corral") owns the cluster-wide names "corral".
    out = helm(
        bin_dir,
        helm_env,
        "install",
        "dry",
        str(CHART),
        "--dry-run=server",
        "--namespace",
        ns,
        "--kubeconfig",
        str(plane.kubeconfig),
        "--set",
        f"database.url={DB_URL}",
    )
    assert "port-forward svc/dry-corral 8265:8265" in out.stdout
    assert "Secret dry-corral-db" in out.stdout and "dashboards/corral.json" in out.stdout
    # With backend kubernetes: the API server accepts the ValidatingWebhookConfiguration (its CEL matchCondition
    # compiles) and the TLS Secret. A dry run: nothing is created, so no other test's binds are sent to it.
    out = helm(
        bin_dir,
        helm_env,
        "install",
        "dry",
        str(CHART),
        "--dry-run=server",
        "--namespace",
        ns,
        "--kubeconfig",
        str(plane.kubeconfig),
        *K8S,
    )
    assert "kind: ValidatingWebhookConfiguration" in out.stdout and "type: kubernetes.io/tls" in out.stdout
    assert "kubectl taint nodes NODE corral.dev/managed=:NoSchedule" in out.stdout
    assert "ValidatingWebhookConfiguration\ndry-corral calls the Service on port 8443 (/bind)" in out.stdout


def test_an_upgrade_keeps_the_webhook_certificate(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str]
) -> None:
    # The chart reuses an installed webhook Secret (lookup), so the caBundle and the mounted pair stay in step.
    def server_render() -> dict[str, Any]:
        return webhook_objects(
            docs(
                helm(
                    bin_dir,
                    helm_env,
                    "template",
                    "corral",
                    str(CHART),
                    "--namespace",
                    ns,
                    "--dry-run=server",
                    "--kubeconfig",
                    str(plane.kubeconfig),
                    *K8S,
                ).stdout
            )
        )

    first = server_render()
    (secret,) = first["secrets"]
    assert server_render()["secrets"][0]["data"] != secret["data"]  # nothing installed: a fresh pair each time
    plane.core().create_namespaced_secret(
        ns, {"metadata": {"name": secret["metadata"]["name"]}, "type": "kubernetes.io/tls", "data": secret["data"]}
    )
    again = server_render()
    assert again["secrets"][0]["data"] == secret["data"]
    ca_bundle = again["vwc"][0]["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(ca_bundle) == base64.b64decode(secret["data"]["ca.crt"])
    assert (
        again["pod"]["metadata"]["annotations"]["checksum/webhook-tls"]
        == first["pod"]["metadata"]["annotations"]["checksum/webhook-tls"]
    )


# --- the Grafana dashboard ------------------------------------------------------------------------------------


def exported_metric_names(tmp_path: Path) -> set[str]:
    # Imported here: the service stack is slow to import and the chart tests above do not need it.
    from tests.service_kit import make_service  # noqa: PLC0415

    svc = make_service(f"sqlite:///{tmp_path / 'corral.db'}", tmp_path)
    text = svc.admin.get("/metrics").text
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # Per-GPU gauges appear only where NVML samples exist: take their names from the code that makes them.
    views = (ROOT / "scheduler" / "service" / "api" / "views.py").read_text()
    names |= set(re.findall(r'gauge\("(corral_[a-z_]+)"', views))
    return names


def test_grafana_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads((CHART / "dashboards" / "corral.json").read_text())
    assert dash["uid"] == "corral-overview" and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(corral_[a-z_]+)", e)}

    def family(name: str) -> str:
        return re.sub(r"_(bucket|count|sum|total)$", "", name)

    exported = {family(m) for m in exported_metric_names(tmp_path)}
    families = {family(m) for m in used}
    assert families <= exported, f"dashboard uses metrics the service does not export: {families - exported}"
    assert {"corral_gpus", "corral_fair_share_gpus", "corral_job_wait_seconds", "corral_preemptions"} <= families
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --- issue 23: production deployment ----------------------------------------------------------------------------


def hooks_of(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rendered hook objects by kind (the migration Job and its Secret, the test Pod)."""
    return {d["kind"]: d for d in rendered if hook(d)}


def release_of(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The release's own objects by kind, the first of each (ConfigMap: the settings, not the dashboard)."""
    kinds: dict[str, dict[str, Any]] = {}
    for d in rendered:
        if not hook(d):
            kinds.setdefault(d["kind"], d)
    return kinds


def test_the_migration_hook_job(bin_dir: Path, helm_env: dict[str, str]) -> None:
    rendered = docs(render(bin_dir, helm_env, *FULL, "--set", "image.tag=0.2.0", "--set", "nodeSelector.pool=cpu"))
    hooks, rel = hooks_of(rendered), release_of(rendered)
    job, secret = hooks["Job"], hooks["Secret"]
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    # Hooks run before the release's own objects: the Job's Secret is a hook too, made first (lower weight).
    sann = secret["metadata"]["annotations"]
    assert sann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(sann["helm.sh/hook-weight"]) < int(ann["helm.sh/hook-weight"])
    assert base64.b64decode(secret["data"]["database-url"]).decode() == DB_URL
    assert secret["metadata"]["name"] == "corral-db-migrate"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["corral", "db", "upgrade"] and "args" not in c
    assert c["env"] == [
        {
            "name": "CORRAL_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "corral-db-migrate", "key": "database-url"}},
        },
        {"name": "CORRAL_DATA_DIR", "value": "/tmp/corral"},
    ]
    # The same image and security context as the service's pods; no API token; not one of the Service's pods.
    dep = rel["Deployment"]["spec"]["template"]
    (svc_c,) = dep["spec"]["containers"]
    assert c["image"] == svc_c["image"] == "corral:0.2.0"
    assert c["securityContext"] == svc_c["securityContext"] and pod["securityContext"] == dep["spec"]["securityContext"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["affinity"] == dep["spec"]["affinity"]
    selector = rel["Deployment"]["spec"]["selector"]["matchLabels"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()
    assert rel["ConfigMap"]["data"]["CORRAL_MIGRATE_ON_START"] == "false"

    # An existing Secret already exists before the hook: the Job reads it; no copy.
    rendered = docs(
        render(bin_dir, helm_env, "--set", "database.existingSecret=mine", "--set", "database.existingSecretKey=url")
    )
    hooks = hooks_of(rendered)
    assert "Secret" not in hooks
    (c,) = hooks["Job"]["spec"]["template"]["spec"]["containers"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "url"}

    # SQLite (no URL), or the hook turned off: no Job, and the service migrates when it starts.
    for args in [(), ("--set", f"database.url={DB_URL}", "--set", "migrations.hook.enabled=false")]:
        rendered = docs(render(bin_dir, helm_env, *args))
        assert set(hooks_of(rendered)) == {"Pod"}, args
        assert "CORRAL_MIGRATE_ON_START" not in release_of(rendered)["ConfigMap"]["data"]


def test_replicas_need_postgresql(bin_dir: Path, helm_env: dict[str, str]) -> None:
    out = helm(bin_dir, helm_env, "template", "corral", str(CHART), "--set", "replicaCount=2", check=False)
    assert (
        out.returncode != 0
        and "replicaCount 2 needs PostgreSQL: set database.url or database.existingSecret" in out.stderr
    ), out.stderr
    rel = release_of(docs(render(bin_dir, helm_env, "--set", f"database.url={DB_URL}", "--set", "replicaCount=3")))
    spec = rel["Deployment"]["spec"]
    assert spec["replicas"] == 3 and spec["strategy"]["type"] == "RollingUpdate"
    pdb = rel["PodDisruptionBudget"]["spec"]
    assert pdb == {"minAvailable": 1, "selector": spec["selector"]}
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    one = release_of(docs(render(bin_dir, helm_env, "--set", f"database.url={DB_URL}")))
    assert "PodDisruptionBudget" not in one and one["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    assert "podAntiAffinity" not in one["Deployment"]["spec"]["template"]["spec"]["affinity"]


def test_the_network_policy(bin_dir: Path, helm_env: dict[str, str]) -> None:
    assert "NetworkPolicy" not in release_of(docs(render(bin_dir, helm_env)))  # off by default
    rel = release_of(
        docs(render(bin_dir, helm_env, *K8S, "--set", "networkPolicy.enabled=true", release="gpus", namespace="sched"))
    )
    np = rel["NetworkPolicy"]["spec"]
    assert np["podSelector"] == rel["Deployment"]["spec"]["selector"] and np["policyTypes"] == ["Ingress"]
    api, metrics, webhook = np["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jupyterhub"}}} in api["from"]
    assert {"namespaceSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "corral"}}} in api["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "gpus"}}} in api["from"]
    assert metrics == {
        "ports": [{"port": "metrics", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
    }
    assert webhook == {"ports": [{"port": "webhook", "protocol": "TCP"}]}  # the API server: from anywhere
    # /metrics on the API's port: Prometheus is let in there; an empty apiFrom opens the API port to all.
    (api,) = release_of(
        docs(render(bin_dir, helm_env, "--set", "networkPolicy.enabled=true", "--set", "metrics.port=null"))
    )["NetworkPolicy"]["spec"]["ingress"]
    assert {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}} in api[
        "from"
    ]
    values = json.dumps({"enabled": True, "apiFrom": [], "webhookFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]})
    api, _, webhook = release_of(docs(render(bin_dir, helm_env, "--set-json", f"networkPolicy={values}", *K8S)))[
        "NetworkPolicy"
    ]["spec"]["ingress"]
    assert "from" not in api and webhook["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]


def test_metrics_on_their_own_port(bin_dir: Path, helm_env: dict[str, str]) -> None:
    rel = release_of(docs(render(bin_dir, helm_env, *FULL)))
    assert rel["ConfigMap"]["data"]["CORRAL_METRICS_PORT"] == "9090"
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in rel["Service"]["spec"][
        "ports"
    ]
    assert rel["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    shared = release_of(docs(render(bin_dir, helm_env, *FULL, "--set", "metrics.port=null")))
    assert "CORRAL_METRICS_PORT" not in shared["ConfigMap"]["data"]
    assert [p["name"] for p in shared["Service"]["spec"]["ports"]] == ["http"]
    assert shared["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"
    out = helm(bin_dir, helm_env, "template", "corral", str(CHART), "--set", "metrics.port=8265", check=False)
    assert out.returncode != 0 and "metrics.port 8265 is already the API's" in out.stderr


def test_the_service_monitor_needs_its_crd(bin_dir: Path, helm_env: dict[str, str]) -> None:
    on = ("--set", "metrics.serviceMonitor.enabled=true")
    assert "ServiceMonitor" not in release_of(docs(render(bin_dir, helm_env, *on)))
    assert "ServiceMonitor" in release_of(docs(render(bin_dir, helm_env, *on, *SERVICE_MONITOR_CRD)))
    assert "ServiceMonitor" not in release_of(docs(render(bin_dir, helm_env, *SERVICE_MONITOR_CRD)))  # not enabled


def test_the_secret_checksum_with_an_existing_secret(bin_dir: Path, helm_env: dict[str, str]) -> None:
    def checksum(*args: str) -> str:
        dep = release_of(docs(render(bin_dir, helm_env, "--set", "database.existingSecret=mine", *args)))["Deployment"]
        value: str = dep["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        return value

    assert re.fullmatch(r"[0-9a-f]{64}", checksum())
    assert checksum("--set", "database.secretChecksum=v1") != checksum("--set", "database.secretChecksum=v2")
    assert checksum("--set", "database.secretChecksum=v1") == checksum("--set", "database.secretChecksum=v1")


def test_the_ingress(bin_dir: Path, helm_env: dict[str, str]) -> None:
    assert "Ingress" not in release_of(docs(render(bin_dir, helm_env)))
    ingress = {
        "enabled": True,
        "className": "nginx",
        "annotations": {"a": "b"},
        "hosts": [
            {"host": "corral.example.com"},
            {"host": "gpu.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]},
        ],
        "tls": [{"secretName": "corral-tls", "hosts": ["corral.example.com", "gpu.example.com"]}],
    }
    ing = release_of(docs(render(bin_dir, helm_env, "--set-json", f"ingress={json.dumps(ingress)}")))["Ingress"]
    assert ing["metadata"]["annotations"] == {"a": "b"}
    spec = ing["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "corral-tls", "hosts": ["corral.example.com", "gpu.example.com"]}]
    backend = {"service": {"name": "corral", "port": {"name": "http"}}}
    assert spec["rules"] == [
        {"host": "corral.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}},
        {"host": "gpu.example.com", "http": {"paths": [{"path": "/v1", "pathType": "Prefix", "backend": backend}]}},
    ]


def test_corral_keeps_off_gpu_nodes(bin_dir: Path, helm_env: dict[str, str]) -> None:
    def affinity(*args: str) -> Any:
        return release_of(docs(render(bin_dir, helm_env, *args)))["Deployment"]["spec"]["template"]["spec"].get(
            "affinity"
        )

    assert affinity() == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}]}
                ]
            }
        }
    }
    assert affinity("--set", "avoidGpuNodes.enabled=false") is None
    assert (
        affinity("--set", "avoidGpuNodes.label=gpu.example.com/has-gpu")["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"]
        == "gpu.example.com/has-gpu"
    )
    mine = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}
            ]
        }
    }
    assert affinity("--set-json", f"affinity={json.dumps(mine)}") == mine
    # The managed taint is never tolerated by the service's own pod.
    assert (
        release_of(docs(render(bin_dir, helm_env)))["Deployment"]["spec"]["template"]["spec"].get("tolerations") is None
    )


def test_the_helm_test_pod(bin_dir: Path, helm_env: dict[str, str]) -> None:
    rendered = docs(render(bin_dir, helm_env, release="gpus", namespace="sched"))
    pod = hooks_of(rendered)["Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    assert 'url = "http://gpus-corral.sched.svc:8265/readyz"' in c["command"][2]
    assert c["image"] == "corral:0.1.0" and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["restartPolicy"] == "Never"
    # Not one of the Service's endpoints.
    selector = release_of(rendered)["Service"]["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    # The script itself: against a server answering 200 it exits 0, against 503 it fails.
    import http.server  # noqa: PLC0415
    import threading  # noqa: PLC0415

    for status, ok in ((200, True), (503, False)):

        class Handler(http.server.BaseHTTPRequestHandler):
            code = status

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(self.code)
                self.end_headers()
                self.wfile.write(b'{"ready": true}')

            def log_message(self, *_: Any) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        script = c["command"][2].replace("http://gpus-corral.sched.svc:8265", f"http://127.0.0.1:{server.server_port}")
        done = subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=30)
        server.shutdown()
        assert (done.returncode == 0) is ok, done.stderr


# --- issue 23 on the test API server ----------------------------------------------------------------------------

PREVIOUS_CHART = "f8f94da"  # the chart (0.1.0) and migrations as they were before issue 23


def test_the_hardened_objects_are_accepted_by_the_api_server(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str]
) -> None:
    # Every object the hardened values render, hooks included, created with a server-side dry run: the API
    # server validates them (NetworkPolicy, PodDisruptionBudget, Ingress, the hook Job and Secret, the test Pod).
    rendered = docs(
        render(
            bin_dir,
            helm_env,
            *K8S,
            "--set",
            f"database.url={DB_URL}",
            *HARDENED,
            release=f"hard-{uuid.uuid4().hex[:6]}",
            namespace=ns,
        )
    )
    kinds = {d["kind"] for d in rendered}
    assert {"Job", "NetworkPolicy", "PodDisruptionBudget", "Ingress", "Pod", "Deployment"} <= kinds
    from kubernetes import utils  # noqa: PLC0415

    for doc in rendered:
        utils.create_from_dict(plane.api_client(), doc, namespace=ns, dry_run="All")  # type: ignore[no-untyped-call]
    assert client.BatchV1Api(plane.api_client()).list_namespaced_job(ns).items == []  # a dry run made nothing


def test_the_secret_checksum_follows_an_existing_secret(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str]
) -> None:
    # lookup reads the installed Secret: when its data changes, the next upgrade rolls the pods.
    def checksum() -> str:
        out = helm(
            bin_dir,
            helm_env,
            "template",
            "corral",
            str(CHART),
            "--namespace",
            ns,
            "--dry-run=server",
            "--kubeconfig",
            str(plane.kubeconfig),
            "--set",
            "database.existingSecret=corral-db-mine",
        ).stdout
        value: str = release_of(docs(out))["Deployment"]["spec"]["template"]["metadata"]["annotations"][
            "checksum/secret"
        ]
        return value

    missing = checksum()
    body = {
        "metadata": {"name": "corral-db-mine"},
        "data": {"database-url": base64.b64encode(b"postgresql://a").decode()},
    }
    plane.core().create_namespaced_secret(ns, body)
    first = checksum()
    assert first != missing and checksum() == first
    body["data"] = {"database-url": base64.b64encode(b"postgresql://b").decode()}
    plane.core().replace_namespaced_secret("corral-db-mine", ns, body)
    assert checksum() not in (first, missing)


def _old_head() -> str:
    # the migrations where they lay at PREVIOUS_CHART (they are in scheduler/service/store/migrations/ since)
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", PREVIOUS_CHART, "scheduler/service/migrations/versions/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return max(Path(n).name.split("_")[0] for n in names if n.endswith(".py"))


def test_upgrade_from_the_chart_before_issue_23_runs_the_hook(
    plane: ControlPlane, ns: str, bin_dir: Path, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """helm install the chart of f8f94da, then helm upgrade to this one: the pre-upgrade hook Job is created by
    helm and accepted by the API server (kwok completes its pod), and its exact command and environment, run here
    with this checkout's `corral`, upgrade a PostgreSQL database the previous release left, with rows, losing
    nothing."""
    from scheduler.service.store.db import current_revision, head_revision  # noqa: PLC0415
    from tests.db_upgrade_kit import database_at, lost  # noqa: PLC0415
    from tests.service_kit import database_url  # noqa: PLC0415

    urls = database_url("postgresql", tmp_path)
    url = next(urls)  # skips without PostgreSQL (fails with CORRAL_REQUIRE_POSTGRES=1)
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "archive", PREVIOUS_CHART, "charts/corral"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    old_chart = old / "charts" / "corral"
    assert yaml.safe_load((old_chart / "Chart.yaml").read_text())["version"] == "0.1.0"
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["version"] != "0.1.0"
    old_head = _old_head()
    written = database_at(url, old_head)

    node = f"kwok-cpu-{uuid.uuid4().hex[:6]}"
    plane.create_gpu_node(node, gpus=0, pool=f"pool-{node}")
    release = f"corral-up-{uuid.uuid4().hex[:6]}"  # its fullname is the release name
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"database": {"url": url}, "nodeSelector": {"corral.dev/pool": f"pool-{node}"}}))
    kube = ("--namespace", ns, "--kubeconfig", str(plane.kubeconfig))
    try:
        helm(bin_dir, helm_env, "install", release, str(old_chart), *kube, "-f", str(values))
        cm = plane.core().read_namespaced_config_map(release, ns)
        assert "CORRAL_MIGRATE_ON_START" not in cm.data  # the old chart: the service migrated at start
        assert current_revision(url) == old_head  # (no pod runs here: kwok runs no containers)

        out = helm(bin_dir, helm_env, "upgrade", release, str(CHART), *kube, "-f", str(values), "--timeout", "180s")
        assert "STATUS: deployed" in out.stdout, out.stdout
        # The hook ran and, having succeeded, was deleted with its Secret; the service now refuses to migrate.
        batch = client.BatchV1Api(plane.api_client())
        assert [j.metadata.name for j in batch.list_namespaced_job(ns).items] == []
        assert f"{release}-db-migrate" not in {s.metadata.name for s in plane.core().list_namespaced_secret(ns).items}
        cm = plane.core().read_namespaced_config_map(release, ns)
        assert cm.data["CORRAL_MIGRATE_ON_START"] == "false"
        events = plane.core().list_namespaced_event(ns, field_selector=f"involvedObject.name={release}-migrate")
        assert any(e.reason == "Completed" for e in events.items), [e.reason for e in events.items]

        # The hook as helm applied it (helm get hooks), and its command run here.
        hooks = {d["kind"]: d for d in docs(helm(bin_dir, helm_env, "get", "hooks", release, *kube).stdout)}
        job, secret = hooks["Job"], hooks["Secret"]
        (c,) = job["spec"]["template"]["spec"]["containers"]
        argv = [*c["command"], *c.get("args", [])]
        assert argv == ["corral", "db", "upgrade"]
        env = {}
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        assert env["CORRAL_DATABASE_URL"] == url
        venv_bin = ROOT / ".venv" / "bin"
        exe = venv_bin / "corral"
        if not exe.exists():
            pytest.skip(f"{exe} is missing: the hook's command needs this checkout's `corral`")
        done = subprocess.run(
            [str(exe), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path), **env},
        )
        assert done.returncode == 0, done.stderr
        assert f"{old_head} -> {head_revision()}" in done.stderr or old_head == head_revision()
        assert current_revision(url) == head_revision()
        assert lost(url, written) == []
    finally:
        helm(bin_dir, helm_env, "uninstall", release, *kube, check=False)
        plane.core().delete_node(node)
        with contextlib.suppress(StopIteration):
            next(urls)  # drops the database


def _image_rootfs() -> Path | None:
    """The image's unpacked root file system that scripts/image leaves in the cache, if it was built."""
    cache = Path(os.environ.get("CORRAL_CACHE", Path.home() / ".cache" / "corral"))
    found = sorted(cache.glob("image-*/rootfs"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def test_the_hook_command_in_the_image(bin_dir: Path, helm_env: dict[str, str], tmp_path: Path) -> None:
    """The hook Job's command and environment, as rendered, run in the image's root file system (chroot, as the
    chart's uid 10001) against a PostgreSQL database at the previous chart's migration head, with rows."""
    from scheduler.service.store.db import current_revision  # noqa: PLC0415
    from tests.db_upgrade_kit import database_at, lost  # noqa: PLC0415
    from tests.service_kit import database_url  # noqa: PLC0415

    rootfs = _image_rootfs()
    if rootfs is None:
        pytest.skip("no image root file system (scripts/image builds ~/.cache/corral/image-*/rootfs)")
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    urls = database_url("postgresql", tmp_path)
    url = next(urls)
    try:
        old_head = _old_head()
        written = database_at(url, old_head)
        hooks = hooks_of(docs(render(bin_dir, helm_env, "--set", f"database.url={url}")))
        (c,) = hooks["Job"]["spec"]["template"]["spec"]["containers"]
        secret = hooks["Secret"]
        env = {
            e["name"]: e.get("value")
            or base64.b64decode(secret["data"][e["valueFrom"]["secretKeyRef"]["key"]]).decode()
            for e in c["env"]
        }
        uid = hooks["Job"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        image_env = [
            "PATH=/opt/corral/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/var/lib/corral",
        ]

        def in_image(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "chroot",
                    f"--userspec={uid}:{uid}",
                    str(rootfs),
                    "/usr/bin/env",
                    "-i",
                    *image_env,
                    *(f"{k}={v}" for k, v in env.items()),
                    *argv,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )

        image_head = in_image("corral", "db", "history").stdout.split()[-1]
        done = in_image(*c["command"], *c.get("args", []))
        assert done.returncode == 0, done.stderr
        assert current_revision(url) == image_head
        assert lost(url, written) == []
    finally:
        with contextlib.suppress(StopIteration):
            next(urls)
