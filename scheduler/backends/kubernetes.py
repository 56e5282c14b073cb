"""Runs admitted attempts as pods on a Kubernetes cluster; Corral is a secondary scheduler that binds them itself.

- discover_nodes: Ready, schedulable nodes with allocatable nvidia.com/gpu become NodeInfo; a node's pool is its
  nvidia.com/gpu.product label (what GPU feature discovery sets), or "gpu" when it has none.
- NodeWatcher: the same view kept current. resync() lists nodes and remembers the list's resourceVersion;
  changes() watches from that version and reports nodes going down (NotReady, cordoned, deleted) and coming up; a
  410 Gone (the version was compacted away) falls back to a resync. Core has no node up/down entry point yet, so
  today a restart (build_core rediscovering nodes) is the resync; see the report on what Core needs.
- KubernetesExecutor: each worker of an attempt is one pod (k8s_objects.pod) in the team's namespace (the job's
  queue, created if missing) with schedulerName corral, so kube-scheduler leaves it alone; Corral binds each pod to
  the node the engine chose with the Binding API. Names are deterministic (corral-<job>-<attempt>-<worker>), so a
  retried launch meets 409s and carries on, and a restarted Corral finds its pods again by label.

Kubernetes assigns GPU devices itself (the device plugin): the indices in Launch.gpus are Corral's bookkeeping of
how many GPUs of which node are taken. Termination is the kubelet's: a delete with grace_period_seconds sends
SIGTERM and, after the grace, SIGKILL, so poll() only watches the pods go.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, utils, watch
from kubernetes.client.exceptions import ApiException

from quotas import QueueTree
from scheduler.backends import k8s_objects as k8s
from scheduler.backends import k8s_sandbox, k8s_teams
from scheduler.backends.base import Exit, GPUInfo, Handle, Launch, NodeInfo

IMAGE_ENV = "CORRAL_K8S_DEFAULT_IMAGE"
DEFAULT_POOL = "gpu"  # GPU nodes without a product label
SIGTERM_CODE = -15  # pods deleted (by Corral's terminate, an eviction, a node's removal) read as killed by SIGTERM
TERMINAL = ("Succeeded", "Failed")
STDOUT, STDERR = "stdout.log", "stderr.log"
LOG_TIMEOUT_S = 3.0


def _core(api: Any) -> Any:
    """A CoreV1Api from either an ApiClient or a CoreV1Api."""
    return api if isinstance(api, client.CoreV1Api) else client.CoreV1Api(api)


def _quantity(text: str) -> float:
    """A Kubernetes quantity ("64", "500m", "512Gi") as a number."""
    return float(utils.parse_quantity(text))  # type: ignore[no-untyped-call]


def node_info(node: Any) -> NodeInfo | None:
    """A node as Corral sees it, or None when nothing may be placed there: being deleted, cordoned, not Ready, or
    without allocatable GPUs."""
    if node.metadata.deletion_timestamp is not None or (node.spec and node.spec.unschedulable):
        return None
    conditions = (node.status.conditions if node.status else None) or []
    if not any(c.type == "Ready" and c.status == "True" for c in conditions):
        return None
    alloc: dict[str, str] = (node.status.allocatable or {})
    n_gpus = int(_quantity(alloc.get(k8s.GPU, "0")))
    if n_gpus <= 0:
        return None
    product = (node.metadata.labels or {}).get(k8s.GPU_PRODUCT)
    cpus = _quantity(alloc["cpu"]) if "cpu" in alloc else None
    memory = round(_quantity(alloc["memory"]) / 2**30, 2) if "memory" in alloc else None
    address = next((a.address for a in node.status.addresses or [] if a.type == "InternalIP"), None)
    return NodeInfo(node.metadata.name, product or DEFAULT_POOL,
                    [GPUInfo(i, product or "unknown") for i in range(n_gpus)], cpus, memory, address)


def discover_nodes(api: Any) -> list[NodeInfo]:
    """The cluster's schedulable GPU nodes, sorted by pool and name."""
    return NodeWatcher(api).current()


@dataclass(frozen=True)
class NodeChange:
    """A node that went down (info None: unready, cordoned or deleted) or came up (info: what it offers now)."""

    name: str
    info: NodeInfo | None


class NodeWatcher:
    """Keeps the schedulable GPU nodes current: list once, then watch from the list's resourceVersion."""

    def __init__(self, api: Any) -> None:
        self.core = _core(api)
        self.known: dict[str, NodeInfo] = {}
        self.resource_version = ""

    def current(self) -> list[NodeInfo]:
        if not self.resource_version:
            self.resync()
        return sorted(self.known.values(), key=lambda n: (n.pool, n.name))

    def resync(self) -> list[NodeChange]:
        """List every node (after a start, a restart or a 410) and report what differs from what was known."""
        listed = self.core.list_node()
        seen = {n.metadata.name: node_info(n) for n in listed.items}
        changes = [c for name in sorted(set(seen) | set(self.known)) for c in self._apply(name, seen.get(name))]
        self.resource_version = listed.metadata.resource_version
        return changes

    def changes(self, timeout_s: int = 1) -> list[NodeChange]:
        """Node changes since the last call, waiting up to `timeout_s` for the watch (resumed, not restarted)."""
        if not self.resource_version:
            return self.resync()
        out: list[NodeChange] = []
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for ev in w.stream(self.core.list_node, resource_version=self.resource_version,
                               timeout_seconds=max(1, timeout_s), allow_watch_bookmarks=True):
                obj = ev["object"]
                self.resource_version = obj.metadata.resource_version
                if ev["type"] != "BOOKMARK":
                    out += self._apply(obj.metadata.name, None if ev["type"] == "DELETED" else node_info(obj))
        except ApiException as e:
            if e.status != 410:
                raise
            return out + self.resync()  # our version is too old to resume from: start over from a list
        return out

    def _apply(self, name: str, info: NodeInfo | None) -> list[NodeChange]:
        before = self.known.get(name)
        if info is None:
            return [NodeChange(name, None)] if self.known.pop(name, None) is not None else []
        self.known[name] = info
        return [] if before is not None and before.spec() == info.spec() else [NodeChange(name, info)]


@dataclass
class _Attempt:
    namespace: str
    workers: int
    stopping: bool = False
    ending: bool = False  # a worker failed or vanished: the rest were deleted, the exit waits for them to go
    failure: tuple[int, str] | None = None  # the first failed worker's exit code and why


class KubernetesExecutor:
    """The Executor for a Kubernetes cluster: attempts are pods; the cluster, not this object, remembers them."""

    def __init__(self, api: Any, cache_dir: Path, default_image: str | None = None, grace_s: float = 30.0,
                 namespace_prefix: str = "corral-", sa_timeout_s: float = 30.0,
                 hub_namespace: str = "jupyterhub") -> None:
        self.core = _core(api)
        self.cache_dir = Path(cache_dir)
        # Launch.image first; then this (the service's setting); then $CORRAL_K8S_DEFAULT_IMAGE.
        self.default_image = default_image or os.environ.get(IMAGE_ENV)
        self.grace_s = grace_s
        self.prefix = namespace_prefix
        self.teams = k8s_teams.TeamConfig(namespace_prefix, hub_namespace)
        self.sa_timeout_s = sa_timeout_s
        self._namespaces: set[str] = set()
        self._attempts: dict[tuple[str, int], _Attempt] = {}

    # --- launching ---

    def launch(self, launch: Launch) -> Handle:
        image = launch.image or self.default_image
        if not image:
            raise OSError(f"job {launch.job_id}: no image (submit one, or set {IMAGE_ENV})")
        queue = launch.env.get("CORRAL_QUEUE") or "default"
        ns = k8s.team_namespace(queue, self.prefix)
        try:
            workers = k8s.split_workers(launch.gpus, int(launch.env.get("CORRAL_WORKERS") or 0))
            build = k8s_sandbox.pod if k8s_sandbox.is_sandbox(launch.env) else k8s.pod  # sandboxes: KubeSpawner's
            pods = [build(launch.job_id, launch.attempt, i, namespace=ns, node=node, gpus=n, image=image,
                          command=launch.command, env=launch.env, workers=len(workers), workdir=launch.workdir,
                          grace_s=self.grace_s)
                    for i, (node, n) in enumerate(workers)]
        except ValueError as e:
            raise OSError(f"job {launch.job_id}: {e}") from e
        try:
            self._ensure_namespace(ns, queue)
            for p in pods:  # every worker exists before any is bound: a gang starts as close to whole as it can
                with _conflict_ok():  # made before a crash or by a retried launch: the same pod, keep it
                    self.core.create_namespaced_pod(ns, p)
            k8s_sandbox.isolate(self.core, pods)  # a sandbox's own user may reach it, besides the hub
            for p in pods:
                self._bind(ns, p["metadata"]["name"], p["metadata"]["annotations"][k8s.NODE_ANNOTATION])
        except (ApiException, TimeoutError) as e:
            # No half gangs: what was made goes, and the service records the launch as failed.
            self._delete(ns, k8s.selector(launch.job_id, launch.attempt), 0)
            raise OSError(f"Kubernetes refused job {launch.job_id}: {_why(e)}") from e
        self._attempts[(launch.job_id, launch.attempt)] = _Attempt(ns, len(pods))
        return Handle(launch.job_id, launch.attempt, None, 0.0)

    def _ensure_namespace(self, ns: str, team: str) -> None:
        if ns in self._namespaces:
            return
        with _conflict_ok():
            self.core.create_namespace(k8s.namespace(ns, team))
        # Pods are refused until the controller manager has made the namespace's `default` service account.
        deadline = time.monotonic() + self.sa_timeout_s
        while True:
            try:
                self.core.read_namespaced_service_account("default", ns)
                break
            except ApiException as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise TimeoutError(f"no service account default in {ns}") from e
                time.sleep(0.2)
        self._namespaces.add(ns)

    def _bind(self, ns: str, name: str, node: str) -> None:
        try:
            # The generated client cannot deserialize the Status the server answers with: skip deserializing.
            self.core.create_namespaced_binding(ns, k8s.binding(name, ns, node), _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
            # Already bound (by us, before a crash or a retry): fine on the chosen node, an error elsewhere.
            bound = self.core.read_namespaced_pod(name, ns).spec.node_name
            if bound != node:
                raise ApiException(status=409, reason=f"pod {ns}/{name} is bound to {bound}, not {node}") from e

    def sync_teams(self, tree: QueueTree, capacity: Mapping[str, int]) -> k8s_teams.Applied:
        """Every team's namespace, RoleBindings, GPU quota and NetworkPolicies as `tree` wants them (k8s_teams)."""
        return k8s_teams.reconcile(self.core.api_client, tree, capacity, self.teams)

    # --- stopping and watching ---

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        a = self._attempts.get((job_id, attempt))
        if a is None:
            return
        a.stopping = True
        # The kubelet sends SIGTERM now and SIGKILL after the grace; poll() reports the attempt once its pods are gone.
        self._delete(a.namespace, k8s.selector(job_id, attempt), max(0, round(grace_s)))

    def poll(self, now: float) -> list[Exit]:
        if not self._attempts:
            return []
        # One list per cycle for every attempt, rather than one per attempt.
        pods = self.core.list_pod_for_all_namespaces(label_selector=f"{k8s.MANAGED_BY}=corral").items
        by_key: dict[tuple[str, str], list[Any]] = {}
        for p in pods:
            labels = p.metadata.labels or {}
            by_key.setdefault((labels.get(k8s.JOB_LABEL, ""), labels.get(k8s.ATTEMPT_LABEL, "")), []).append(p)
        ended: list[Exit] = []
        for (job_id, attempt), a in list(self._attempts.items()):
            e = self._check(job_id, attempt, a, by_key.get((k8s.dns_label(job_id), str(attempt)), []), "")
            if e is not None:
                ended.append(e)
        return ended

    def _check(self, job_id: str, attempt: int, a: _Attempt, pods: list[Any], detail: str) -> Exit | None:
        """The attempt's exit once all its pods are done, else None. A failed or missing worker ends the gang: the
        others are deleted, and the exit waits until none of them still runs (it may still hold its GPUs)."""
        failed = [p for p in pods if p.status.phase == "Failed"]
        if failed and a.failure is None:
            a.failure = _failure(failed[0])  # kept: the failed pod may be gone by the time the others are
        live = [p for p in pods if p.status.phase not in TERMINAL]
        if (a.failure or len(pods) < a.workers) and live and not a.ending:
            a.ending = True
            for p in live:  # only the live ones: the failed pod still says why
                self._delete_pod(a.namespace, p, None if a.stopping else 0)
        if live:
            return None
        if a.failure is not None:
            code, why = a.failure
        elif len(pods) == a.workers:
            code, why = 0, ""
        else:
            code, why = SIGTERM_CODE, "stopped by Corral" if a.stopping else "a worker's pod was deleted"
        del self._attempts[(job_id, attempt)]
        # Finished pods hold nothing but clutter the team's namespace; their exit is reported now.
        self._delete(a.namespace, k8s.selector(job_id, attempt), 0)
        return Exit(job_id, attempt, code, ": ".join(s for s in (detail, why) if s))

    def adopt(self, handle: Handle) -> Exit | None:
        pods = self.core.list_pod_for_all_namespaces(
            label_selector=k8s.selector(handle.job_id, handle.attempt)).items
        if not pods:
            return Exit(handle.job_id, handle.attempt, None, "vanished while Corral was down")
        meta = pods[0].metadata
        a = _Attempt(meta.namespace, int((meta.annotations or {}).get(k8s.WORKERS_ANNOTATION, len(pods))))
        self._attempts[(handle.job_id, handle.attempt)] = a
        for p in pods:  # created but not yet bound when Corral stopped: finish what the engine decided
            node = (p.metadata.annotations or {}).get(k8s.NODE_ANNOTATION)
            if p.spec.node_name is None and node and p.status.phase == "Pending":
                try:
                    self._bind(a.namespace, p.metadata.name, node)
                except ApiException:
                    a.ending = True
                    self._delete(a.namespace, k8s.selector(handle.job_id, handle.attempt), 0)
        return self._check(handle.job_id, handle.attempt, a, pods, "ended while Corral was down")

    def alive(self, job_id: str, attempt: int) -> bool:
        if (job_id, attempt) not in self._attempts:
            return False
        pods = self.core.list_pod_for_all_namespaces(label_selector=k8s.selector(job_id, attempt)).items
        return any(p.status.phase not in TERMINAL for p in pods)

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        """Worker 0's log (stdout and stderr merged, as the kubelet keeps them) mirrored into a file on each call;
        empty where there is no kubelet to ask (kwok's simulated nodes) or the pod is gone."""
        d = self.cache_dir / "logs" / k8s.group_name(job_id, attempt)
        d.mkdir(parents=True, exist_ok=True)
        out, err = d / STDOUT, d / STDERR
        a = self._attempts.get((job_id, attempt))
        if a is not None:
            # Any failure (no kubelet, pod gone, a slow node) keeps what was mirrored before.
            with contextlib.suppress(Exception):
                text = self.core.read_namespaced_pod_log(k8s.pod_name(job_id, attempt, 0), a.namespace,
                                                         _request_timeout=LOG_TIMEOUT_S)
                tmp = d / (STDOUT + ".tmp")
                tmp.write_text(text if isinstance(text, str) else "")
                tmp.replace(out)  # readers never see a half-written file
        out.touch()
        err.touch()
        return str(out), str(err)

    def _delete(self, ns: str, label_selector: str, grace_s: int | None) -> None:
        """Delete an attempt's pods (grace None: each pod's own terminationGracePeriodSeconds)."""
        for p in self.core.list_namespaced_pod(ns, label_selector=label_selector).items:
            self._delete_pod(ns, p, grace_s)

    def _delete_pod(self, ns: str, p: Any, grace_s: int | None) -> None:
        if p.metadata.deletion_timestamp is not None and grace_s is None:
            return  # already on its way out with its own grace
        with contextlib.suppress(ApiException):  # gone already: what we wanted
            self.core.delete_namespaced_pod(p.metadata.name, ns, grace_period_seconds=grace_s)


def _failure(p: Any) -> tuple[int, str]:
    """A failed pod's exit code (its first terminated container's, or 1 when it has none) and why."""
    for s in p.status.container_statuses or []:
        t = s.state.terminated if s.state else None
        if t is not None and t.exit_code:
            return int(t.exit_code), f"pod {p.metadata.name}: {t.reason or 'failed'}"
    return 1, f"pod {p.metadata.name}: {p.status.reason or 'failed'}"


def _why(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e)


@contextlib.contextmanager
def _conflict_ok() -> Iterator[None]:
    try:
        yield
    except ApiException as e:
        if e.status != 409:
            raise
