"""Pure builders of the Kubernetes objects Corral creates: plain dicts, no API calls, so they are tested as data.

- pod: one worker of one attempt, for Corral's own scheduler (schedulerName corral) to bind with the Binding API;
  never root, no privilege escalation, no capabilities, the runtime's seccomp profile, no service-account token.
- batch_job: a whole attempt as a batch/v1 Job (k8s_workload job): the Job controller makes the pods, Corral binds
  each to the node chosen for its completion index.
- binding: the pods/binding body that puts a pod on the node the engine chose.
- team objects: the team's namespace, a RoleBinding for its members, a ResourceQuota capping its GPUs, and a
  NetworkPolicy that lets only the hub reach its sandboxes.

Names follow DNS-1123 (lower-case alphanumerics and '-'), so a queue such as "Research/Vision" still maps to a
valid namespace; the labels carry the original job id and attempt so the executor can find pods again by label.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"
SCHEDULER_NAME = "corral"
# The taint a platform team puts on the nodes Corral manages (`corral.dev/managed=true:NoSchedule`): kube-scheduler
# then places nothing there that Corral does not count, while every pod Corral builds tolerates it.
MANAGED_TAINT = "corral.dev/managed"
MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_LABEL = "corral.dev/job"
ATTEMPT_LABEL = "corral.dev/attempt"
WORKER_LABEL = "corral.dev/worker"
GROUP_LABEL = "corral.dev/pod-group"  # every worker of one attempt: the unit that starts and stops together
QUEUE_LABEL = "corral.dev/queue"
TEAM_LABEL = "corral.dev/team"
KIND_LABEL = "corral.dev/kind"  # "job" or "sandbox": the NetworkPolicy isolates sandboxes only
OWNER_LABEL = "corral.dev/owner"  # the submitting user (label_value): a sandbox accepts its own user's pods
NODE_ANNOTATION = "corral.dev/node"  # the node the engine chose: lets a restarted Corral finish a half-done bind
WORKERS_ANNOTATION = "corral.dev/workers"  # the gang's size: a missing worker pod means the attempt was cut
NODES_ANNOTATION = "corral.dev/nodes"  # a Job's pods: the chosen node of each completion index, comma-separated
JOB_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's annotation on each pod it makes
CONTAINER = "main"
# The user a job's or sandbox's processes run as when the service sets no other (k8s_run_as_user): never root,
# whatever the image says. 1000 is the Jupyter images' user (jovyan), so notebooks find their home directory.
DEFAULT_RUN_AS_USER = 1000

_INVALID = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def dns_label(text: str, max_len: int = 63) -> str:
    """`text` as a DNS-1123 label: lower case, runs of other characters become '-', trimmed to `max_len`."""
    out = _INVALID.sub("-", text.lower()).strip("-")[:max_len].strip("-")
    if not out:
        raise ValueError(f"{text!r} has no characters usable in a Kubernetes name")
    return out


def label_value(text: str) -> str:
    """`text` as a label value, one to one: itself when it is a valid value without "--"; otherwise a readable
    part, "--" and a hash. A NetworkPolicy trusts the owner label, so two users must never share a value."""
    if _LABEL_VALUE.fullmatch(text) and "--" not in text:
        return text
    readable = _INVALID.sub("-", text.lower()).strip("-")[:40].strip("-")
    return f"{readable or 'x'}--{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def team_namespace(queue: str, prefix: str = "corral-") -> str:
    """The namespace of a team (a Corral queue). Prefixed so Corral's namespaces never collide with others."""
    return dns_label(prefix + queue)


def group_name(job_id: str, attempt: int) -> str:
    return dns_label(f"corral-{job_id}-{attempt}")


def pod_name(job_id: str, attempt: int, worker: int) -> str:
    # Deterministic: a retried or restarted launch creates the same names, and a 409 says the pod exists already.
    return dns_label(f"corral-{job_id}-{attempt}-{worker}")


def selector(job_id: str, attempt: int) -> str:
    """Label selector for all worker pods of one attempt."""
    return f"{JOB_LABEL}={dns_label(job_id)},{ATTEMPT_LABEL}={attempt}"


def argv(command: str | Sequence[str]) -> list[str]:
    """A command as the container's argv; one string (or a one-element list) is a shell line, as locally."""
    if isinstance(command, str) or len(command) == 1:
        line = command if isinstance(command, str) else command[0]
        if not line.strip():
            raise ValueError("empty command")
        return ["/bin/sh", "-c", line]
    if not command:
        raise ValueError("empty command")
    return list(command)


def split_workers(gpus: Mapping[str, Sequence[int]], n_workers: int) -> list[tuple[str, int]]:
    """(node, GPUs) per worker. The engine's placement merges the workers a node holds; CORRAL_WORKERS splits them
    again into equal workers. Without it (or when it does not divide), each node runs one worker."""
    per_node = [(node, len(ids)) for node, ids in gpus.items()]
    if not per_node:
        raise ValueError("no node to run on")
    total = sum(n for _, n in per_node)
    if n_workers > len(per_node) and total % n_workers == 0:
        each = total // n_workers
        split = [(node, each) for node, n in per_node for _ in range(n // each)]
        if len(split) == n_workers:
            return split
    return per_node


def pod_security(run_as_user: int = DEFAULT_RUN_AS_USER) -> dict[str, Any]:
    """The pod's securityContext: a fixed non-root user (the kubelet refuses to start a container that would run
    as root anyway: runAsNonRoot) and the runtime's default seccomp profile. With container_security() it meets
    the Pod Security Standard "restricted"."""
    if run_as_user < 1:
        raise ValueError(f"run_as_user {run_as_user}: jobs never run as root (uid 0)")
    return {"runAsNonRoot": True, "runAsUser": run_as_user, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    """Each container's securityContext: no privilege escalation (setuid binaries, sudo) and no Linux
    capabilities at all, so a job cannot reach the node (raw sockets, mounts, ptrace of other processes)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


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
    kind: str = "job",
    cpus: float | None = None,
    memory_gb: float | None = None,
    run_as_user: int = DEFAULT_RUN_AS_USER,
    managed_taint: str = MANAGED_TAINT,
    gpu_limits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One worker's pod. It names no node: Corral binds it to `node` (kept as an annotation) with the Binding API,
    which is what the engine's placement means; schedulerName keeps kube-scheduler from placing it first.
    `gpu_limits`: the device plugin's resources it asks in place of `gpus` x nvidia.com/gpu (a shared GPU's
    replicas, a MIG instance: sharing.gpu_limits)."""
    env_all = {
        **(env or {}),
        "CORRAL_JOB_ID": job_id,
        "CORRAL_ATTEMPT": str(attempt),
        "CORRAL_WORKER": str(worker),
        "CORRAL_WORKERS": str(workers),
        "CORRAL_NODE": node,
    }
    labels = {
        MANAGED_BY: "corral",
        JOB_LABEL: dns_label(job_id),
        ATTEMPT_LABEL: str(attempt),
        WORKER_LABEL: str(worker),
        GROUP_LABEL: group_name(job_id, attempt),
        KIND_LABEL: kind,
    }
    if queue := env_all.get("CORRAL_QUEUE"):
        labels[QUEUE_LABEL] = dns_label(queue)
    if owner := env_all.get("CORRAL_OWNER"):
        labels[OWNER_LABEL] = label_value(owner)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": argv(command),
        "env": [{"name": k, "value": v} for k, v in sorted(env_all.items())],
        "resources": resources(gpus, cpus, memory_gb, gpu_limits),
        "securityContext": container_security(),
    }
    if workdir:
        container["workingDir"] = workdir
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job_id, attempt, worker),
            "namespace": namespace,
            "labels": labels,
            "annotations": {NODE_ANNOTATION: node, WORKERS_ANNOTATION: str(workers)},
        },
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            # A pod that ends is reported to Corral, which decides about another attempt: the kubelet never retries.
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": max(0, round(grace_s)),
            "containers": [container],
            # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule, and Corral's own nodes `managed_taint` (the
            # service's k8s_managed_taint); Corral chose this node on purpose.
            "tolerations": [{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in (GPU, managed_taint)],
            "securityContext": pod_security(run_as_user),
            # No credentials for the Kubernetes API inside a job: the namespace's service account is not the
            # job's, and a job that could call the API could read or change its team's other pods.
            "automountServiceAccountToken": False,
        },
    }


def batch_job(
    job_id: str,
    attempt: int,
    *,
    namespace: str,
    workers: Sequence[tuple[str, int]],
    image: str,
    command: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    grace_s: float = 30.0,
    cpus: float | None = None,
    memory_gb: float | None = None,
    run_as_user: int = DEFAULT_RUN_AS_USER,
    managed_taint: str = MANAGED_TAINT,
    gpu_limits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A whole attempt as one Indexed batch/v1 Job: pod i is worker i, which Corral binds to workers[i]'s node
    (the nodes travel as an annotation; the controller marks each pod with its index). The template is pod()'s,
    so the pods carry the labels and annotations poll, adopt and terminate look for. backoffLimit 0: a failed or
    deleted pod fails the Job instead of being replaced, since Corral decides about another attempt."""
    gpus = {n for _, n in workers}
    if len(gpus) != 1:
        raise ValueError(f"a Job's pods share one template, but its workers ask {[n for _, n in workers]} GPUs")
    nodes = [node for node, _ in workers]
    tpl = pod(
        job_id,
        attempt,
        0,
        namespace=namespace,
        node=nodes[0],
        gpus=gpus.pop(),
        image=image,
        command=command,
        env=env,
        workers=len(nodes),
        workdir=workdir,
        grace_s=grace_s,
        cpus=cpus,
        memory_gb=memory_gb,
        run_as_user=run_as_user,
        managed_taint=managed_taint,
        gpu_limits=gpu_limits,
    )
    labels = {k: v for k, v in tpl["metadata"]["labels"].items() if k != WORKER_LABEL}  # one template for all
    notes = {NODES_ANNOTATION: ",".join(nodes), WORKERS_ANNOTATION: str(len(nodes))}
    # What differs per pod comes from the pod itself (downward API): its index, and the node it was bound to.
    per_pod = {"CORRAL_WORKER": f"metadata.annotations['{JOB_INDEX}']", "CORRAL_NODE": "spec.nodeName"}
    container = tpl["spec"]["containers"][0]
    container["env"] = [
        {"name": e["name"], "valueFrom": {"fieldRef": {"fieldPath": per_pod[e["name"]]}}} if e["name"] in per_pod else e
        for e in container["env"]
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": group_name(job_id, attempt),
            "namespace": namespace,
            "labels": labels,
            "annotations": dict(notes),
        },
        "spec": {
            "completions": len(nodes),
            "parallelism": len(nodes),
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {"metadata": {"labels": dict(labels), "annotations": notes}, "spec": tpl["spec"]},
        },
    }


def chosen_node(annotations: Mapping[str, str]) -> str | None:
    """The node the engine chose for a pod of Corral's: its own annotation, or a Job pod's by its index."""
    if NODE_ANNOTATION in annotations:
        return annotations[NODE_ANNOTATION]
    nodes = annotations.get(NODES_ANNOTATION, "").split(",")
    index = annotations.get(JOB_INDEX, "")
    return nodes[int(index)] if index.isdigit() and int(index) < len(nodes) and nodes[int(index)] else None


def resources(
    gpus: int, cpus: float | None = None, memory_gb: float | None = None, gpu_limits: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A worker's container resources. GPUs as limits alone: Kubernetes sets requests equal, and extended resources
    must not overcommit anyway. CPUs and memory as the engine counted them, as requests, so the kubelet's admission
    and the node's other pods see them; memory also as the limit, so a worker cannot take what others were
    promised (CPU is left unlimited: throttling would only waste idle cores)."""
    out: dict[str, Any] = {"limits": dict(gpu_limits) if gpu_limits is not None else {GPU: str(gpus)}}
    requests: dict[str, str] = {}
    if cpus:
        requests["cpu"] = f"{max(1, round(cpus * 1000))}m"
    if memory_gb:
        requests["memory"] = out["limits"]["memory"] = f"{max(1, round(memory_gb * 1024))}Mi"
    if requests:
        out["requests"] = requests
    return out


def binding(pod_name: str, namespace: str, node: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The body of POST pods/{name}/binding: what a scheduler writes to put a pod on a node. The API server
    copies the binding's annotations onto the pod: how Corral marks the pods of others that it bound."""
    meta: dict[str, Any] = {"name": pod_name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": meta,
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }


# Pod Security Admission on every team namespace: the API server itself refuses a pod that is not "restricted"
# (root, privileged, host namespaces or paths, added capabilities), whoever creates it. Corral's own pods comply
# (pod_security, container_security); the label also holds for pods a team admin (ClusterRole admin there) or a
# site that maps members to edit would create by hand, which Corral would otherwise bind to a GPU node.
POD_SECURITY = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}


def namespace(name: str, team: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {MANAGED_BY: "corral", TEAM_LABEL: dns_label(team), **POD_SECURITY}},
    }


def role_binding(namespace: str, group: str | Sequence[str], cluster_role: str = "view") -> dict[str, Any]:
    """Grants the groups (as the cluster's authentication names them) a ClusterRole in the team's namespace; one
    binding per ClusterRole, so its roleRef (which Kubernetes never lets change) is fixed by its name."""
    groups = [group] if isinstance(group, str) else list(group)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"corral-team-{cluster_role}", "namespace": namespace, "labels": {MANAGED_BY: "corral"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g} for g in groups],
    }


def resource_quota(namespace: str, gpus: int, replicas: int = 1, shared: bool = False) -> dict[str, Any]:
    """Caps the team's GPUs at its limit, a backstop should anything bypass Corral. Extended resources can only
    be quota'd as requests (requests.nvidia.com/gpu); limits equal requests for them. Where the device plugin
    time-slices GPUs into `replicas` (the most of any node), a GPU is that many of them, and `shared` caps
    nvidia.com/gpu.shared the same way (GPU sharing: objects asked through sharing.gpu_limits)."""
    hard = {f"requests.{GPU}": str(gpus * replicas)}
    if shared:
        hard[f"requests.{GPU}.shared"] = str(gpus * replicas)
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "corral-gpus", "namespace": namespace, "labels": {MANAGED_BY: "corral"}},
        "spec": {"hard": hard},
    }


def network_policy(
    namespace: str, hub_namespace: str, hub_labels: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None
) -> dict[str, Any]:
    """Sandboxes (pods labelled corral.dev/kind=sandbox) accept traffic only from the hub's pods (one label set
    per kind of hub pod, e.g. the hub and its proxy). Jobs are not selected: a gang's workers must reach each other
    (NCCL, rendezvous)."""
    hub = hub_labels or {"app.kubernetes.io/component": "hub"}
    sets = [hub] if isinstance(hub, Mapping) else list(hub)
    hub_ns = {"matchLabels": {"kubernetes.io/metadata.name": hub_namespace}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "corral-sandbox-isolation", "namespace": namespace, "labels": {MANAGED_BY: "corral"}},
        "spec": {
            "podSelector": {"matchLabels": {KIND_LABEL: "sandbox"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"namespaceSelector": hub_ns, "podSelector": {"matchLabels": dict(p)}} for p in sets]}
            ],
        },
    }


def pod_event(
    namespace: str, pod: str, uid: str, reason: str, message: str, at: str, kind: str = "Warning"
) -> dict[str, Any]:
    """A core/v1 Event about a pod, as a scheduler reports one (`kubectl describe pod` shows it); `at` is an
    RFC 3339 time."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod}.", "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": pod, "uid": uid},
        "reason": reason,
        "message": message[:1024],
        "type": kind,
        "count": 1,
        "firstTimestamp": at,
        "lastTimestamp": at,
        "source": {"component": SCHEDULER_NAME},
        "reportingComponent": SCHEDULER_NAME,
    }
