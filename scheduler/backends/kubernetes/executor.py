"""Runs admitted attempts as pods on a Kubernetes cluster; Corral is a secondary scheduler that binds them itself.

- Nodes (nodes): Ready, schedulable nodes with allocatable nvidia.com/gpu (optionally only those matching
  node_selector) are Corral's nodes; a watch in a background thread reports them going down, being deleted and
  coming up (node_changes), which the service feeds to the engine while it runs.
- KubernetesExecutor: each worker of an attempt is one pod (objects.pod) in the team's namespace (the job's
  queue, created if missing) with schedulerName corral, so kube-scheduler leaves it alone; Corral binds each pod to
  the node the engine chose with the Binding API. Names are deterministic (corral-<job>-<attempt>-<worker>), so a
  retried launch meets 409s and carries on, and a restarted Corral finds its pods again by label. With workload
  "job" (the service's k8s_workload, or a job's CORRAL_K8S_WORKLOAD) an attempt is one Indexed batch/v1 Job
  instead (objects.batch_job): its controller makes the pods, and poll() binds each, as it appears, to the
  node chosen for its completion index; the Job's Complete condition is the attempt's success. poll() reads the
  pods from a watch-fed cache (podcache) and judges only the attempts whose pods changed.
- Pods of others (pods): pods someone else made with schedulerName corral arrive as gangs (arrivals); once the
  engine admits one, launch() binds its pods, marking them with the job and attempt as annotations (the Binding
  API copies them onto the pod). Preemption deletes them with their own grace period; they are not deleted after
  they finish (their owner, a Job controller say, counts them).

Kubernetes assigns GPU devices itself (the device plugin): the indices in Launch.gpus are Corral's bookkeeping of
how many GPUs of which node are taken. Termination is the kubelet's: a delete with grace_period_seconds sends
SIGTERM and, after the grace, SIGKILL, so poll() only watches the pods go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from quotas import QueueTree
from scheduler.backends.base import Arrival, Exit, Handle, Held, Launch, NodeChange, NodeInfo
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes import sandbox as k8s_sandbox
from scheduler.backends.kubernetes import teams as k8s_teams
from scheduler.backends.kubernetes.attempts import Attempt, evicted, failure, found_after_restart, job_state, members
from scheduler.backends.kubernetes.nodes import Feed, NodeWatcher, conflict_ok, core_api, discover_nodes, node_info
from scheduler.backends.kubernetes.others import OtherPods, binding
from scheduler.backends.kubernetes.podcache import BoundPods, Key, by_attempt, fresh
from scheduler.backends.kubernetes.pods import POD_GROUP_ENV, PodGangs, Waiting
from scheduler.backends.kubernetes.sharing import SHARED, gpu_limits

__all__ = ["KubernetesExecutor", "NodeChange", "NodeWatcher", "discover_nodes", "node_info"]

log = logging.getLogger("corral.kubernetes")
IMAGE_ENV = "CORRAL_K8S_DEFAULT_IMAGE"
WORKLOAD_ENV = "CORRAL_K8S_WORKLOAD"  # in a job's env: "pod" or "job", overriding the service's k8s_workload
WORKLOADS = ("pod", "job")
SIGTERM_CODE = -15  # pods deleted (by Corral's terminate, an eviction, a node's removal) read as killed by SIGTERM
TERMINAL = ("Succeeded", "Failed")
STDOUT, STDERR = "stdout.log", "stderr.log"
LOG_TIMEOUT_S = 3.0
BOUND_FEED = "corral-k8s-bound"
ARRIVALS_WATCH_S = 1  # the pending pods' watch: its events reach the engine when a request ends (or at 500)
T = TypeVar("T")
PARALLEL = 32  # API calls in flight at once: launches the service runs together, and a gang's pods within one


class KubernetesExecutor:
    """The Executor for a Kubernetes cluster: attempts are pods; the cluster, not this object, remembers them.

    launch() is thread-safe (LaunchesInParallel): its time is spent waiting on the API server, so the service runs
    several at once, and a gang's pods are created, then bound, concurrently."""

    launch_parallelism = PARALLEL

    def __init__(
        self,
        api: Any,
        cache_dir: Path,
        default_image: str | None = None,
        grace_s: float = 30.0,
        namespace_prefix: str = "corral-",
        sa_timeout_s: float = 30.0,
        hub_namespace: str = "jupyterhub",
        node_selector: str | None = None,
        watch_s: int = 10,
        foreign_pods: bool = True,
        workload: str = "pod",
        run_as_user: int = k8s.DEFAULT_RUN_AS_USER,
        managed_taint: str = k8s.MANAGED_TAINT,
        notebook_storage: k8s_sandbox.NotebookStorage | None = None,
    ) -> None:
        self.core = core_api(api)
        # The client's connection pool keeps cpu_count x 5 connections (10 on 2 CPUs): fewer than the launches in
        # flight plus the feeds' watches, so connections beyond it were closed after each call and opened anew (a
        # TLS handshake each). Pools are made at the first call, so one made now keeps them all.
        pool = getattr(getattr(self.core.api_client, "rest_client", None), "pool_manager", None)
        if pool is not None:
            pool.connection_pool_kw["maxsize"] = max(pool.connection_pool_kw.get("maxsize") or 1, 2 * PARALLEL + 8)
        self.notebook_storage = notebook_storage  # None: a sandbox's files live and die with its pod
        self.batch: Any = client.BatchV1Api(self.core.api_client)
        if workload not in WORKLOADS:
            raise ValueError(f"workload {workload!r}: one of {', '.join(WORKLOADS)}")
        self.workload = workload
        self.nodes = NodeWatcher(self.core, node_selector)  # only nodes matching the selector are Corral's
        self.gangs = PodGangs(self.core) if foreign_pods else None
        self.others = OtherPods(self.core)  # what pods Corral did not place hold on its nodes
        self.bound = BoundPods(self.core)  # every pod Corral binds, by attempt, from a watch: what poll() reads
        self.watch_s = watch_s  # how long one watch request lasts before it is resumed (and close() noticed)
        self._feeds: dict[str, Feed[Any]] = {}
        self._gone: set[str] = set()  # deleted nodes: nobody will confirm their pods' deletion, so force it
        self._listing: dict[Key, list[Any]] | None = None  # one list for all adopt() calls
        self._job_listing: dict[tuple[str, str], Any] = {}
        self.cache_dir = Path(cache_dir)
        # Launch.image first; then this (the service's setting); then $CORRAL_K8S_DEFAULT_IMAGE.
        self.default_image = default_image or os.environ.get(IMAGE_ENV)
        self.grace_s = grace_s
        k8s.pod_security(run_as_user)  # refuses root (0) now, not at the first launch
        self.run_as_user = run_as_user  # every pod Corral builds runs as this user (objects.pod_security)
        self.managed_taint = managed_taint  # and tolerates the taint that keeps kube-scheduler off Corral's nodes
        self.prefix = namespace_prefix
        self.teams = k8s_teams.TeamConfig(namespace_prefix, hub_namespace)
        self.sa_timeout_s = sa_timeout_s
        self._namespaces: set[str] = set()
        self._attempts: dict[tuple[str, int], Attempt] = {}
        self._calls = ThreadPoolExecutor(PARALLEL, thread_name_prefix="corral-k8s")
        # Called before every bind: raises when this instance no longer leads (the service's fence, under HA).
        self.before_bind: Callable[[], None] = lambda: None

    # --- launching ---

    def launch(self, launch: Launch) -> Handle:
        if (launch.job_id, launch.attempt) in self._attempts:  # launched, but the service could not record it
            return Handle(launch.job_id, launch.attempt, None, 0.0)
        if POD_GROUP_ENV in launch.env:
            return self._bind_gang(launch, launch.env[POD_GROUP_ENV])
        image = launch.image or self.default_image
        if not image:
            raise OSError(f"job {launch.job_id}: no image (submit one, or set {IMAGE_ENV})")
        queue = launch.env.get("CORRAL_QUEUE") or "default"
        ns = k8s.team_namespace(queue, self.prefix)
        sandbox = k8s_sandbox.is_sandbox(launch.env)
        job: dict[str, Any] | None = None
        try:
            workers = k8s.split_workers(launch.gpus, int(launch.env.get("CORRAL_WORKERS") or 0))
            limits = [self._gpu_limits(launch, node, n) for node, n in workers]
            common: dict[str, Any] = dict(
                namespace=ns,
                image=image,
                command=launch.command,
                env=launch.env,
                workdir=launch.workdir,
                grace_s=self.grace_s,
                cpus=launch.cpus,
                memory_gb=launch.memory_gb,
                run_as_user=self.run_as_user,
                managed_taint=self.managed_taint,
            )
            if not sandbox and self._workload(launch.env) == "job":  # sandboxes are KubeSpawner's pods
                job = k8s.batch_job(launch.job_id, launch.attempt, workers=workers, gpu_limits=limits[0], **common)
            build = k8s_sandbox.pod if sandbox else k8s.pod
            home = self.notebook_storage if sandbox else None
            if home is not None:  # the user's own claim, the same for every sandbox and attempt of theirs
                common.update(home_claim=k8s_sandbox.claim_name(launch.owner), home_path=home.mount_path)
            pods = (
                []
                if job
                else [
                    build(
                        launch.job_id,
                        launch.attempt,
                        i,
                        node=node,
                        gpus=n,
                        workers=len(workers),
                        gpu_limits=limits[i],
                        **common,
                    )
                    for i, (node, n) in enumerate(workers)
                ]
            )
        except ValueError as e:
            raise OSError(f"job {launch.job_id}: {e}") from e
        name = job["metadata"]["name"] if job else None
        try:
            self._ensure_namespace(ns, queue)
            if sandbox:  # never a sandbox without its namespace's isolation: a failure fails the launch
                k8s_sandbox.ensure_isolation(self.core, ns, self.teams)
            if home is not None:
                k8s_sandbox.ensure_claim(self.core, ns, launch.owner, home)
            if job:  # its controller makes the pods; poll() binds them as they appear
                with conflict_ok():
                    _raw(self.batch.create_namespaced_job, ns, job)
            # Every worker exists before any is bound: a gang starts as close to whole as it can.
            self._each(lambda p: self._create(ns, p), pods)
            k8s_sandbox.isolate(self.core, pods)  # a sandbox's own user may reach it, besides the hub
            self._each(
                lambda p: self._bind(ns, p["metadata"]["name"], p["metadata"]["annotations"][k8s.NODE_ANNOTATION]), pods
            )
        except (ApiException, TimeoutError) as e:
            # No half gangs: what was made goes, and the service records the launch as failed.
            self._delete_own(ns, launch.job_id, launch.attempt, name, 0)
            raise OSError(f"Kubernetes refused job {launch.job_id}: {_why(e)}") from e
        self._attempts[(launch.job_id, launch.attempt)] = Attempt(
            ns, len(workers), job=name, nodes={node for node, _ in workers}
        )
        return Handle(launch.job_id, launch.attempt, None, 0.0)

    def _gpu_limits(self, launch: Launch, node: str, gpus: int) -> dict[str, str] | None:
        """The device plugin's resources a worker on `node` asks (None: `gpus` x nvidia.com/gpu, as always): a
        share's time-slicing replicas, a MIG instance, or whole GPUs of a time-sliced node (sharing.gpu_limits)."""
        info = self.nodes.known.get(node)
        shared = info.sharing if info is not None else None
        if shared is None and launch.gpu_fraction is None and launch.mig is None:
            return None
        return gpu_limits(shared, gpus, launch.gpu_fraction, launch.mig)

    def _create(self, ns: str, pod: dict[str, Any]) -> None:
        with conflict_ok():  # made before a crash or by a retried launch: the same pod, keep it
            _raw(self.core.create_namespaced_pod, ns, pod)

    def _each(self, call: Callable[[T], object], items: Sequence[T]) -> None:
        """call(item) for each item, concurrently; the first error is raised once every call has returned, so
        that what follows (a gang's cleanup) sees all that was done."""
        if len(items) == 1:
            call(items[0])
            return
        errors = [f.exception() for f in [self._calls.submit(call, item) for item in items]]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _workload(self, env: Mapping[str, str]) -> str:
        workload = env.get(WORKLOAD_ENV) or self.workload
        if workload not in WORKLOADS:
            raise ValueError(f"{WORKLOAD_ENV}={workload!r}: one of {', '.join(WORKLOADS)}")
        return workload

    def _ensure_namespace(self, ns: str, team: str) -> None:
        if ns in self._namespaces:
            return
        with conflict_ok():
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

    def _bind_gang(self, launch: Launch, key: str) -> Handle:
        """Bind someone else's gang where the engine placed it: pod i (by name) on worker i's node."""
        pods = self.gangs.take(key) if self.gangs is not None else None
        if not pods:
            raise OSError(f"the pods of {key} are gone (deleted, or bound by someone else)")
        marks = {
            k8s.JOB_LABEL: k8s.dns_label(launch.job_id),
            k8s.ATTEMPT_LABEL: str(launch.attempt),
            k8s.WORKERS_ANNOTATION: str(len(pods)),
        }
        bound: list[Waiting] = []
        unsure: list[Waiting] = []  # the request failed on the way: the pod may be bound or not
        theirs: list[Waiting] = []  # bound by someone else (409): no longer waiting

        def bind(pod_node: tuple[Waiting, str]) -> None:
            p, node = pod_node
            try:
                self._bind(p.namespace, p.name, node, {**marks, k8s.NODE_ANNOTATION: node})
            except ApiException as e:
                if e.status == 409:
                    theirs.append(p)
                elif e.status == 0 or e.status >= 500:  # no answer, or the server's own failure: maybe bound
                    unsure.append(p)
                raise
            except Exception:
                unsure.append(p)
                raise
            bound.append(p)

        try:
            workers = k8s.split_workers(launch.gpus, len(pods))
            # A share or a MIG slice keeps the device plugin's resources its pod asked for (pods.py).
            shared = launch.gpu_fraction is not None or launch.mig is not None
            if not shared and [n for _, n in workers] != [p.gpus for p in pods]:
                raise ValueError(f"placed as {workers}, but its pods ask {[p.gpus for p in pods]}")
            self._each(bind, [(p, node) for p, (node, _) in zip(pods, workers, strict=True)])
        except Exception as e:
            # No half gangs: what Corral bound (or may have) goes, and its owner makes it again; the rest wait
            # again, so that the gang, whole once more, is offered anew.
            for p in bound + unsure:
                try:
                    self._delete_named(p.namespace, p.name, None)
                except Exception as gone:  # the API away: poll() cannot see it either; say so
                    log.error("pod %s/%s of %s may run untracked: %s", p.namespace, p.name, key, gone)
            why = f"Kubernetes refused binding {key}: {_why(e)}"
            if self.gangs is not None:
                waiting = [p for p in pods if p not in bound + unsure + theirs]
                self.gangs.release(waiting)
                if len(waiting) == len(pods):
                    # Untouched, the gang would come back under the same key and meet its failed job: it would
                    # wait in silence. Say why on its pods instead; its owner re-creates them to try again.
                    self.refuse(key, why)
            raise OSError(why) from e
        self._attempts[(launch.job_id, launch.attempt)] = Attempt(
            pods[0].namespace, len(pods), foreign=[p.name for p in pods], nodes={node for node, _ in workers}
        )
        return Handle(launch.job_id, launch.attempt, None, 0.0)

    def _bind(self, ns: str, name: str, node: str, marks: Mapping[str, str] | None = None) -> None:
        self.before_bind()
        try:
            # POST pods/{name}/binding, the subresource schedulers use and the chart's ClusterRole grants (not the
            # namespace's `bindings` collection, which it does not). The generated client cannot deserialize the
            # Status the server answers with: skip deserializing.
            _raw(self.core.create_namespaced_pod_binding, name, ns, k8s.binding(name, ns, node, marks))
        except ApiException as e:
            if e.status != 409:
                raise
            # Already bound (by us, before a crash or a retry): fine on the chosen node, an error elsewhere.
            bound = self.core.read_namespaced_pod(name, ns).spec.node_name
            if bound != node:
                raise ApiException(status=409, reason=f"pod {ns}/{name} is bound to {bound}, not {node}") from e

    def sync_teams(self, tree: QueueTree, capacity: Mapping[str, int]) -> k8s_teams.Applied:
        """Every team's namespace, RoleBindings, GPU quota and NetworkPolicies as `tree` wants them (teams)."""
        shared = [n.sharing for n in self.nodes.current() if n.sharing is not None]
        config = dataclasses.replace(
            self.teams,
            gpu_replicas=max((s.replicas for s in shared), default=1),
            gpu_shared=any(s.resource == SHARED for s in shared),
        )
        return k8s_teams.reconcile(self.core.api_client, tree, capacity, config)

    # --- what the cluster tells Corral (background watches) ---

    def discover(self) -> list[NodeInfo]:
        """Corral's nodes now; node_changes() resumes from this list, so nothing falls between the two."""
        return self.nodes.current()

    def node_changes(self, now: float) -> list[NodeChange]:
        changes: list[NodeChange] = self._feed("corral-k8s-nodes", self.nodes)
        for c in changes:  # in order: a node deleted, then back under its name, has a kubelet again
            if c.deleted:
                self._gone.add(c.name)
            elif c.info is not None:
                self._gone.discard(c.name)
        return changes

    def arrivals(self, now: float) -> list[Arrival]:
        if self.gangs is None:
            return []
        out: list[Arrival] = self._feed("corral-k8s-pods", self.gangs)
        for key, why in self.gangs.drain_problems():
            self.refuse(key, why)
        return out

    def held(self, now: float) -> dict[str, Held]:
        self._feed("corral-k8s-others", self.others)  # what it saw is counted in self.others already
        return self.others.held()

    def binding(self, namespace: str, pod: str) -> tuple[str, Held] | None:
        return binding(self.core, namespace, pod)

    def admit(self, uid: str, node: str, held: Held) -> None:
        self.others.admit(uid, node, held)

    def settled(self) -> bool:
        """No complete gang waits on a namespace that could not be read."""
        return self.gangs is None or not self.gangs.unsure

    def refuse(self, key: str, why: str) -> None:
        """A Warning event on each pod of a gang Corral will not run (kubectl describe pod shows it)."""
        log.warning("not scheduling %s: %s", key, why)
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        for p in self.gangs.refuse(key) if self.gangs is not None else []:
            with contextlib.suppress(ApiException):
                self.core.create_namespaced_event(
                    p.namespace,
                    k8s.pod_event(
                        p.namespace, p.name, p.uid, "FailedScheduling", f"Corral will not schedule it: {why}", at
                    ),
                )

    def _feed(self, name: str, watcher: NodeWatcher | PodGangs | OtherPods) -> list[Any]:
        """What the watcher saw since the last call. The first call lists synchronously unless discover() just did
        (a restarted Corral must know the cluster before it acts); then a thread watches from that list's
        resourceVersion."""
        feed = self._feeds.get(name)
        if feed is None:
            out: list[Any] = [] if watcher.resource_version else watcher.resync()
            # Arrivals are handed over when a watch request ends: a short one, so a burst of pods waits little.
            window = min(self.watch_s, ARRIVALS_WATCH_S) if watcher is self.gangs else self.watch_s
            self._feeds[name] = Feed(name, lambda: watcher.changes(window))
            return out
        return feed.drain()

    def close(self) -> None:
        """Stop the background watches (each ends within watch_s)."""
        for feed in self._feeds.values():
            feed.close()
        self._feeds.clear()

    # --- stopping and watching ---

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        a = self._attempts.get((job_id, attempt))
        if a is None:
            return
        a.stopping = True
        # The kubelet sends SIGTERM now and SIGKILL after the grace; poll() reports the attempt once its pods are gone.
        # Others' pods keep their own grace: their owner chose it.
        a.grace = None if a.foreign else max(0, round(grace_s))
        self._delete_attempt(job_id, attempt, a, a.grace)

    def poll(self, now: float) -> list[Exit]:
        if not self._attempts:
            return []
        self._listing = None
        self._watch_bound()
        jobs = self._jobs() if any(a.job for a in self._attempts.values()) else {}
        ended: list[Exit] = []
        for (job_id, attempt), a in self.bound.due(self._attempts, self._gone):  # those that may have changed
            job = jobs.get((a.namespace, a.job or ""))
            pods = self.bound.attempt(job_id, attempt, a, job)
            e = self._check(job_id, attempt, a, pods, "", job)
            if e is not None:
                ended.append(e)
            else:
                self.bound.settle((job_id, attempt), a, pods)
        return ended

    def _check(
        self, job_id: str, attempt: int, a: Attempt, pods: list[Any], detail: str, job: Any = None
    ) -> Exit | None:
        """The attempt's exit once all its pods are done, else None. A failed or missing worker ends the gang: the
        others are deleted, and the exit waits until none of them still runs (it may still hold its GPUs). Pods
        not bound yet (a Job's, as its controller makes them; Corral's own after a crash) are bound here."""
        a.nodes.update(p.spec.node_name for p in pods if p.spec.node_name)
        # Evicted (kubectl drain): a real kubelet then ends the pod as Failed (143), which is no failure of the job's.
        a.evicted = a.evicted or (not a.stopping and any(evicted(p) for p in pods))
        failed = [p for p in pods if p.status.phase == "Failed"]
        if failed and a.failure is None:
            a.failure = failure(failed[0])  # kept: the failed pod may be gone by the time the others are
        live = [p for p in pods if p.status.phase not in TERMINAL]
        if not (a.failure or a.ending or a.stopping):
            self._bind_waiting(a, live)
        # A Job's pods appear over time: what counts is its state (None: running), not how many pods exist.
        state, job_why = job_state(job) if a.job else (None, "")
        cut = state in ("Failed", "gone") if a.job else len(pods) < a.workers
        if (a.failure or cut) and live and not a.ending:
            a.ending = True
            if a.job:  # first, so that its controller makes no new pods
                self._delete_job(a.namespace, a.job)
            for p in live:  # only the live ones: the failed pod still says why
                self._delete_pod(a.namespace, p, None if a.stopping else 0)
        if a.stopping and not a.ending:  # a terminate whose delete failed (the API away): delete again
            for p in live:
                if p.metadata.deletion_timestamp is None:
                    self._delete_pod(a.namespace, p, a.grace)
        for p in live:  # on a deleted node no kubelet confirms the deletion: finish it
            if p.metadata.deletion_timestamp is not None and p.spec.node_name in self._gone:
                self._delete_pod(a.namespace, p, 0)
        if live or (a.job and state is None):
            return None
        if a.failure is not None:
            code, why = a.failure
        elif state == "Complete" if a.job else len(pods) == a.workers:
            code, why = 0, ""
        else:
            code, why = SIGTERM_CODE, "stopped by Corral" if a.stopping else job_why or "a worker's pod was deleted"
        # Pods that went while their node is cordoned were drained (kubectl drain evicts them): not the job's doing.
        drained = (code == SIGTERM_CODE or a.evicted) and not a.stopping and self.nodes.cordoned(a.nodes)
        if drained:
            why = f"its node was drained ({', '.join(sorted(n for n in a.nodes if self.nodes.cordoned({n})))})"
        del self._attempts[(job_id, attempt)]
        if not a.foreign:  # Corral's finished pods (and Job) hold nothing but clutter the team's namespace
            self._delete_own(a.namespace, job_id, attempt, a.job, 0)
        return Exit(job_id, attempt, code, ": ".join(s for s in (detail, why) if s), drained=drained)

    def _bind_waiting(self, a: Attempt, live: list[Any]) -> None:
        """Bind the attempt's unbound pods to the nodes the engine chose; a refusal fails the attempt."""
        todo = [
            (p.metadata.name, node)
            for p in live
            if p.spec.node_name is None
            and p.metadata.deletion_timestamp is None
            and (node := k8s.chosen_node(p.metadata.annotations or {}))
        ]
        try:
            self._each(lambda name_node: self._bind(a.namespace, *name_node), todo)
        except ApiException as e:
            a.failure = (1, f"could not bind {', '.join(n for n, _ in todo)} (pods of {a.namespace}): {_why(e)}")

    def _watch_bound(self) -> bool:
        """Start the cache of bound pods if it is not running: a LIST now (a restarted Corral must know its pods
        before it acts), then a watch from it in a thread. True when it listed just now."""
        if BOUND_FEED in self._feeds:
            return False
        self.bound.resync()
        self._feeds[BOUND_FEED] = Feed(BOUND_FEED, lambda: self.bound.changes(self.watch_s))
        return True

    def _jobs(self) -> dict[tuple[str, str], Any]:
        """Corral's batch/v1 Jobs by (namespace, name), in its team namespaces only: labels alone can be copied by
        whoever may create a Job somewhere, and a look-alike must not stand for an attempt's Job."""
        items = self.batch.list_job_for_all_namespaces(label_selector=f"{k8s.MANAGED_BY}=corral").items
        return {
            (j.metadata.namespace, j.metadata.name): j for j in items if j.metadata.namespace.startswith(self.prefix)
        }

    def adopt(self, handle: Handle) -> Exit | None:
        if self._listing is None:  # a restart adopts every live attempt in a row: one list for all of them
            # The cache, when it has just listed (a restart); else a list now: it may not have seen a new pod yet.
            self._listing = self.bound.by_attempt() if self._watch_bound() else by_attempt(self.core)
            self._job_listing = self._jobs()
        pods = self._listing.get((k8s.dns_label(handle.job_id), str(handle.attempt)), [])
        name = k8s.group_name(handle.job_id, handle.attempt)
        job = next((j for (_, n), j in sorted(self._job_listing.items()) if n == name), None)
        if job is not None:
            a: Attempt | None = Attempt(job.metadata.namespace, job.spec.completions or 1, job=job.metadata.name)
        else:
            a = found_after_restart(handle.job_id, handle.attempt, pods, self.prefix)
        if a is None:
            return Exit(handle.job_id, handle.attempt, None, "vanished while Corral was down")
        self._attempts[(handle.job_id, handle.attempt)] = a
        pods = members(handle.job_id, handle.attempt, a, pods)
        # Pods created but not yet bound when Corral stopped are bound now: what the engine decided stands.
        return self._check(handle.job_id, handle.attempt, a, pods, "ended while Corral was down", job)

    def address(self, job_id: str, attempt: int) -> tuple[str, int] | None:
        """Worker 0's pod IP and the port its server listens on (a sandbox's notebook): what the hub connects to."""
        a = self._attempts.get((job_id, attempt))
        if a is None or a.foreign:
            return None
        return k8s_sandbox.address(self.core, a.namespace, k8s.pod_name(job_id, attempt, 0))

    def alive(self, job_id: str, attempt: int) -> bool:
        if (job_id, attempt) not in self._attempts:
            return False
        a = self._attempts[(job_id, attempt)]
        pods = members(job_id, attempt, a, fresh(self.core, job_id, attempt, a.namespace, a.foreign))
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
                first = a.foreign[0] if a.foreign else k8s.pod_name(job_id, attempt, 0)
                text = self.core.read_namespaced_pod_log(first, a.namespace, _request_timeout=LOG_TIMEOUT_S)
                tmp = d / (STDOUT + ".tmp")
                tmp.write_text(text if isinstance(text, str) else "")
                tmp.replace(out)  # readers never see a half-written file
        out.touch()
        err.touch()
        return str(out), str(err)

    def _delete_attempt(self, job_id: str, attempt: int, a: Attempt, grace_s: int | None) -> None:
        if not a.foreign:
            self._delete_own(a.namespace, job_id, attempt, a.job, grace_s)
        for name in a.foreign:
            self._delete_named(a.namespace, name, grace_s)

    def _delete_own(self, ns: str, job_id: str, attempt: int, job: str | None, grace_s: int | None) -> None:
        """Delete an attempt Corral made: its Job first, if any (its controller would replace the pods), then
        the pods themselves, so that they get `grace_s` rather than the Job's garbage collection."""
        if job is not None:
            self._delete_job(ns, job)
        self._delete(ns, k8s.selector(job_id, attempt), grace_s)

    def _delete_job(self, ns: str, name: str) -> None:
        with contextlib.suppress(ApiException):  # gone already: what we wanted
            self.batch.delete_namespaced_job(name, ns, propagation_policy="Background")

    def _delete(self, ns: str, label_selector: str, grace_s: int | None) -> None:
        """Delete an attempt's pods (grace None: each pod's own terminationGracePeriodSeconds)."""
        for p in self.core.list_namespaced_pod(ns, label_selector=label_selector).items:
            self._delete_pod(ns, p, grace_s)

    def _delete_pod(self, ns: str, p: Any, grace_s: int | None) -> None:
        if p.metadata.deletion_timestamp is not None and grace_s is None:
            return  # already on its way out with its own grace
        self._delete_named(ns, p.metadata.name, 0 if p.spec.node_name in self._gone else grace_s)

    def _delete_named(self, ns: str, name: str, grace_s: int | None) -> None:
        with contextlib.suppress(ApiException):  # gone already: what we wanted
            self.core.delete_namespaced_pod(name, ns, grace_period_seconds=grace_s)


def _raw(call: Callable[..., Any], *args: Any) -> None:
    """An API call whose answer Corral does not need, left undeserialized (the client's models cost CPU, and some
    answers it cannot read) but read, which returns the connection to the pool: unread, the next call would open
    a new TLS connection."""
    call(*args, _preload_content=False).read()


def _why(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e)
