"""Sandbox pods on Kubernetes: the notebook server's pod comes from KubeSpawner's builder, and Corral binds it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubespawner.objects import make_pod

from scheduler.backends.base import server_port
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.nodes import conflict_ok
from scheduler.backends.kubernetes.teams import TeamConfig, owner_policy, sandbox_isolation

KIND_ENV = "CORRAL_KIND"  # set by the service on every launch: "job" or "sandbox"
PORT_NAME = "notebook-port"  # what make_pod names the server's containerPort
HOME_VOLUME = "home"  # the pod's volume for its user's claim


@dataclass(frozen=True)
class NotebookStorage:
    """Per-user notebook storage on Kubernetes: one PersistentVolumeClaim per user and team namespace, mounted at
    `mount_path` (the notebook server's root directory) in every sandbox of theirs, so files outlive a server."""

    size: str = "10Gi"
    storage_class: str | None = None  # None: the cluster's default StorageClass
    mount_path: str = "/home/jovyan"  # the Jupyter images' home and notebook directory


def claim_name(owner: str) -> str:
    """The claim of `owner`'s notebooks: a DNS-1123 name, one to one (a readable part and a hash of the name)."""
    readable = k8s.dns_label(owner, 30) if any(ch.isalnum() for ch in owner) else "user"
    return f"corral-home-{readable}-{hashlib.sha256(owner.encode()).hexdigest()[:10]}"


def user_claim(namespace: str, owner: str, storage: NotebookStorage) -> dict[str, Any]:
    """The PersistentVolumeClaim of `owner`'s notebook files in `namespace` (a pure builder, tested as a dict):
    ReadWriteOnce, `storage.size`, the storage class when one is set. It is never deleted with a sandbox."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage.size}}}
    if storage.storage_class is not None:
        spec["storageClassName"] = storage.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(owner),
            "namespace": namespace,
            "labels": {
                k8s.OWNER_LABEL: k8s.label_value(owner),
                "app.kubernetes.io/managed-by": "corral",
                "corral.dev/purpose": "notebook-home",
            },
        },
        "spec": spec,
    }


def ensure_claim(core: Any, namespace: str, owner: str, storage: NotebookStorage) -> str:
    """Before a sandbox's pod: its user's claim exists in the namespace (made on the first sandbox; kept after)."""
    body = user_claim(namespace, owner, storage)
    with conflict_ok():  # made by an earlier sandbox of theirs: the same claim
        core.create_namespaced_persistent_volume_claim(namespace, body)
    return str(body["metadata"]["name"])


def is_sandbox(env: Mapping[str, str]) -> bool:
    return env.get(KIND_ENV) == "sandbox"


def pod(
    job_id: str,
    attempt: int,
    worker: int,
    *,
    namespace: str,
    node: str,
    gpus: int,
    image: str,
    command: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    workdir: str | None = None,
    grace_s: float = 30.0,
    cpus: float | None = None,
    memory_gb: float | None = None,
    run_as_user: int = k8s.DEFAULT_RUN_AS_USER,
    managed_taint: str = k8s.MANAGED_TAINT,
    home_claim: str | None = None,
    home_path: str = NotebookStorage.mount_path,
    gpu_limits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A sandbox's pod; the same arguments as k8s_objects.pod, which it stands in for. KubeSpawner's `make_pod`
    gives the pod JupyterHub deployments run (its notebook container, no service-account token, no privilege
    escalation), confined like a job's (non-root, no capabilities, seccomp RuntimeDefault); Corral's parts
    (labels, annotations, schedulerName corral, resources, the grace) come from objects.pod, so the executor
    finds, binds and stops a sandbox like a job. As in KubeSpawner, the command is the container's args: the
    image's entrypoint (tini in the Jupyter images) stays PID 1. With `home_claim`, the user's claim is mounted at
    `home_path`, where the server opens (its working directory, unless the sandbox names one)."""
    base = k8s.pod(
        job_id,
        attempt,
        worker,
        namespace=namespace,
        node=node,
        gpus=gpus,
        image=image,
        command=command,
        env=env,
        workers=workers,
        workdir=workdir,
        grace_s=grace_s,
        kind="sandbox",
        cpus=cpus,
        memory_gb=memory_gb,
        run_as_user=run_as_user,
        managed_taint=managed_taint,
        gpu_limits=gpu_limits,
    )
    meta, spec = base["metadata"], base["spec"]
    (c,) = spec["containers"]
    volumes = [{"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": home_claim}}] if home_claim else None
    mounts = [{"name": HOME_VOLUME, "mountPath": home_path}] if home_claim else None
    made = make_pod(
        name=meta["name"],
        cmd=c["command"],
        port=server_port(env or {}),
        image=image,
        env={e["name"]: e["value"] for e in c["env"]},
        working_dir=workdir or (home_path if home_claim else None),
        labels=meta["labels"],
        volumes=volumes,
        volume_mounts=mounts,
        annotations=meta["annotations"],
        extra_resource_limits=c["resources"]["limits"],
        extra_resource_guarantees=c["resources"].get("requests"),
        scheduler_name=spec["schedulerName"],
        tolerations=spec["tolerations"],
        # The same confinement as a job's pod (KubeSpawner also sets the user on the container).
        uid=run_as_user,
        allow_privilege_escalation=False,
        pod_security_context=spec["securityContext"],
        container_security_context=c["securityContext"],
        automount_service_account_token=False,
        extra_pod_config={
            "restartPolicy": spec["restartPolicy"],
            "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"],
        },
    )
    out: dict[str, Any] = plain(made)
    out["metadata"]["namespace"] = namespace
    if home_claim:  # the volume's files get the pod's user as group, so the non-root server may write them
        out["spec"].setdefault("securityContext", {})["fsGroup"] = run_as_user
    return out


def plain(obj: Any) -> Any:
    """A kubernetes_asyncio model (what KubeSpawner builds) as the JSON the API takes: camelCase, no nulls."""
    if isinstance(obj, list):
        return [plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if v is not None}
    if hasattr(obj, "openapi_types"):
        return {obj.attribute_map[a]: plain(getattr(obj, a)) for a in obj.openapi_types if getattr(obj, a) is not None}
    return obj


def address(core: Any, namespace: str, name: str) -> tuple[str, int] | None:
    """The pod's IP and its server's port, once the pod has an IP (the kubelet, or kwok, sets status.podIP when it
    runs the pod); None before that, or when the pod is gone."""
    try:
        p = core.read_namespaced_pod(name, namespace)
    except ApiException:
        return None
    ip = p.status.pod_ip if p.status else None
    if not ip or p.status.phase != "Running":
        return None
    ports = [cp.container_port for c in p.spec.containers for cp in c.ports or [] if cp.name == PORT_NAME]
    return ip, ports[0] if ports else server_port({})


def isolate(core: Any, pods: Sequence[Mapping[str, Any]]) -> None:
    """After a sandbox's pod exists: let its own user's pods reach it (a policy the pod owns). Jobs' pods pass."""
    for p in pods:
        meta = p["metadata"]
        owner = meta["labels"].get(k8s.OWNER_LABEL)
        if meta["labels"].get(k8s.KIND_LABEL) != "sandbox" or owner is None:
            continue
        uid = core.read_namespaced_pod(meta["name"], meta["namespace"]).metadata.uid
        body = owner_policy(meta["namespace"], meta["name"], uid, meta["labels"][k8s.GROUP_LABEL], owner)
        net: Any = client.NetworkingV1Api(core.api_client)
        with conflict_ok():  # made by a retried launch: the same policy
            net.create_namespaced_network_policy(meta["namespace"], body)


def ensure_isolation(core: Any, namespace: str, config: TeamConfig) -> None:
    """Before a sandbox's pod is made: the namespace's sandbox isolation policy exists (the team sync makes it, but
    a namespace may be newer than the last sync, or the sync may have failed). An error fails the launch: a
    sandbox never runs open."""
    net: Any = client.NetworkingV1Api(core.api_client)
    with conflict_ok():  # the team sync's, or an earlier launch's: the same policy
        net.create_namespaced_network_policy(namespace, sandbox_isolation(namespace, config))
