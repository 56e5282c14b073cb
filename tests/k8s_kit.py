"""A real, small Kubernetes control plane for tests: etcd, kube-apiserver (RBAC), kube-controller-manager,
kube-scheduler and kwok (simulated GPU nodes and pod lifecycles), all on 127.0.0.1.

The binaries come from `scripts/k8s-tools` (built once from the Go module proxy, cached under
~/.cache/corral/k8s-<version>/). Without them the tests skip, or fail when CORRAL_REQUIRE_K8S=1.
Certificates and keys are made with openssl in a temporary directory; the tests talk to the API server as
an admin (client certificate in group system:masters) through the `kubernetes` Python client.

One control plane per pytest process (`shared_plane`), torn down when the session ends; tests isolate
themselves with a namespace each (`ControlPlane.namespace`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, utils
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
TOOLS_SCRIPT = ROOT / "scripts" / "k8s-tools"
REQUIRE_ENV = "CORRAL_REQUIRE_K8S"
BIN_ENV = "CORRAL_K8S_BIN"
CORRAL_NS, CORRAL_SA = "corral-system", "corral"  # where corral_client() installs the chart's RBAC
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"
POOL_LABEL = "corral.dev/pool"
START_TIMEOUT_S = float(os.environ.get("CORRAL_K8S_START_TIMEOUT", "120"))


# --- finding the tools ---------------------------------------------------------------------------------


@functools.cache
def find_bin_dir() -> tuple[Path | None, str]:
    """The directory with the built tools, or None and why not."""
    given = os.environ.get(BIN_ENV)
    if given:
        d = Path(given)
    else:
        try:
            out = subprocess.run([str(TOOLS_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"scripts/k8s-tools --check failed: {e}"
        if out.returncode != 0:
            return None, out.stderr.strip() or "scripts/k8s-tools --check failed"
        d = Path(out.stdout.strip().splitlines()[-1])
    missing = [c for c in (*COMPONENTS, "helm", "kubeconform") if not (d / c).is_file()]
    if missing:
        return None, f"not built in {d}: {', '.join(missing)} (run scripts/k8s-tools)"
    return d, ""


def require_bin_dir() -> Path:
    """The tools' bin dir; skips the test without them (fails instead when CORRAL_REQUIRE_K8S=1)."""
    d, why = find_bin_dir()
    if d is None:
        msg = f"Kubernetes test tools are not built: {why}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(msg)
    return d


def schemas_dir(bin_dir: Path) -> Path:
    """kubeconform schemas generated from the release's OpenAPI document (by scripts/k8s-tools)."""
    return bin_dir.parent / "schemas"


def stages_dir(bin_dir: Path) -> Path:
    """kwok's shipped stage rules (node-fast, node heartbeat with lease, pod-fast), copied by scripts/k8s-tools."""
    return bin_dir.parent / "kwok-stages"


# --- certificates ----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, the API server's serving certificate, client certificates per component, the service-account keys."""
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
        "/CN=corral-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=d,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    sans = "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1"
    _cert(d, "apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth")
    for name, subj in (
        ("admin", "/O=system:masters/CN=corral-test-admin"),
        ("controller-manager", "/CN=system:kube-controller-manager"),
        ("scheduler", "/CN=system:kube-scheduler"),
        ("kwok", "/O=system:masters/CN=kwok"),
    ):
        _cert(d, name, subj, "extendedKeyUsage=clientAuth")


def _cert(d: Path, name: str, subj: str, ext: str) -> None:
    usage = "keyUsage=critical,digitalSignature,keyEncipherment"
    (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{usage}\n{ext}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "3",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki / f"{user}.crt"), "client-key": str(pki / f"{user}.key")},
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_for(what: str, ok: Callable[[], bool], timeout: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}) while waiting for {what}:\n{p.tail()}")
        with contextlib.suppress(Exception):
            if ok():
                return
        time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}:\n{p.tail(15)}" for p in procs)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _die_with_parent() -> None:
    """In the child before exec: kill it when the test process dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _stop(p: Proc, grace: float = 10.0) -> None:
    if p.popen.poll() is None:
        p.popen.terminate()
        try:
            p.popen.wait(grace)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(5)


# --- the control plane -------------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    server: str = ""
    kubeconfig: Path = Path()
    pki: Path = Path()
    _api: Any = None
    _corral: Any = None
    # Client QPS and burst of kube-controller-manager and kube-scheduler (None: their defaults, 20/30 and 50/100),
    # for benchmarks that give every component the same (benchmarks/k8s_vs_kueue.py).
    client_qps: float | None = None
    client_burst: int | None = None
    # kwok Stage rules (by name) left out, e.g. "pod-complete" so that Job pods stay Running.
    kwok_skip_stages: tuple[str, ...] = ()

    # starting and stopping

    def start(self) -> ControlPlane:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def _start(self) -> None:
        w, self.pki = self.workdir, self.workdir / "pki"
        make_pki(self.pki)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._spawn(
            "etcd",
            [
                "--name=test",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        wait_for("etcd", lambda: _http_ok(f"{etcd_url}/health"), START_TIMEOUT_S, [etcd])

        self.server = f"https://127.0.0.1:{api_port}"
        pki = self.pki
        api = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"--cert-dir={w / 'apiserver-certs'}",
                "--storage-media-type=application/json",
                "--v=1",
            ],
        )
        self.kubeconfig = write_kubeconfig(w / "admin.kubeconfig", self.server, pki, "admin")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        wait_for("kube-apiserver /readyz", lambda: _http_ok(f"{self.server}/readyz", ctx), START_TIMEOUT_S, [etcd, api])

        kcm_cfg = write_kubeconfig(w / "controller-manager.kubeconfig", self.server, pki, "controller-manager")
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kcm_cfg}",
                f"--authentication-kubeconfig={kcm_cfg}",
                f"--authorization-kubeconfig={kcm_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={w / 'kcm-certs'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--v=1",
                *self._qps_flags(),
            ],
        )
        sched_cfg = write_kubeconfig(w / "scheduler.kubeconfig", self.server, pki, "scheduler")
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={sched_cfg}",
                f"--authentication-kubeconfig={sched_cfg}",
                f"--authorization-kubeconfig={sched_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={w / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
                *self._scheduler_config(sched_cfg),
            ],
        )
        kwok_cfg = self._kwok_config()
        kwok_kc = write_kubeconfig(w / "kwok.kubeconfig", self.server, pki, "kwok")
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={kwok_kc}",
                f"--config={kwok_cfg}",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.1.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        # The controller manager's service-account controller makes `default` in each namespace; once it has
        # done so in kube-system every controller is running.
        core = self.core()
        wait_for(
            "kube-controller-manager (default service account)",
            lambda: bool(core.read_namespaced_service_account("default", "default")),
            START_TIMEOUT_S,
            self.procs,
        )

    def _qps_flags(self) -> list[str]:
        out = []
        if self.client_qps is not None:
            out.append(f"--kube-api-qps={self.client_qps:g}")
        if self.client_burst is not None:
            out.append(f"--kube-api-burst={self.client_burst}")
        return out

    def _scheduler_config(self, kubeconfig: Path) -> list[str]:
        """kube-scheduler's client QPS and burst are set in its configuration file (clientConnection)."""
        if self.client_qps is None and self.client_burst is None:
            return []
        conn: dict[str, Any] = {"kubeconfig": str(kubeconfig)}
        if self.client_qps is not None:
            conn["qps"] = self.client_qps
        if self.client_burst is not None:
            conn["burst"] = self.client_burst
        path = self.workdir / "scheduler-config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": conn,
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        return [f"--config={path}"]

    def _kwok_config(self) -> Path:
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                "kind": "KwokConfiguration",
                "options": {
                    "nodeLeaseDurationSeconds": 40,
                    "nodeLeaseParallelism": 4,
                    "podPlayStageParallelism": 4,
                    "nodePlayStageParallelism": 4,
                    "podsOnNodeSyncParallelism": 2,
                },
            }
        ]
        stages = stages_dir(self.bin_dir)
        for f in sorted(stages.glob("*.yaml")):
            docs.extend(
                d
                for d in yaml.safe_load_all(f.read_text())
                if d and d.get("metadata", {}).get("name") not in self.kwok_skip_stages
            )
        if not any(d.get("kind") == "Stage" for d in docs):
            raise RuntimeError(f"no kwok stage rules in {stages} (run scripts/k8s-tools)")
        path = self.workdir / "kwok.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        return path

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop(p)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(20)}" for p in self.procs)

    # the API

    def api_client(self) -> Any:
        if self._api is None:
            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        return self._api

    def corral_client(self) -> Any:
        """Corral's API client as the chart deploys it: the chart's ServiceAccount, ClusterRole and binding, rendered
        by helm and applied once (namespace `corral-system`), and that ServiceAccount's token. Every test of the
        Kubernetes backend uses it, never the admin's kubeconfig, so a permission the chart lacks fails a test."""
        if self._corral is None:
            out = self.helm_template()
            kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
            rbac = [d for d in yaml.safe_load_all(out) if d and d["kind"] in kinds]
            assert {d["kind"] for d in rbac} == kinds, rbac
            with contextlib.suppress(ApiException):  # a plane shared by several test modules: made once
                self.core().create_namespace({"metadata": {"name": CORRAL_NS}})
                self.apply(CORRAL_NS, rbac)
            self._corral = self.client_as(CORRAL_SA, CORRAL_NS)
        return self._corral

    def helm_template(self, *args: str) -> str:
        """The chart as helm renders it for release `corral` in namespace corral-system (what corral_client
        installs the RBAC of), with extra helm arguments."""
        home = self.workdir / "helm"
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        return subprocess.run(
            [
                str(self.bin_dir / "helm"),
                "template",
                CORRAL_SA,
                str(ROOT / "charts" / "corral"),
                "--namespace",
                CORRAL_NS,
                "--set",
                "database.url=postgresql+psycopg://corral@db/c",
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        ).stdout

    def client_as(self, service_account: str, namespace: str) -> Any:
        """An API client authenticated as a ServiceAccount (a token from the TokenRequest API, as a pod mounts it):
        Corral as the chart deploys it, never with the admin's certificate."""
        token = (
            self.core()
            .create_namespaced_service_account_token(service_account, namespace, {"spec": {"expirationSeconds": 86400}})
            .status.token
        )
        admin = self.api_client().configuration
        conf = client.Configuration()
        conf.host, conf.ssl_ca_cert = admin.host, admin.ssl_ca_cert
        conf.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(conf)

    def core(self) -> Any:
        return client.CoreV1Api(self.api_client())

    def coordination(self) -> Any:
        return client.CoordinationV1Api(self.api_client())

    def apps(self) -> Any:
        return client.AppsV1Api(self.api_client())

    @contextlib.contextmanager
    def namespace(self, prefix: str = "t") -> Iterator[str]:
        """A fresh namespace (with its `default` service account ready), deleted afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        core = self.core()
        core.create_namespace({"metadata": {"name": name}})
        try:
            wait_for(
                f"service account default in {name}",
                lambda: bool(core.read_namespaced_service_account("default", name)),
                60,
                self.procs,
            )
            yield name
        finally:
            with contextlib.suppress(Exception):
                core.delete_namespace(name)

    def create_gpu_node(
        self,
        name: str,
        product: str = "NVIDIA-H100-80GB-HBM3",
        gpus: int = 8,
        pool: str | None = None,
        cpu: str = "64",
        memory: str = "512Gi",
        labels: dict[str, str] | None = None,
        resources: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A kwok-managed node with `gpus` nvidia.com/gpu in capacity and allocatable, labelled with the GPU
        product (the pool label, as GPU feature discovery would) and corral.dev/pool; kwok makes it Ready.
        `resources`: more extended resources (the device plugin's nvidia.com/gpu.shared, nvidia.com/mig-*), or
        another nvidia.com/gpu count (time-slicing replicas)."""
        resources = {"cpu": cpu, "memory": memory, "pods": "110", GPU: str(gpus), **(resources or {})}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    GPU_PRODUCT: product,
                    "nvidia.com/gpu.count": str(gpus),
                    POOL_LABEL: pool or product,
                    **(labels or {}),
                },
            },
            "spec": {},
            "status": {"capacity": resources, "allocatable": resources},
        }
        created: dict[str, Any] = self.api_client().sanitize_for_serialization(self.core().create_node(node))
        return created

    def wait_node_ready(self, name: str, timeout: float = 60) -> Any:
        core = self.core()

        def ready() -> bool:
            n = core.read_node(name)
            return any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))

        wait_for(f"node {name} Ready", ready, timeout, self.procs)
        return core.read_node(name)

    def wait_pod(self, namespace: str, name: str, phase: str = "Running", timeout: float = 60) -> Any:
        core = self.core()
        wait_for(
            f"pod {namespace}/{name} {phase}",
            lambda: core.read_namespaced_pod(name, namespace).status.phase == phase,
            timeout,
            self.procs,
        )
        return core.read_namespaced_pod(name, namespace)

    def bind(self, namespace: str, pod: str, node: str) -> None:
        """Bind a pod to a node through the Binding API (pods/binding), as a scheduler does."""
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        # The generated client cannot deserialize the Status the server answers with: skip deserializing.
        self.core().create_namespaced_pod_binding(pod, namespace, body, _preload_content=False)

    def apply(self, namespace: str, documents: list[dict[str, Any]]) -> list[Any]:
        """Create the given objects (rendered manifests) in `namespace`: kubectl-free, via the client's utils."""
        made = []
        for doc in documents:
            if not doc:
                continue
            made.extend(utils.create_from_dict(self.api_client(), doc, namespace=namespace))  # type: ignore[no-untyped-call]
        return made


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:  # noqa: S310 (test URLs on loopback)
        return bool(r.status == 200)


_PLANE: ControlPlane | None = None
_PLANE_ERROR: str | None = None


def kubelet() -> Any:
    """The admin's CoreV1Api of the shared plane, for what a kubelet would do (kwok runs none for pod status):
    tests end pods with it, never with Corral's own client, which the chart rightly does not let patch status."""
    assert _PLANE is not None, "no control plane started"
    return _PLANE.core()


def shared_plane(config: pytest.Config) -> ControlPlane:
    """The process's one control plane, started on first use and stopped when the pytest session ends."""
    global _PLANE, _PLANE_ERROR
    bin_dir = require_bin_dir()
    if _PLANE_ERROR is not None:
        pytest.fail(f"the test control plane did not start: {_PLANE_ERROR}", pytrace=False)
    if _PLANE is None:
        workdir = Path(tempfile.mkdtemp(prefix="corral-k8s-"))
        plane = ControlPlane(bin_dir, workdir)
        try:
            plane.start()
        except Exception as e:
            _PLANE_ERROR = str(e)
            raise

        def teardown() -> None:
            global _PLANE
            plane.stop()
            _PLANE = None
            if os.environ.get("CORRAL_K8S_KEEP") != "1":
                shutil.rmtree(workdir, ignore_errors=True)

        config.add_cleanup(teardown)
        _PLANE = plane
    return _PLANE


def until(what: str, cond: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `cond` (a state the API server or a controller reaches) until it holds, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def delete_namespaces(core: client.CoreV1Api, prefix: str) -> None:
    """A test's own namespaces (all named with its prefix) go when it ends."""
    for ns in core.list_namespace().items:
        if ns.metadata.name.startswith(prefix):
            with contextlib.suppress(ApiException):
                core.delete_namespace(ns.metadata.name)
