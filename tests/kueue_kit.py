"""Kueue's controller manager, run for real against a test control plane (tests/k8s_kit.py).

The binary, Kueue's CRDs and its own manifests come from `scripts/kueue` (built once from the Go module proxy,
cached under ~/.cache/corral/kueue-<version>/); without them the tests skip, or fail when CORRAL_REQUIRE_K8S=1.
`CORRAL_KUEUE_BIN=/path/to/bin` uses a build from elsewhere.

How it runs (`KueueController.start`), as a platform team would deploy it, minus the pod:

- Kueue's CRDs, its namespace `kueue-system`, a ServiceAccount bound to the ClusterRole Kueue ships
  (config/components/rbac/role.yaml), and a kubeconfig with that ServiceAccount's token: Kueue never runs as an
  admin here, so a permission its role lacks fails the tests as it would fail a cluster.
- A Configuration (`config.kueue.x-k8s.io/v1beta2`, written by `configuration()`): the batch/job integration
  only, no leader election, fair sharing on, the webhook server on 127.0.0.1 with certificates made by openssl
  (internalCertManagement off: Kueue's own rotator names the certificate after a Service, which the API server
  cannot reach without kube-proxy), client QPS and burst as given.
- Kueue's webhooks as URL webhooks (https://127.0.0.1:PORT/<path>, the CA as caBundle), taken from its
  config/components/webhook/manifests.yaml: the Job webhooks and those of Kueue's own kinds; the other
  integrations' webhooks are left out, as Kueue does not serve them with those integrations off. They are
  registered once Kueue is ready, and removed before it stops, so a stopped Kueue never blocks the API server.
- Kueue reads its metrics server's certificate from a fixed path, /etc/kueue/metrics/certs, whenever its internal
  certificate management is off; the kit writes a self-signed one there when none is (it needs root, or a
  writable /etc/kueue). The metrics server itself is off (`metrics.bindAddress: "0"`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s_kit import (
    REQUIRE_ENV,
    ControlPlane,
    Proc,
    _die_with_parent,
    _http_ok,
    _openssl,
    _stop,
    free_port,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kueue"
BIN_ENV = "CORRAL_KUEUE_BIN"
NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # fixed in Kueue's cmd/kueue/main.go
WEBHOOKS = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"


@functools.cache
def find_kueue() -> tuple[Path | None, str]:
    """The bin dir with `kueue` (its CRDs and manifests beside it), or None and why not."""
    given = os.environ.get(BIN_ENV)
    if given:
        d = Path(given)
    else:
        try:
            out = subprocess.run([str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"scripts/kueue --check failed: {e}"
        if out.returncode != 0:
            return None, out.stderr.strip() or "scripts/kueue --check failed"
        d = Path(out.stdout.strip().splitlines()[-1])
    missing = [
        str(p)
        for p in (
            d / "kueue",
            d.parent / "crds",
            d.parent / "config" / "rbac-role.yaml",
            d.parent / "config" / "webhook-manifests.yaml",
        )
        if not p.exists()
    ]
    if missing:
        return None, f"not built: {', '.join(missing)} (run scripts/kueue)"
    return d, ""


def require_kueue() -> Path:
    """Kueue's bin dir; skips the test without it (fails instead when CORRAL_REQUIRE_K8S=1)."""
    d, why = find_kueue()
    if d is None:
        msg = f"Kueue's controller is not built: {why}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(msg)
    return d


def install_crds(plane: ControlPlane, crds: Path) -> None:
    """Kueue's CRDs, created (or left as they are) and Established."""
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
                if e.status != 409:
                    raise

    def established() -> bool:
        for name in names:
            status = ext.read_custom_resource_definition(name).status
            conds = (status.conditions if status else None) or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    wait_for("Kueue's CRDs Established", established, 60, plane.procs)


def configuration(
    *, webhook_port: int, cert_dir: Path, health_port: int, qps: float, burst: int, exclude_cpu_memory: bool = False
) -> dict[str, Any]:
    """The Kueue Configuration the kit runs with (docs/kueue.md explains each setting)."""
    cfg: dict[str, Any] = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        # As Kueue's shipped configuration sets it (config/components/manager/controller_manager_config.yaml);
        # without it every controller reconciles one object at a time.
        "controller": {
            "groupKindConcurrency": {
                "Job.batch": 5,
                "Pod": 5,
                "Workload.kueue.x-k8s.io": 5,
                "LocalQueue.kueue.x-k8s.io": 1,
                "Cohort.kueue.x-k8s.io": 1,
                "ClusterQueue.kueue.x-k8s.io": 1,
                "ResourceFlavor.kueue.x-k8s.io": 1,
            }
        },
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": qps, "burst": burst},
        "integrations": {"frameworks": ["batch/job"]},
        # Corral's tier 2 (fair-share reclaim) in Kueue's terms.
        "fairSharing": {"preemptionStrategies": ["LessThanOrEqualToFinalShare", "LessThanInitialShare"]},
        # Not run here: the visibility API server (an aggregated API) and MultiKueue.
        "featureGates": {"VisibilityOnDemand": False, "MultiKueue": False},
    }
    if exclude_cpu_memory:
        cfg["resources"] = {"excludeResourcePrefixes": ["cpu", "memory"]}
    return cfg


def url_webhooks(manifests: Path, port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, the Job's and Kueue's own kinds' only, as URL webhooks on 127.0.0.1."""
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        kind = doc["kind"]
        hooks = []
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            if "-batch-v1-job" not in path and "-kueue-x-k8s-io-" not in path:
                continue
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca_bundle).decode(),
            }
            if "-batch-v1-job" in path:  # as Kueue's kustomization sets it
                hook["namespaceSelector"] = {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": ["kube-system", NAMESPACE],
                        }
                    ]
                }
            hooks.append(hook)
        name = WEBHOOKS[0] if kind == "MutatingWebhookConfiguration" else WEBHOOKS[1]
        out.append({"apiVersion": doc["apiVersion"], "kind": kind, "metadata": {"name": name}, "webhooks": hooks})
    return out


def _serving_cert(d: Path) -> bytes:
    """A CA and a certificate for 127.0.0.1 (tls.crt / tls.key, as controller-runtime's webhook server reads them);
    returns the CA, for caBundle."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3",
        "-subj",
        "/CN=kueue-test-webhook-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=d,
    )
    (d / "tls.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1", cwd=d
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "3",
        "-extfile",
        "tls.ext",
        cwd=d,
    )
    return (d / "ca.crt").read_bytes()


def _metrics_cert() -> None:
    """Kueue (internal certificate management off) exits unless /etc/kueue/metrics/certs holds a certificate."""
    if (METRICS_CERTS / "tls.crt").is_file() and (METRICS_CERTS / "tls.key").is_file():
        return
    try:
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=kueue-metrics",
            cwd=METRICS_CERTS,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"Kueue needs a certificate in {METRICS_CERTS} (a fixed path in its main.go when its "
            f"internal certificate management is off), and the kit could not write one: {e}"
        ) from e


@dataclass
class KueueController:
    plane: ControlPlane
    bin_dir: Path
    qps: float = 50.0  # Kueue's own defaults (config/components/manager/controller_manager_config.yaml)
    burst: int = 100
    exclude_cpu_memory: bool = False
    log_level: int = 0
    proc: Proc | None = None
    workdir: Path = field(default=Path())
    config: dict[str, Any] = field(default_factory=dict)

    def start(self, timeout: float = 120) -> KueueController:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        plane = self.plane
        self.workdir = plane.workdir / "kueue"
        self.workdir.mkdir(parents=True, exist_ok=True)
        install_crds(plane, self.bin_dir.parent / "crds")
        self._rbac()
        _metrics_cert()
        ca = _serving_cert(self.workdir / "webhook-certs")
        webhook_port, health_port = free_port(), free_port()
        self.config = configuration(
            webhook_port=webhook_port,
            cert_dir=self.workdir / "webhook-certs",
            health_port=health_port,
            qps=self.qps,
            burst=self.burst,
            exclude_cpu_memory=self.exclude_cpu_memory,
        )
        cfg = self.workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        kubeconfig = self._kubeconfig()
        log = self.workdir / "kueue.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [
                    str(self.bin_dir / "kueue"),
                    f"--config={cfg}",
                    f"--zap-log-level={self.log_level or 'info'}",
                    f"--visibility-server-port={free_port()}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.proc = Proc("kueue", popen, log)
        wait_for(
            "Kueue ready (its webhook server serving)",
            lambda: _http_ok(f"http://127.0.0.1:{health_port}/readyz"),
            timeout,
            [self.proc],
        )
        adm = client.AdmissionregistrationV1Api(plane.api_client())
        for hook in url_webhooks(self.bin_dir.parent / "config" / "webhook-manifests.yaml", webhook_port, ca):
            self._delete_webhook(hook["kind"], hook["metadata"]["name"])
            if hook["kind"] == "MutatingWebhookConfiguration":
                adm.create_mutating_webhook_configuration(hook)
            else:
                adm.create_validating_webhook_configuration(hook)

    def _rbac(self) -> None:
        core = self.plane.core()
        rbac = client.RbacAuthorizationV1Api(self.plane.api_client())
        role = yaml.safe_load((self.bin_dir.parent / "config" / "rbac-role.yaml").read_text())
        role["metadata"] = {"name": "kueue-manager-role"}
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kueue-manager-rolebinding"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kueue-manager-role"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
        }
        for make in (
            lambda: core.create_namespace({"metadata": {"name": NAMESPACE}}),
            lambda: core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": SERVICE_ACCOUNT}}),
            lambda: rbac.create_cluster_role(role),
            lambda: rbac.create_cluster_role_binding(binding),
        ):
            try:
                make()
            except ApiException as e:
                if e.status != 409:
                    raise

    def _kubeconfig(self) -> Path:
        token = (
            self.plane.core()
            .create_namespaced_service_account_token(SERVICE_ACCOUNT, NAMESPACE, {"spec": {"expirationSeconds": 86400}})
            .status.token
        )
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kueue",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.plane.server, "certificate-authority": str(self.plane.pki / "ca.crt")},
                }
            ],
            "users": [{"name": "kueue", "user": {"token": token}}],
            "contexts": [{"name": "kueue", "context": {"cluster": "test", "user": "kueue"}}],
        }
        path = self.workdir / "kueue.kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def _delete_webhook(self, kind: str, name: str) -> None:
        adm = client.AdmissionregistrationV1Api(self.plane.api_client())
        with contextlib.suppress(ApiException):
            if kind == "MutatingWebhookConfiguration":
                adm.delete_mutating_webhook_configuration(name)
            else:
                adm.delete_validating_webhook_configuration(name)

    def stop(self) -> None:
        """Webhooks first (a stopped Kueue must not block the API server), then the process."""
        with contextlib.suppress(Exception):
            self._delete_webhook("MutatingWebhookConfiguration", WEBHOOKS[0])
            self._delete_webhook("ValidatingWebhookConfiguration", WEBHOOKS[1])
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n) if self.proc is not None else ""

    # reading Kueue's state

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        api = client.CustomObjectsApi(self.plane.api_client())
        items: list[dict[str, Any]] = api.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
        return items


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def wait_until(what: str, cond: Any, timeout: float, kueue: KueueController) -> None:
    """Like k8s_kit.wait_for, with Kueue's log in the failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kueue.proc is not None and kueue.proc.popen.poll() is not None:
            raise RuntimeError(f"kueue exited while waiting for {what}:\n{kueue.tail()}")
        with contextlib.suppress(ApiException):
            if cond():
                return
        time.sleep(0.25)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}\n--- kueue:\n{kueue.tail(30)}\n{kueue.plane.logs()}"
    )
