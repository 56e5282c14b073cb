"""Pods on Corral's nodes that Corral did not place (a DaemonSet's, kube-scheduler's, static pods): what they hold per
node, from a resumable watch, and the check another scheduler's bind onto a Corral node passes first.

- OtherPods lists, then watches, every assigned pod that is not Corral's to schedule (fieldSelector
  spec.schedulerName!=corral,spec.nodeName!=) and is not finished; a pod counts from the moment it is bound until it
  is gone (a pod being deleted still holds its node until then, as the kubelet sees it). What each holds is its
  GPU limit and its CPU and memory requests (containers summed; an init container larger than that sum counts
  instead), as the kubelet admits it.
- admit(): a bind the webhook allowed counts at once, before the watch sees the pod bound, so the next scheduling
  cycle cannot place into the room it took; if the watch never sees it bound (the bind failed after the webhook)
  it stops counting after ADMITTED_TTL_S.
- held(): per node, what changed since the last call. The first call lists synchronously: a (re)started Corral knows
  what others hold on every node before it binds anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import Held
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.nodes import core_api, quantity, watch_from
from scheduler.backends.kubernetes.pods import GIB, requested
from scheduler.backends.kubernetes.sharing import SHARED

OTHERS = f"spec.schedulerName!={k8s.SCHEDULER_NAME},spec.nodeName!="
TERMINAL = ("Succeeded", "Failed")  # a finished pod holds nothing (the kubelet no longer counts it)
ADMITTED_TTL_S = 30.0  # a bind allowed but never seen: long past any bind call's timeout
NOTHING = Held(0, 0.0, 0.0)


def pod_held(spec: Any) -> Held:
    """What a pod holds on its node: GPU limits, CPU and memory requests (GiB). A time-slicing replica (nvidia.com/gpu
    on a time-sliced node, nvidia.com/gpu.shared) counts as a whole GPU: which physical GPU the device plugin gave it
    is not known here, so Corral keeps off as much as it could take. MIG resources of others are not counted."""
    gpus = sum(
        int(quantity(((c.resources.limits if c.resources else None) or {}).get(name, "0")))
        for c in spec.containers
        for name in (k8s.GPU, SHARED)
    )
    cpus, memory = requested(spec.containers, "cpu"), requested(spec.containers, "memory")
    for c in spec.init_containers or []:  # init containers run one at a time, before the others
        cpus, memory = max(cpus, requested([c], "cpu")), max(memory, requested([c], "memory"))
    return Held(gpus, round(cpus, 6), round(memory / GIB, 6))


def binding(core: Any, namespace: str, name: str) -> tuple[str, Held] | None:
    """A pod another scheduler binds: its UID and what it would hold; None if it is gone or is Corral's to bind
    (Corral's own binds are in its engine already)."""
    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    if pod.spec.scheduler_name == k8s.SCHEDULER_NAME:
        return None
    return pod.metadata.uid, pod_held(pod.spec)


def add(a: Held, b: Held) -> Held:
    return Held(a.gpus + b.gpus, round(a.cpus + b.cpus, 6), round(a.memory_gb + b.memory_gb, 6))


class OtherPods:
    """What pods Corral did not place hold, per node; thread-safe (a Feed's thread watches, the webhook admits, the
    scheduling thread reads)."""

    def __init__(self, api: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core_api(api)
        self.clock = clock
        self.lock = threading.Lock()
        self.pods: dict[str, tuple[str, Held]] = {}  # uid -> (node, what it holds)
        self.admitted: dict[str, tuple[str, Held, float]] = {}  # uid -> (node, held, until when it counts)
        self.reported: dict[str, Held] = {}  # node -> what held() said last
        self.resource_version = ""

    def resync(self) -> list[str]:
        """List every assigned pod of others (after a start, a restart or a 410); the nodes whose count changed."""
        listed = self.core.list_pod_for_all_namespaces(field_selector=OTHERS)
        with self.lock:
            before = set(n for n, _ in self.pods.values())
            self.pods = {}
            for p in listed.items:
                self._see("ADDED", p)
            self.resource_version = listed.metadata.resource_version
            return sorted(before | {n for n, _ in self.pods.values()})

    def changes(self, timeout_s: int = 1) -> list[str]:
        """Nodes whose pods changed since the last call (the watch resumed from the last resourceVersion)."""
        if not self.resource_version:
            return self.resync()
        got = watch_from(
            self.core.list_pod_for_all_namespaces, self.resource_version, timeout_s, limit=500, field_selector=OTHERS
        )
        with self.lock:
            touched = {n for kind, p in got.events for n in self._see(kind, p)}
            self.resource_version = got.resource_version
        if got.gone:
            return sorted(touched) + self.resync()
        return got.outcome(sorted(touched))

    def _see(self, kind: str, pod: Any) -> list[str]:
        uid, node = pod.metadata.uid, pod.spec.node_name
        was = self.pods.pop(uid, None)
        self.admitted.pop(uid, None)  # seen bound (or gone): the watch counts it from now on
        touched = [was[0]] if was else []
        if kind != "DELETED" and node and (pod.status is None or pod.status.phase not in TERMINAL):
            self.pods[uid] = (node, pod_held(pod.spec))
            touched.append(node)
        return touched

    def admit(self, uid: str, node: str, held: Held) -> None:
        """A bind of this pod to `node` was allowed: it counts now, until the watch sees it (or the TTL ends)."""
        with self.lock:
            if uid not in self.pods:
                self.admitted[uid] = (node, held, self.clock() + ADMITTED_TTL_S)

    def held(self) -> dict[str, Held]:
        """Every node whose count changed since the last call: what others hold there now."""
        now = self.clock()
        totals: dict[str, Held] = {}
        with self.lock:
            self.admitted = {u: a for u, a in self.admitted.items() if a[2] > now}
            for node, h in [*self.pods.values(), *((n, h) for n, h, _ in self.admitted.values())]:
                totals[node] = add(totals.get(node, NOTHING), h)
        out = {
            n: totals.get(n, NOTHING)
            for n in set(totals) | set(self.reported)
            if totals.get(n, NOTHING) != self.reported.get(n, NOTHING)
        }
        self.reported = {n: h for n, h in totals.items() if h != NOTHING}
        return out
