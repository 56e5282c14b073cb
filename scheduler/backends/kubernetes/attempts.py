"""An attempt on Kubernetes as the executor tracks it, and which pods really belong to it.

Pods are found by Corral's marks (labels on its own pods, annotations the Binding API copied onto others'), but
marks are only text: whoever may create a pod anywhere can copy them. So a pod counts for an attempt only in the
attempt's namespace and under a name Corral knows (its own pods' deterministic names, the pods its batch Job owns,
or the others' pods it bound itself); a look-alike elsewhere can neither end the gang nor get itself bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scheduler.backends.kubernetes import objects as k8s


@dataclass
class Attempt:
    namespace: str
    workers: int
    stopping: bool = False
    ending: bool = False  # a worker failed or vanished: the rest were deleted, the exit waits for them to go
    failure: tuple[int, str] | None = None  # the first failed worker's exit code and why
    foreign: list[str] = field(default_factory=list)  # names of someone else's pods Corral bound (pods)
    job: str | None = None  # the batch/v1 Job that makes the pods (workload "job")
    grace: int | None = None  # the grace terminate() asked for: poll() asks again if its delete did not happen
    nodes: set[str] = field(default_factory=set)  # where its pods were bound: a drained node's pods vanish unseen
    evicted: bool = False  # one of its pods was seen marked for eviction (DisruptionTarget)


def members(job_id: str, attempt: int, a: Attempt, pods: list[Any]) -> list[Any]:
    """Those of `pods` (carrying the attempt's marks) that are the attempt's."""
    here = [p for p in pods if p.metadata.namespace == a.namespace]
    if a.job is not None:
        return [p for p in here if any(o.kind == "Job" and o.name == a.job for o in p.metadata.owner_references or [])]
    names = set(a.foreign) if a.foreign else {k8s.pod_name(job_id, attempt, i) for i in range(a.workers)}
    return [p for p in here if p.metadata.name in names]


def found_after_restart(job_id: str, attempt: int, pods: list[Any], prefix: str) -> Attempt | None:
    """The attempt as its pods show it after a restart, or None when none of them can be the attempt's.

    Corral's own pods live in its team namespaces (`prefix`...) under their deterministic names. Others' pods
    are taken from the namespace holding most of the marked pods already bound (Corral bound them)."""
    own = [
        p
        for p in pods
        if k8s.JOB_LABEL in (p.metadata.labels or {})
        and p.metadata.namespace.startswith(prefix)
        and p.metadata.name.startswith(k8s.group_name(job_id, attempt) + "-")
    ]
    if own:
        meta = own[0].metadata
        return Attempt(meta.namespace, int((meta.annotations or {}).get(k8s.WORKERS_ANNOTATION, len(own))))
    theirs = [p for p in pods if k8s.JOB_LABEL not in (p.metadata.labels or {}) and p.spec.node_name]
    if not theirs:
        return None
    ns = Counter(p.metadata.namespace for p in theirs).most_common(1)[0][0]
    names = sorted(p.metadata.name for p in theirs if p.metadata.namespace == ns)
    return Attempt(ns, len(names), foreign=names)


def evicted(pod: Any) -> bool:
    """The pod was evicted (the Eviction API marks it DisruptionTarget before deleting it)."""
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "DisruptionTarget" and c.status == "True" for c in conditions)


def failure(p: Any) -> tuple[int, str]:
    """A failed pod's exit code (its first terminated container's, or 1 when it has none) and why."""
    for s in p.status.container_statuses or []:
        t = s.state.terminated if s.state else None
        if t is not None and t.exit_code:
            return int(t.exit_code), f"pod {p.metadata.name}: {t.reason or 'failed'}"
    return 1, f"pod {p.metadata.name}: {p.status.reason or 'failed'}"


def job_state(job: Any) -> tuple[str | None, str]:
    """A Job's end ("Complete", "Failed", or "gone" when deleted) and why; None while it runs."""
    if job is None or job.metadata.deletion_timestamp is not None:
        return "gone", "its Job was deleted"
    for c in (job.status.conditions if job.status else None) or []:
        if c.status == "True" and c.type in ("Complete", "Failed"):
            return c.type, f"Job {job.metadata.name} {c.type.lower()}: {c.reason or ''} {c.message or ''}".strip()
    return None, ""
