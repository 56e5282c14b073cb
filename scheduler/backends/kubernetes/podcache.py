"""Every pod Corral binds (schedulerName corral), kept by a watch: what poll() reads instead of a LIST per cycle.

BoundPods lists the pods once (fieldSelector spec.schedulerName=corral, every namespace), remembers the list's
resourceVersion, then watches from it in a Feed's thread, applying each event as it streams in (not when the watch
request ends), so the cache trails the API server by one event's delivery. A 410 Gone (the version was compacted
away, e.g. after the watch was down a while) re-lists and replaces the cache whole, so a pod deleted while the
watch was down is dropped; any other watch error resumes from the last version applied after the Feed's pause.

The cache is a past state of the cluster, never a wrong one: what it says a pod did (ended, failed, is being
deleted) happened. What it cannot say is that a pod is missing or still unbound: its creation or bind may not have
arrived yet. The executor therefore reads an attempt afresh (key_of, fresh) whenever the cache shows it short of
pods or with a pod to bind, and decides on that, as the per-cycle LIST did.
"""

from __future__ import annotations

import threading
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.attempts import Attempt, job_state, members
from scheduler.backends.kubernetes.nodes import core_api
from scheduler.backends.kubernetes.view import View, listed

OURS = f"spec.schedulerName={k8s.SCHEDULER_NAME}"  # every pod Corral binds, its own and others'
TERMINAL = ("Succeeded", "Failed")
Key = tuple[str, str]  # (job label, attempt) as the pods carry them
Id = tuple[str, int]  # (job id, attempt) as the executor knows them
Name = tuple[str, str]  # (namespace, name): one pod at a time (a DELETED comes before a new pod of the name)


def key_of(pod: Any) -> Key | None:
    """The attempt a pod is marked for: labels on Corral's own pods, annotations (copied by the Binding API) on
    others'; None when it carries no marks."""
    marks = pod.metadata.labels or {}
    if k8s.JOB_LABEL not in marks:
        marks = pod.metadata.annotations or {}
    if k8s.JOB_LABEL not in marks:
        return None
    return marks[k8s.JOB_LABEL], marks.get(k8s.ATTEMPT_LABEL, "")


def by_attempt(core: Any) -> dict[Key, list[Any]]:
    """Every pod Corral binds, by attempt, listed now."""
    out: dict[Key, list[Any]] = {}
    for p in listed(core.list_pod_for_all_namespaces(field_selector=OURS, _preload_content=False))[0]:
        key = key_of(p)
        if key is not None:
            out.setdefault(key, []).append(p)
    return out


def fresh(core: Any, job_id: str, attempt: int, namespace: str, foreign: list[str]) -> list[Any]:
    """An attempt's marked pods as the API server has them now: Corral's own by label in its namespace, others'
    by name. Only pods the per-cycle LIST would have returned for it (schedulerName corral, its marks)."""
    key = (k8s.dns_label(job_id), str(attempt))
    if foreign:
        pods = []
        for name in foreign:
            try:
                pods.append(core.read_namespaced_pod(name, namespace))
            except ApiException as e:
                if e.status != 404:
                    raise
    else:
        pods = core.list_namespaced_pod(
            namespace, label_selector=k8s.selector(job_id, attempt), field_selector=OURS
        ).items
    return [p for p in pods if p.spec.scheduler_name == k8s.SCHEDULER_NAME and key_of(p) == key]


class BoundPods:
    """The pods Corral binds, by attempt; thread-safe (a Feed's thread watches, the scheduling thread reads)."""

    def __init__(self, api: Any) -> None:
        self.core = core_api(api)
        self.lock = threading.Lock()
        self.pods: dict[Name, Any] = {}  # (namespace, name) -> the pod as last seen
        self.keys: dict[Name, Key] = {}  # (namespace, name) -> its attempt (pods with marks only)
        self.index: dict[Key, dict[Name, Any]] = {}  # attempt -> (namespace, name) -> pod
        self.resource_version = ""
        self.lists = 0  # LISTs made (the first, then one per 410): what the tests and the benchmark count
        self.events = 0
        self.fresh_reads = 0  # attempts read from the API server because the cache could not vouch for them
        self.touched: set[Key] = set()  # attempts whose pods changed since due() last asked
        self.relisted = False  # the cache was replaced since due() last asked: every attempt is due
        self.quiet: dict[Key, Id] = {}  # attempts judged with nothing to wait on but their pods changing
        self.quiet_ids: set[Id] = set()
        self.gone_seen: set[str] = set()

    def resync(self) -> list[Any]:
        """List every pod Corral binds and replace the cache with it (a start, or a 410)."""
        items, version = listed(self.core.list_pod_for_all_namespaces(field_selector=OURS, _preload_content=False))
        with self.lock:
            self.pods, self.keys, self.index = {}, {}, {}
            for p in items:
                self._put(p)
            self.resource_version = version
            self.lists += 1
            self.relisted = True
        return []

    def changes(self, timeout_s: int = 1) -> list[Any]:
        """Watch from the last version for up to `timeout_s`, applying each event as it comes; always []: the
        cache itself is what the watch yields. A 410 re-lists; other errors are raised for the Feed to retry."""
        if not self.resource_version:
            return self.resync()
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        list_pods = self.core.list_pod_for_all_namespaces

        def raw(**kw: Any) -> Any:  # no model named: the watch hands over each event's JSON as it is, unconverted
            return list_pods(**kw)

        try:
            for ev in w.stream(
                raw,
                resource_version=self.resource_version,
                timeout_seconds=max(1, timeout_s),
                allow_watch_bookmarks=True,
                _request_timeout=timeout_s + 30,
                field_selector=OURS,
            ):
                obj = ev["object"]
                if ev["type"] == "ERROR":  # a Status (the client raises these itself under a timeout)
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                pod = View(obj)
                with self.lock:
                    if ev["type"] != "BOOKMARK":
                        self.events += 1
                        if ev["type"] == "DELETED":
                            self._drop((pod.metadata.namespace, pod.metadata.name))
                        else:
                            self._put(pod)
                    self.resource_version = str(obj["metadata"]["resourceVersion"])
        except ApiException as e:
            if e.status != 410:
                raise
            return self.resync()  # our version is too old to resume from: start over from a list
        return []

    def _put(self, pod: Any) -> None:
        """Under the lock."""
        uid = (pod.metadata.namespace, pod.metadata.name)
        self._drop(uid)
        self.pods[uid] = pod
        key = key_of(pod)
        if key is not None:
            self.touched.add(key)
            self.keys[uid] = key
            self.index.setdefault(key, {})[uid] = pod

    def _drop(self, uid: Name) -> None:
        """Under the lock."""
        self.pods.pop(uid, None)
        key = self.keys.pop(uid, None)
        if key is not None:
            self.touched.add(key)
            same = self.index.get(key)
            if same is not None:
                same.pop(uid, None)
                if not same:
                    del self.index[key]

    def of(self, key: Key) -> list[Any]:
        """The pods marked for an attempt, as last seen."""
        with self.lock:
            return list(self.index.get(key, {}).values())

    def by_attempt(self) -> dict[Key, list[Any]]:
        """Every marked pod by attempt, as last seen."""
        with self.lock:
            return {k: list(v.values()) for k, v in self.index.items()}

    def attempt(self, job_id: str, attempt: int, a: Attempt, job: Any = None) -> list[Any]:
        """An attempt's pods (attempts.members) as poll() must judge them: from the cache, unless it shows the
        attempt short of pods or with a pod not yet bound (a creation or a bind it may not have seen yet), or its
        Job ended (its pods' last states decide the exit): then read afresh, as the per-cycle LIST had them."""
        pods = members(job_id, attempt, a, self.of((k8s.dns_label(job_id), str(attempt))))
        short = len(pods) < a.workers if not a.job else job_state(job)[0] is not None
        unbound = any(
            p.spec.node_name is None and p.metadata.deletion_timestamp is None and p.status.phase not in TERMINAL
            for p in pods
        )
        if short or unbound:
            self.fresh_reads += 1
            pods = members(job_id, attempt, a, fresh(self.core, job_id, attempt, a.namespace, a.foreign))
        return pods

    def due(self, attempts: dict[Id, Attempt], gone: set[str]) -> list[tuple[Id, Attempt]]:
        """The attempts poll() must judge now: every one after a re-list or when the deleted nodes changed; else
        all but the quiet ones (settle) whose pods have not changed since. Skipping those is exact: judged again
        on the same pods, with nothing else of theirs changed, they would come out the same (no exit, no call)."""
        with self.lock:
            touched, self.touched = self.touched, set()
            everything, self.relisted = self.relisted, False
        if everything or gone != self.gone_seen:
            self.quiet, self.quiet_ids, self.gone_seen = {}, set(), set(gone)
        for key in touched:
            i = self.quiet.pop(key, None)
            if i is not None:
                self.quiet_ids.discard(i)
        return [(i, a) for i, a in attempts.items() if i not in self.quiet_ids or a.stopping]

    def settle(self, i: Id, a: Attempt, pods: list[Any]) -> None:
        """After a judgement without an exit: the attempt is quiet when only a change of its pods could change
        that (all of them there, bound and running; nothing being stopped, ended, retried or deleted)."""
        if a.stopping or a.ending or a.failure or a.job or len(pods) != a.workers:
            return
        if all(
            p.spec.node_name and p.metadata.deletion_timestamp is None and p.status.phase not in TERMINAL for p in pods
        ):
            self.quiet[(k8s.dns_label(i[0]), str(i[1]))] = i
            self.quiet_ids.add(i)
