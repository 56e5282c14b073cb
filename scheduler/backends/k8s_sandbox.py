"""Sandbox pods on Kubernetes: the notebook server's pod comes from KubeSpawner's builder, and Corral binds it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubespawner.objects import make_pod

from scheduler.backends import k8s_objects as k8s
from scheduler.backends.k8s_teams import owner_policy

KIND_ENV = "CORRAL_KIND"  # set by the service on every launch: "job" or "sandbox"
DEFAULT_PORT = 8888  # jupyter-server's


def is_sandbox(env: Mapping[str, str]) -> bool:
    return env.get(KIND_ENV) == "sandbox"


def port(env: Mapping[str, str]) -> int:
    """The port the server listens on: the one in the URL the hub gave it, else jupyter's default."""
    url = env.get("JUPYTERHUB_SERVICE_URL")
    found = urlsplit(url).port if url else None
    return found or DEFAULT_PORT


def pod(job_id: str, attempt: int, worker: int, *, namespace: str, node: str, gpus: int, image: str,
        command: str | Sequence[str], env: Mapping[str, str] | None = None, workers: int = 1,
        workdir: str | None = None, grace_s: float = 30.0) -> dict[str, Any]:
    """A sandbox's pod; the same arguments as k8s_objects.pod, which it stands in for. KubeSpawner's `make_pod`
    gives the pod JupyterHub deployments run (its notebook container, no service-account token, no privilege
    escalation); Corral's parts (labels, annotations, schedulerName corral, GPUs as limits, the grace) come from
    k8s_objects.pod, so the executor finds, binds and stops a sandbox like a job. As in KubeSpawner, the command
    is the container's args: the image's entrypoint (tini in the Jupyter images) stays PID 1."""
    base = k8s.pod(job_id, attempt, worker, namespace=namespace, node=node, gpus=gpus, image=image, command=command,
                   env=env, workers=workers, workdir=workdir, grace_s=grace_s, kind="sandbox")
    meta, spec = base["metadata"], base["spec"]
    (c,) = spec["containers"]
    made = make_pod(name=meta["name"], cmd=c["command"], port=port(env or {}), image=image,
                    env={e["name"]: e["value"] for e in c["env"]}, working_dir=workdir, labels=meta["labels"],
                    annotations=meta["annotations"], extra_resource_limits=c["resources"]["limits"],
                    scheduler_name=spec["schedulerName"], tolerations=spec["tolerations"],
                    extra_pod_config={"restartPolicy": spec["restartPolicy"],
                                      "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"]})
    out: dict[str, Any] = plain(made)
    out["metadata"]["namespace"] = namespace
    return out


def plain(obj: Any) -> Any:
    """A kubernetes_asyncio model (what KubeSpawner builds) as the JSON the API takes: camelCase, no nulls."""
    if isinstance(obj, list):
        return [plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if v is not None}
    if hasattr(obj, "openapi_types"):
        return {obj.attribute_map[a]: plain(getattr(obj, a)) for a in obj.openapi_types
                if getattr(obj, a) is not None}
    return obj


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
        try:
            net.create_namespaced_network_policy(meta["namespace"], body)
        except ApiException as e:
            if e.status != 409:  # made by a retried launch: the same policy
                raise
