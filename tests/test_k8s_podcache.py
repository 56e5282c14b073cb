"""The executor's watch-fed cache of bound pods (k8s_podcache) on the real test control plane (tests/k8s_kit.py).

Two executors run the same script on the same kwok nodes, each in its own namespaces, both as the chart deploys
Corral (plane.corral_client()): one reads its pods from the cache, its twin LISTs every pod Corral binds on every
poll (the executor before the cache). After every step their exits must be the same, including right after a
launch (the cache has not seen the pods yet), after pods deleted while the cache's watch was down (the watch
resumed, and a watch that had to start over: a re-list, as on a 410 Gone), and after both are dropped mid-run and new
executors adopt the pods. Needs the tools from scripts/k8s-tools; skips without them (fails when CORRAL_REQUIRE_K8S=1).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import watch
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import Exit, Handle, Launch
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.attempts import Attempt, members
from scheduler.backends.kubernetes.executor import BOUND_FEED, KubernetesExecutor
from scheduler.backends.kubernetes.nodes import Feed
from scheduler.backends.kubernetes.podcache import OURS, BoundPods, by_attempt, key_of
from tests.k8s_kit import ControlPlane, delete_namespaces, kubelet, shared_plane, until
from tests.marks import starts_processes

IMAGE = "busybox:1.36"
TEST_LABEL = "corral.dev/test"


def listed_models(core: Any) -> dict[tuple[str, str], list[Any]]:
    """Every pod Corral binds, listed now and read into the client's models, by attempt (the code before the cache)."""
    out: dict[tuple[str, str], list[Any]] = {}
    for p in core.list_pod_for_all_namespaces(field_selector=OURS).items:
        key = key_of(p)
        if key is not None:
            out.setdefault(key, []).append(p)
    return out


class Relisting(BoundPods):
    """The twin: every attempt's pods from a LIST of every pod Corral binds, on every poll (as before the cache)."""

    def attempt(self, job_id: str, attempt: int, a: Attempt, job: Any = None) -> list[Any]:
        return members(job_id, attempt, a, listed_models(self.core).get((k8s.dns_label(job_id), str(attempt)), []))

    def by_attempt(self) -> dict[tuple[str, str], list[Any]]:  # what adopt() reads after a restart: a LIST too
        return listed_models(self.core)

    def due(self, attempts: dict[tuple[str, int], Attempt], gone: set[str]) -> list[tuple[tuple[str, int], Attempt]]:
        return list(attempts.items())  # every attempt judged on every poll

    def settle(self, i: tuple[str, int], a: Attempt, pods: list[Any]) -> None:
        pass


@dataclass
class Pair:
    plane: ControlPlane
    nodes: list[str]
    cached: KubernetesExecutor
    twin: KubernetesExecutor
    tmp: Path
    tag: str

    def both(self) -> list[KubernetesExecutor]:
        return [self.cached, self.twin]


def executor(plane: ControlPlane, tmp: Path, prefix: str, tag: str, twin: bool) -> KubernetesExecutor:
    ex = KubernetesExecutor(
        plane.corral_client(),
        tmp / f"k8s-{prefix}{time.monotonic_ns()}",
        IMAGE,
        grace_s=1,
        namespace_prefix=prefix,
        node_selector=f"{TEST_LABEL}={tag}",
        watch_s=1,
        foreign_pods=False,
    )
    if twin:
        ex.bound = Relisting(ex.core)
    return ex


@pytest.fixture
@starts_processes  # the Kubernetes test control plane
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    plane, tag = shared_plane(request.config), uuid.uuid4().hex[:5]
    nodes = [f"kc-{tag}-{i}" for i in range(3)]
    for n in nodes:
        plane.create_gpu_node(n, product=f"NVIDIA-H100-{tag}", gpus=8, labels={TEST_LABEL: tag})
    for n in nodes:
        plane.wait_node_ready(n)
    p = Pair(
        plane,
        nodes,
        executor(plane, tmp_path, f"pc{tag}-", tag, False),
        executor(plane, tmp_path, f"pt{tag}-", tag, True),
        tmp_path,
        tag,
    )
    yield p
    for ex in p.both():
        ex.close()
    for prefix in (f"pc{tag}-", f"pt{tag}-"):
        delete_namespaces(plane.core(), prefix)
    for n in nodes:
        with contextlib.suppress(ApiException):
            plane.core().delete_node(n)


def launch(job: str, gpus: dict[str, list[int]], workers: int = 1) -> Launch:
    return Launch(job, 1, "sleep inf", gpus, {"CORRAL_QUEUE": "nlp", "CORRAL_WORKERS": str(workers)})


def pods(ex: KubernetesExecutor, job: str) -> list[Any]:
    items = ex.core.list_namespaced_pod(f"{ex.prefix}nlp", label_selector=k8s.selector(job, 1)).items
    return sorted(items, key=lambda p: p.metadata.name)


def running(ex: KubernetesExecutor, job: str, n: int) -> list[Any]:
    until(f"{n} pods of {job} running", lambda: [p.status.phase for p in pods(ex, job)] == ["Running"] * n)
    return pods(ex, job)


def finish(pod: Any, code: int) -> None:
    """End a pod as its kubelet would (kwok has none to do it)."""
    status = {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [
            {
                "name": k8s.CONTAINER,
                "image": IMAGE,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}},
            }
        ],
    }
    kubelet().patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})


def delete(ex: KubernetesExecutor, pod: Any) -> None:
    """Someone else deletes the pod; kwok confirms it. Returns once it is gone from the API server."""
    ex.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
    ns, name = pod.metadata.namespace, pod.metadata.name
    until(f"{name} gone", lambda: name not in {p.metadata.name for p in ex.core.list_namespaced_pod(ns).items})


def key(e: Exit) -> tuple[str, int, str]:
    return e.job_id, e.attempt, repr(e)


def exits(ex: KubernetesExecutor, want: int, timeout: float = 60) -> list[Exit]:
    """Poll until `want` exits came."""
    got: list[Exit] = []

    def done() -> bool:
        got.extend(ex.poll(time.time()))
        return len(got) >= want

    until(f"{want} exits", done, timeout)
    return sorted(got, key=key)


def same_exits(p: Pair, want: int, timeout: float = 60) -> list[Exit]:
    """Poll both until the twin has `want` exits and the cached executor the same ones; those exits."""
    got: dict[str, list[Exit]] = {"cached": [], "twin": []}

    def done() -> bool:
        got["twin"] += p.twin.poll(time.time())
        got["cached"] += p.cached.poll(time.time())
        return len(got["twin"]) >= want and sorted(got["cached"], key=key) == sorted(got["twin"], key=key)

    until(f"the same {want} exits from both", done, timeout)
    assert len(got["twin"]) == want, got
    return sorted(got["twin"], key=key)


def stop_watch(ex: KubernetesExecutor) -> None:
    """The cache's watch goes down (its thread ends after its current watch request, watch_s)."""
    ex._feeds[BOUND_FEED].close(timeout_s=ex.watch_s + 35)  # left in place: poll() does not start another


def resume_watch(ex: KubernetesExecutor) -> None:
    """The watch comes back, from the last version the cache applied (as the Feed's retry does)."""
    ex._feeds[BOUND_FEED] = Feed(BOUND_FEED, lambda: ex.bound.changes(ex.watch_s))


def test_the_cache_answers_as_a_list_per_poll_through_watch_gaps_a_410_and_a_restart(pair: Pair) -> None:
    p, (n0, n1, n2) = pair, pair.nodes
    t = uuid.uuid4().hex[:4]
    ok, bad, cut, stop, gang, down, late, ends, goes, stays = (
        f"{w}{t}" for w in ("ok", "bad", "cut", "stop", "gang", "down", "late", "ends", "goes", "stays")
    )
    plan = [
        (ok, {n0: [0]}, 1),
        (bad, {n0: [1], n1: [1]}, 2),
        (cut, {n0: [2]}, 1),
        (stop, {n0: [3]}, 1),
        (gang, {n1: [2], n2: [2]}, 2),
        (down, {n1: [3]}, 1),
        (ends, {n2: [4]}, 1),
        (goes, {n2: [5]}, 1),
        (stays, {n2: [6]}, 1),
        (late, {n1: [4]}, 1),
    ]
    for ex in p.both():
        ex._watch_bound()  # the cache lists now, before the launches: it learns of their pods from its watch
        for job, gpus, workers in plan:
            ex.launch(launch(job, gpus, workers))
    # Right after the launches the cache may not have seen a pod yet: the answers are the list's all the same.
    for _ in range(3):
        assert p.cached.poll(time.time()) == p.twin.poll(time.time()) == []
    for ex in p.both():
        for job, _, workers in plan:
            running(ex, job, workers)
    assert p.cached.poll(time.time()) == p.twin.poll(time.time()) == []
    # Once the cache has seen every pod bound and running, every attempt is quiet: a poll judges none of them, and
    # neither LISTs nor reads a pod.
    until(
        "every attempt quiet",
        lambda: p.cached.poll(time.time()) == [] and p.cached.bound.quiet_ids == set(p.cached._attempts),
    )
    reads = p.cached.bound.fresh_reads
    for _ in range(5):
        assert p.cached.poll(time.time()) == []
    assert p.cached.bound.fresh_reads == reads and p.cached.bound.lists == 1

    # Succeeded, Failed (the gang's other worker is deleted), deleted by someone else, terminated.
    for ex in p.both():
        finish(pods(ex, ok)[0], 0)
        finish(pods(ex, bad)[1], 3)
        delete(ex, pods(ex, cut)[0])
        ex.terminate(stop, 1, 1.0, time.time())
    got = same_exits(p, 4)
    assert [(e.job_id, e.code) for e in got] == [(bad, 3), (cut, -15), (ok, 0), (stop, -15)]
    assert p.cached.bound.lists == 1

    # The watch goes down; a pod is deleted meanwhile; the watch resumes from its version and sees the deletion.
    stop_watch(p.cached)
    for ex in p.both():
        delete(ex, pods(ex, down)[0])
    assert [(e.job_id, e.code) for e in p.twin.poll(time.time())] == [(down, -15)]
    assert p.cached.poll(time.time()) == []  # not seen yet: the cache holds the pod as it last was (running)
    resume_watch(p.cached)
    until(
        "the cached executor's exit of the pod deleted while its watch was down",
        lambda: [(e.job_id, e.code) for e in p.cached.poll(time.time())] == [(down, -15)],
    )
    assert p.cached.bound.lists == 1

    # Down again, a gang's worker deleted and another job's pod finished; the watch cannot resume (its version
    # expired): it re-lists, as after a 410, and the cache is the list's. (This API server answered no 410 to a
    # watch from an old version here, even after an etcd compaction; the 410 itself is the fake test's below.)
    stop_watch(p.cached)
    for ex in p.both():
        delete(ex, pods(ex, gang)[0])
        finish(pods(ex, ends)[0], 0)
    p.cached.bound.resource_version = ""  # what the watch does on a 410: start over from a list
    twin_exits = exits(p.twin, 2)
    assert [(e.job_id, e.code) for e in twin_exits] == [(ends, 0), (gang, -15)]
    assert p.cached.poll(time.time()) == []
    resume_watch(p.cached)
    until("a re-list", lambda: p.cached.bound.lists == 2)
    assert exits(p.cached, 2) == twin_exits
    assert p.cached.bound.by_attempt().keys() == by_attempt(p.cached.core).keys()

    # Corral is dropped mid-run (no stop); while it is down, one pod finishes and another is deleted; new executors
    # adopt the attempts as after a restart and go on.
    for ex in p.both():
        ex.close()
        finish(pods(ex, late)[0], 0)
        delete(ex, pods(ex, goes)[0])
    p.cached, p.twin = (executor(p.plane, p.tmp, ex.prefix, p.tag, ex is p.twin) for ex in p.both())
    handles = [Handle(j, 1, None, 0.0) for j in (late, goes, stays, f"never{t}")]
    adopted = [[ex.adopt(h) for h in handles] for ex in p.both()]
    assert adopted[0] == adopted[1]
    assert [e.code if e else "runs" for e in adopted[0]] == [0, None, "runs", None]
    assert p.cached.poll(time.time()) == p.twin.poll(time.time()) == []
    for ex in p.both():
        finish(pods(ex, stays)[0], 4)
    assert [(e.job_id, e.code) for e in same_exits(p, 1)] == [(stays, 4)]
    assert p.cached.bound.lists == 1


# --- with a fake API (in addition to the test above): the events apply as they stream, even when the watch fails


def marked(name: str, rv: str, node: str | None = "n") -> Any:
    labels = {k8s.JOB_LABEL: "j", k8s.ATTEMPT_LABEL: "1"}
    return SimpleNamespace(
        metadata=SimpleNamespace(
            uid=f"u-{name}",
            name=name,
            namespace="ns",
            labels=labels,
            annotations=None,
            resource_version=rv,
            deletion_timestamp=None,
        ),
        spec=SimpleNamespace(node_name=node, scheduler_name=k8s.SCHEDULER_NAME),
        status=SimpleNamespace(phase="Running"),
    )


def marked_json(name: str, rv: str) -> dict[str, Any]:
    """The pod as a watch event carries it."""
    return {
        "metadata": {
            "uid": f"u-{name}",
            "name": name,
            "namespace": "ns",
            "resourceVersion": rv,
            "labels": {k8s.JOB_LABEL: "j", k8s.ATTEMPT_LABEL: "1"},
        },
        "spec": {"nodeName": "n", "schedulerName": k8s.SCHEDULER_NAME},
        "status": {"phase": "Running"},
    }


class ListingCore(CoreV1Api):
    def __init__(self, items: list[Any]) -> None:
        self.items, self.lists = items, 0

    def list_pod_for_all_namespaces(self, **_: Any) -> Any:  # type: ignore[override]
        self.lists += 1
        return SimpleNamespace(items=list(self.items), metadata=SimpleNamespace(resource_version="50"))


class ScriptedWatch:
    """Yields the scripted events, then raises the scripted error (or ends)."""

    script: list[tuple[list[dict[str, Any]], Exception | None]] = []

    def stream(self, *_: Any, **__: Any) -> Iterator[dict[str, Any]]:
        events, error = ScriptedWatch.script.pop(0)
        yield from events
        if error is not None:
            raise error


def test_events_count_as_they_stream_and_a_410_relists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "Watch", ScriptedWatch)
    a, b = marked("a", "10"), marked("b", "11")
    core = ListingCore([a, b])
    cache = BoundPods(core)
    cache.resync()
    assert [p.metadata.name for p in cache.of(("j", "1"))] == ["a", "b"] and cache.resource_version == "50"
    ScriptedWatch.script = [
        (
            [
                {"type": "MODIFIED", "object": marked_json("b", "55")},
                {"type": "DELETED", "object": marked_json("a", "60")},
            ],
            ConnectionResetError("dropped"),
        )
    ]
    with pytest.raises(ConnectionResetError):  # the Feed retries; what came before the error is applied
        cache.changes(1)
    (b_seen,) = cache.of(("j", "1"))
    assert b_seen.metadata.resource_version == "55" and cache.resource_version == "60"
    assert b_seen.spec.node_name == "n" and b_seen.metadata.deletion_timestamp is None  # read as the models are
    assert b_seen.metadata.labels == {k8s.JOB_LABEL: "j", k8s.ATTEMPT_LABEL: "1"}
    core.items = [marked("c", "70")]  # b went while the watch was down, and its version expired
    ScriptedWatch.script = [([{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}], None)]
    assert cache.changes(1) == [] and cache.lists == 2
    assert [p.metadata.name for p in cache.of(("j", "1"))] == ["c"] and cache.pods.keys() == {("ns", "c")}
