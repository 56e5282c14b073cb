"""Pods others made for Corral to schedule (schedulerName corral), gathered into gangs and offered as arrivals.

The contract (docs/kubernetes.md): pods with the same corral.dev/pod-group label in one namespace are one gang of
corral.dev/group-size pods (an annotation or a label); a pod without the label is a gang of one. Each pod asks
the same nvidia.com/gpu limit; GPU sharing (issue 27): a one-pod gang may ask a MIG slice (a limit of 1
nvidia.com/mig-<profile>) or a share of a GPU (the annotation corral.dev/gpu-fraction: "0.25" on a pod asking its
time-slicing replicas, which it keeps as it asked them). The namespace decides the team (namespace_team: a Corral
team namespace's queue, else the namespace's corral.dev/queue label, which only those who may edit namespaces
set); the gang's queue is the
pod's corral.dev/queue label, which may only pick a queue in that team's subtree (the arrival's scope, checked by
the intake like a team member's submission), else the team's queue. Its pool is the pod's corral.dev/pool label,
else its nodeSelector's nvidia.com/gpu.product, else the only pool.

PodGangs watches unbound pods (fieldSelector spec.schedulerName=corral,spec.nodeName=, without Corral's own
managed-by label) from a resourceVersion, like the node watcher. A gang complete with all its pods is offered once
under a key naming its namespace, group and the set of its pods' UIDs: the same after a restart (so the service's
idempotency check finds the job again), and new when the owner re-creates a pod (a new pod is a new request). A
gang offered but not yet bound that loses a pod is withdrawn. take() hands a gang's pods to the executor to bind.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import Arrival
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.nodes import core_api, quantity, watch_from
from scheduler.backends.kubernetes.sharing import MIG_PREFIX
from scheduler.backends.kubernetes.teams import QUEUE_ANNOTATION
from scheduler.backends.kubernetes.view import listed

GROUP_SIZE = "corral.dev/group-size"
FRACTION = "corral.dev/gpu-fraction"  # an annotation: the share of one GPU a pod asking time-slicing replicas holds
PREEMPTIBLE = "corral.dev/preemptible"  # "false" (a label or annotation): never preempted, runs only within quota
PRIORITY_RANGE = (-1000, 1000)  # Corral's job priorities; a pod's PriorityClass value is clamped into it
GIB = float(1 << 30)
POOL_LABEL = "corral.dev/pool"
POD_GROUP_ENV = "CORRAL_POD_GROUP"  # in an arrival's job env: the gang's key, which launch() binds
PENDING = f"spec.schedulerName={k8s.SCHEDULER_NAME},spec.nodeName="
NOT_OURS = f"{k8s.MANAGED_BY}!=corral"  # Corral's own pods are bound by launch(), not offered
NS_TTL_S = 60.0  # a namespace's team, once read, is trusted this long (an admin may relabel the namespace)
NS_TIMEOUT_S = 5.0  # reading a namespace: the watch thread must not hang on a slow API server

Gang = tuple[str, str]  # namespace, group


@dataclass(frozen=True)
class Waiting:
    """A pending pod of someone else's, as much of it as a gang needs."""

    uid: str
    namespace: str
    name: str
    group: str
    size: int | str  # str: why the size is not usable
    gpus: int
    queue: str | None
    pool: str | None
    image: str | None
    grace_s: int | None
    cpus: float = 0.0  # the pod's CPU requests, all containers: what the engine must count on its node
    memory_gb: float = 0.0  # the pod's memory requests, GiB
    priority: int = 0  # from its PriorityClass (spec.priority, resolved by the API server), clamped
    preemptible: bool = True
    fraction: str | None = None  # corral.dev/gpu-fraction as written (the intake checks it: JobSubmit's rules)
    mig: str | None = None  # the profile of the nvidia.com/mig-<profile> it asks ("a,b": several, refused)


def waiting(pod: Any) -> Waiting:
    meta, spec = pod.metadata, pod.spec
    labels, notes = meta.labels or {}, meta.annotations or {}
    group = labels.get(k8s.GROUP_LABEL)
    size: int | str = 1
    if group is not None:
        given = notes.get(GROUP_SIZE, labels.get(GROUP_SIZE))
        size = (
            int(given)
            if given and given.isdigit() and int(given) >= 1
            else f"pod group {group} needs {GROUP_SIZE} (a label or annotation: a whole number >= 1), got {given!r}"
        )
    limits = [((c.resources.limits if c.resources else None) or {}) for c in spec.containers]
    gpus = sum(int(quantity(lim.get(k8s.GPU, "0"))) for lim in limits)
    migs = sorted({k.removeprefix(MIG_PREFIX) for lim in limits for k in lim if k.startswith(MIG_PREFIX)})
    pool = labels.get(POOL_LABEL) or (spec.node_selector or {}).get(k8s.GPU_PRODUCT)
    low, high = PRIORITY_RANGE
    priority = max(low, min(high, int(getattr(spec, "priority", None) or 0)))
    preemptible = str(notes.get(PREEMPTIBLE, labels.get(PREEMPTIBLE, "true"))).lower() != "false"
    return Waiting(
        meta.uid,
        meta.namespace,
        meta.name,
        group or meta.name,
        size,
        gpus,
        labels.get(k8s.QUEUE_LABEL),
        pool,
        spec.containers[0].image if spec.containers else None,
        spec.termination_grace_period_seconds,
        requested(spec.containers, "cpu"),
        requested(spec.containers, "memory") / GIB,
        priority,
        preemptible,
        notes.get(FRACTION),
        ",".join(migs) or None,
    )


def _up(x: float) -> float:
    """Rounded up to a thousandth (a millicore; about a MiB): never counted below what the pod asks."""
    return math.ceil(x * 1000 - 1e-9) / 1000


def requested(containers: list[Any], resource: str) -> float:
    """The sum of the containers' requests of `resource` (a container with a limit and no request requests its
    limit, as the API server fills it in)."""
    total = 0.0
    for c in containers:
        res = c.resources
        asked = ((getattr(res, "requests", None) or {}) if res else {}).get(resource)
        if asked is None and res is not None:
            asked = (getattr(res, "limits", None) or {}).get(resource)
        total += quantity(asked) if asked is not None else 0.0
    return total


def _shared(pods: list[Waiting]) -> dict[str, Any] | str:
    """What a gang asks of GPU sharing, as job spec fields ({} for whole GPUs), or why it cannot be a job. The
    share and the profile are then checked by the intake as a submission's are (each is for one pod)."""
    p = pods[0]
    if p.mig is not None:
        if "," in p.mig or any(q.mig != p.mig for q in pods):
            return f"the pods of group {p.group} ask MIG slices of several profiles ({p.mig}): one profile, one slice"
        return {"mig": p.mig}
    if p.fraction is not None:
        try:
            return {"gpus": float(p.fraction)}
        except ValueError:
            return f"pod {p.name}: {FRACTION} {p.fraction!r} is not a number (a share of one GPU, such as 0.25)"
    return {}


def namespace_team(ns: Any) -> str | None:
    """The queue subtree a namespace's pods may use: a Corral team namespace's queue, else the namespace's
    corral.dev/queue label. Pods' own labels never decide it: anyone who may create pods sets those."""
    meta = ns.metadata
    labels, notes = meta.labels or {}, meta.annotations or {}
    if labels.get(k8s.MANAGED_BY) == "corral" and notes.get(QUEUE_ANNOTATION):
        return str(notes[QUEUE_ANNOTATION])
    return labels.get(k8s.QUEUE_LABEL)


def gang_key(namespace: str, group: str, uids: list[str]) -> str:
    digest = hashlib.sha256(",".join(sorted(uids)).encode()).hexdigest()[:12]
    return f"{namespace}/{group}/{digest}"


class PodGangs:
    """Pending pods of others by gang; thread-safe (a Feed's thread watches, the scheduling thread takes)."""

    def __init__(self, api: Any) -> None:
        self.core = core_api(api)
        self.lock = threading.Lock()
        self.gangs: dict[Gang, dict[str, Waiting]] = {}
        self.where: dict[str, Gang] = {}  # uid -> its gang
        self.offered: dict[Gang, str] = {}  # gang -> the key it was offered under
        self.by_key: dict[str, Gang] = {}
        self.taken: set[str] = set()  # UIDs being bound: their watch events no longer count (until DELETED)
        self.refused: set[str] = set()
        self.problems: list[tuple[str, str]] = []  # (key, why): refused here, before the service saw them
        self.ns_teams: dict[str, tuple[str, float]] = {}  # namespace -> its team and when that was read
        self.unsure: set[Gang] = set()  # complete gangs whose namespace could not be read: settled again later
        self.resource_version = ""

    def resync(self) -> list[Arrival]:
        """List every pending pod (after a start, a restart or a 410): offer every complete gang not offered as it
        is now, and withdraw those offered that changed or vanished."""
        items, version = listed(
            self.core.list_pod_for_all_namespaces(
                field_selector=PENDING, label_selector=NOT_OURS, _preload_content=False
            )
        )
        teams = self._teams({p.metadata.namespace for p in items})  # outside the lock: take() waits on it
        with self.lock:
            before = set(self.gangs)
            # What was offered stays known, so that _settle withdraws the gangs that lost pods during the gap.
            self.gangs, self.where = {}, {}
            for p in items:
                if p.metadata.deletion_timestamp is None and p.metadata.uid not in self.taken:
                    self._add(waiting(p))
            self.resource_version = version
            return [a for g in sorted(before | set(self.gangs)) for a in self._settle(g, teams)]

    def changes(self, timeout_s: int = 1) -> list[Arrival]:
        if not self.resource_version:
            return self.resync()
        got = watch_from(
            self.core.list_pod_for_all_namespaces,
            self.resource_version,
            timeout_s,
            limit=500,
            lazy=True,
            field_selector=PENDING,
            label_selector=NOT_OURS,
        )
        with self.lock:
            unsure, self.unsure = self.unsure, set()
        teams = self._teams({p.metadata.namespace for _, p in got.events} | {g[0] for g in unsure})
        with self.lock:
            touched: set[Gang] = set(unsure)
            for kind, p in got.events:
                uid = p.metadata.uid
                if kind == "DELETED" or p.metadata.deletion_timestamp is not None:
                    self.taken.discard(uid)
                    g = self.where.pop(uid, None)
                    if g is not None:
                        self.gangs[g].pop(uid, None)
                        touched.add(g)
                elif uid not in self.taken:
                    touched.add(self._add(waiting(p)))
            self.resource_version = got.resource_version
            out = [a for g in sorted(touched) for a in self._settle(g, teams)]
        if got.gone:
            return out + self.resync()  # our version is too old to resume from: start over from a list
        return got.outcome(out)

    def _teams(self, namespaces: set[str]) -> dict[str, str | None]:
        """The team of each namespace (None: it has none); a namespace that could not be read is left out. Only
        teams found are remembered, for NS_TTL_S: a namespace labelled after its pods came counts at once."""
        out: dict[str, str | None] = {}
        now = time.monotonic()
        for ns in namespaces:
            hit = self.ns_teams.get(ns)
            if hit is not None and now - hit[1] < NS_TTL_S:
                out[ns] = hit[0]
                continue
            try:
                team = namespace_team(self.core.read_namespace(ns, _request_timeout=NS_TIMEOUT_S))
            except ApiException as e:
                if e.status == 404:
                    out[ns] = None
                continue
            except Exception:  # a timeout, a dropped connection: settle the gang again later
                continue
            out[ns] = team
            if team is not None:
                self.ns_teams[ns] = (team, now)
        return out

    def _add(self, w: Waiting) -> Gang:
        g = (w.namespace, w.group)
        self.gangs.setdefault(g, {})[w.uid] = w
        self.where[w.uid] = g
        return g

    def _settle(self, g: Gang, teams: dict[str, str | None]) -> list[Arrival]:
        """Withdraw what the gang was offered as, if that changed; offer it when complete. Under the lock."""
        pods = self.gangs.get(g) or {}
        if not pods:
            self.gangs.pop(g, None)
        key = gang_key(g[0], g[1], list(pods)) if pods else None
        out: list[Arrival] = []
        was = self.offered.get(g)
        if was is not None and was != key:
            out.append(Arrival(was, None))
            del self.offered[g]
            self.by_key.pop(was, None)
        if key is None or key == was or key in self.refused:
            return out
        first = next(iter(pods.values()))
        if isinstance(first.size, str):
            self._problem(key, first.size)
        elif len(pods) > first.size:
            self._problem(
                key, f"pod group {g[1]} has {len(pods)} pods waiting, more than its {GROUP_SIZE} of {first.size}"
            )
        elif len(pods) == first.size and g[0] not in teams:
            self.unsure.add(g)
        elif len(pods) == first.size:
            team = teams[g[0]]
            spec = self._spec(key, g, list(pods.values()), team)
            if isinstance(spec, str):
                self._problem(key, spec)
            else:
                self.offered[g], self.by_key[key] = key, g
                out.append(Arrival(key, spec, team))
        return out

    def _problem(self, key: str, why: str) -> None:
        self.refused.add(key)
        self.problems.append((key, why))

    def _spec(self, key: str, g: Gang, pods: list[Waiting], team: str | None) -> dict[str, Any] | str:
        """The job a complete gang asks for, or why it cannot be one. Its queue is checked against the team by
        the intake (the arrival's scope)."""
        if len({p.gpus for p in pods}) != 1:
            return f"the pods of group {g[1]} ask for different numbers of {k8s.GPU}: each must ask the same"
        shared = _shared(pods)
        if isinstance(shared, str):
            return shared
        if pods[0].gpus < 1 and not shared:
            return f"pod {pods[0].name} asks no {k8s.GPU} in resources.limits: Corral schedules GPU pods only"
        if not team:
            return f"namespace {g[0]} belongs to no team: an admin labels it {k8s.QUEUE_LABEL}=<a Corral queue>"
        queue = pods[0].queue or team
        # A gang's workers are one shape: the largest request of any pod, so no pod is counted short.
        extra = {
            "cpus": _up(max(p.cpus for p in pods)),
            "memory_gb": _up(max(p.memory_gb for p in pods)),
            "priority": max(p.priority for p in pods),
            "preemptible": all(p.preemptible for p in pods),
        }
        whole = {} if shared else {"gpus": pods[0].gpus}
        return {
            **extra,
            **whole,
            **shared,
            "name": g[1],
            "queue": queue,
            "pool": pods[0].pool,
            "workers": len(pods),
            "command": f"pods of {g[0]}/{g[1]}",
            "image": pods[0].image,
            "env": {POD_GROUP_ENV: key},
            "labels": {"namespace": g[0], "pod-group": g[1]},
        }

    def take(self, key: str) -> list[Waiting] | None:
        """The gang's pods (by name) to bind, if the gang is still complete as offered; it is no longer watched."""
        with self.lock:
            g = self.by_key.pop(key, None)
            if g is None or self.offered.get(g) != key:
                return None
            del self.offered[g]
            pods = self.gangs.pop(g)
            self.taken.update(pods)
            for uid in pods:
                self.where.pop(uid, None)
            return sorted(pods.values(), key=lambda p: p.name)

    def release(self, pods: list[Waiting]) -> None:
        """Taken pods that were not bound (their gang's bind failed part way) wait again: with the pods their owner
        makes anew for those Corral deleted, the gang is complete again and offered under a new key."""
        with self.lock:
            for p in pods:
                self.taken.discard(p.uid)
                self._add(p)

    def refuse(self, key: str) -> list[Waiting]:
        """Never offer `key` again; the pods of its gang now, to tell their owner why."""
        with self.lock:
            self.refused.add(key)
            ns, group = key.split("/")[:2]
            return list(self.gangs.get((ns, group), {}).values())

    def drain_problems(self) -> list[tuple[str, str]]:
        with self.lock:
            out, self.problems = self.problems, []
        return out
