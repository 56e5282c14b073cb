"""Kubernetes nodes as Corral's nodes: which are schedulable GPU nodes now, kept current by a resumable watch.

- node_info: a Ready node with allocatable nvidia.com/gpu (or the device plugin's shared or MIG resources:
  sharing.gpu_sharing); its pool is its nvidia.com/gpu.product label (what GPU
  feature discovery sets), or "gpu" when it has none. A cordoned one (spec.unschedulable) is there but takes nothing
  new: its running jobs stay (kubectl cordon); not Ready or being deleted is down.
- watch_from: one watch from a resourceVersion, shared by the node and pod watchers; the events it got are kept
  whatever ends it (a dropped connection, an ERROR event, a 410 Gone), so none is lost while the next watch
  resumes after them.
- NodeWatcher: resync() lists the nodes and remembers the list's resourceVersion; changes() watches from that
  version and reports nodes going down (NotReady), being deleted, cordoned and coming up; a 410 Gone (the version
  was compacted away) falls back to a resync.
- Feed: runs a watcher's blocking step in a daemon thread and queues what it reports, so a scheduling cycle only
  drains a list and never waits on the API server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubernetes import client, utils, watch
from kubernetes.client.exceptions import ApiException

from scheduler.backends.base import GPUInfo, NodeChange, NodeInfo
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes.sharing import gpu_sharing
from scheduler.backends.kubernetes.view import View

log = logging.getLogger("corral.kubernetes")
DEFAULT_POOL = "gpu"  # GPU nodes without a product label
T = TypeVar("T")


def core_api(api: Any) -> Any:
    """A CoreV1Api from either an ApiClient or a CoreV1Api."""
    return api if isinstance(api, client.CoreV1Api) else client.CoreV1Api(api)


@contextlib.contextmanager
def conflict_ok() -> Iterator[None]:
    """A create that meets 409 (made before a crash, or by a retried launch: the same object) is fine."""
    try:
        yield
    except ApiException as e:
        if e.status != 409:
            raise


def quantity(text: str) -> float:
    """A Kubernetes quantity ("64", "500m", "512Gi") as a number."""
    return float(utils.parse_quantity(text))  # type: ignore[no-untyped-call]


def node_info(node: Any) -> NodeInfo | None:
    """A node as Corral sees it (cordoned or not), or None when it is down: being deleted, not Ready, or without
    allocatable GPUs."""
    if node.metadata.deletion_timestamp is not None:
        return None
    conditions = (node.status.conditions if node.status else None) or []
    if not any(c.type == "Ready" and c.status == "True" for c in conditions):
        return None
    alloc: dict[str, str] = node.status.allocatable or {}
    labels = node.metadata.labels or {}
    n_gpus, sharing = gpu_sharing(labels, alloc)
    if n_gpus <= 0 and not (sharing is not None and sharing.mig):
        return None
    product = labels.get(k8s.GPU_PRODUCT)
    cpus = quantity(alloc["cpu"]) if "cpu" in alloc else None
    memory = round(quantity(alloc["memory"]) / 2**30, 2) if "memory" in alloc else None
    address = next((a.address for a in node.status.addresses or [] if a.type == "InternalIP"), None)
    return NodeInfo(
        node.metadata.name,
        product or DEFAULT_POOL,
        [GPUInfo(i, product or "unknown") for i in range(n_gpus)],
        cpus,
        memory,
        address,
        cordoned=bool(node.spec and node.spec.unschedulable),
        sharing=sharing,
    )


def watched(ev: dict[str, Any]) -> tuple[str, Any]:
    """A watch event's resourceVersion and object (None for a bookmark, which the client leaves a dict); an ERROR
    event (a Status, such as 410 Gone for a compacted version) raises."""
    obj = ev["object"]
    if ev["type"] == "BOOKMARK":
        return str(obj["metadata"]["resourceVersion"]), None
    if ev["type"] == "ERROR":
        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
    return str(obj.metadata.resource_version), obj


@dataclass
class Watched:
    """What one watch got: its events in order, the resourceVersion after the last, and how it ended."""

    events: list[tuple[str, Any]]  # (type, object); bookmarks only advance the version
    resource_version: str
    gone: bool = False  # 410: the version was compacted away, resync
    error: Exception | None = None  # anything else that cut the watch short, after `events`

    def outcome(self, out: list[T]) -> list[T]:
        """`out` (what the events amounted to); an error is raised only when that loses nothing (so the Feed
        pauses before retrying), else logged: the next watch resumes after these events and meets it again."""
        if self.error is not None:
            if not out:
                raise self.error
            log.warning("a watch ended early (%s); keeping the %d changes it saw", self.error, len(out))
        return out


def watch_from(
    call: Callable[..., Any],
    resource_version: str,
    timeout_s: int,
    limit: int = 0,
    lazy: bool = False,
    **selectors: str,
) -> Watched:
    """Watch `call` (a list_* method) from `resource_version` for up to `timeout_s` (or `limit` events). `lazy`:
    the objects are Views of the events' JSON, not the client's models (milliseconds per object to build)."""
    got = Watched([], resource_version)
    w: Any = watch.Watch()  # type: ignore[no-untyped-call]

    def raw(**kw: Any) -> Any:  # no model named in a docstring: the watch hands over each event's JSON unconverted
        return call(**kw)

    try:
        for ev in w.stream(
            raw if lazy else call,
            resource_version=resource_version,
            timeout_seconds=max(1, timeout_s),
            allow_watch_bookmarks=True,
            _request_timeout=timeout_s + 30,
            **selectors,
        ):
            if lazy and ev["type"] not in ("BOOKMARK", "ERROR") and isinstance(ev["object"], dict):
                ev = {**ev, "object": View(ev["object"])}
            got.resource_version, obj = watched(ev)
            if obj is not None:
                got.events.append((ev["type"], obj))
                if limit and len(got.events) >= limit:  # a burst: hand over what came so far
                    w.stop()
    except ApiException as e:
        got.gone, got.error = e.status == 410, None if e.status == 410 else e
    except Exception as e:  # a dropped connection, a timeout: what came before it still counts
        got.error = e
    return got


def discover_nodes(api: Any, label_selector: str | None = None) -> list[NodeInfo]:
    """The cluster's schedulable GPU nodes (those matching `label_selector`), sorted by pool and name."""
    return NodeWatcher(api, label_selector).current()


class NodeWatcher:
    """Keeps the schedulable GPU nodes current: list once, then watch from the list's resourceVersion."""

    def __init__(self, api: Any, label_selector: str | None = None) -> None:
        self.core = core_api(api)
        self.selector = label_selector or ""
        self.known: dict[str, NodeInfo] = {}  # up (cordoned or not)
        self.down: set[str] = set()  # were up once, exist, take nothing now: their deletion is reported too
        self.resource_version = ""

    def current(self) -> list[NodeInfo]:
        if not self.resource_version:
            self.resync()
        return sorted(self.known.values(), key=lambda n: (n.pool, n.name))

    def cordoned(self, names: set[str]) -> bool:
        """Is any of these nodes cordoned now (as the watch last saw it)?"""
        return any((n := self.known.get(name)) is not None and n.cordoned for name in names)

    def resync(self) -> list[NodeChange]:
        """List every node (after a start, a restart or a 410) and report what differs from what was known."""
        listed = self.core.list_node(label_selector=self.selector)
        seen = {n.metadata.name: node_info(n) for n in listed.items}
        names = sorted(set(seen) | set(self.known) | self.down)
        changes = [c for name in names for c in self._apply(name, seen.get(name), name not in seen)]
        self.resource_version = listed.metadata.resource_version
        return changes

    def changes(self, timeout_s: int = 1) -> list[NodeChange]:
        """Node changes since the last call, waiting up to `timeout_s` for the watch (resumed, not restarted)."""
        if not self.resource_version:
            return self.resync()
        got = watch_from(self.core.list_node, self.resource_version, timeout_s, label_selector=self.selector)
        out = [
            c
            for kind, obj in got.events
            for c in self._apply(obj.metadata.name, None if kind == "DELETED" else node_info(obj), kind == "DELETED")
        ]
        self.resource_version = got.resource_version
        if got.gone:
            return out + self.resync()  # our version is too old to resume from: start over from a list
        return got.outcome(out)

    def _apply(self, name: str, info: NodeInfo | None, deleted: bool = False) -> list[NodeChange]:
        before = self.known.get(name)
        if info is None:
            was_up = self.known.pop(name, None) is not None
            if deleted:
                was = was_up or name in self.down
                self.down.discard(name)
                return [NodeChange(name, None, deleted=True)] if was else []
            if was_up:
                self.down.add(name)
            return [NodeChange(name, None)] if was_up else []
        self.down.discard(name)
        self.known[name] = info
        same = (
            before is not None
            and before.spec() == info.spec()
            and before.cordoned == info.cordoned
            and before.sharing == info.sharing
        )
        return [] if same else [NodeChange(name, info)]


class Feed(Generic[T]):
    """A blocking `step` (one watch that ends after its timeout) run over and over in a daemon thread; what it
    returns is queued for drain(). An error is logged and the step retried after a pause: the watcher resumes
    from its last resourceVersion (or resyncs, on a 410)."""

    def __init__(self, name: str, step: Callable[[], list[T]], retry_s: float = 1.0) -> None:
        self.step, self.retry_s = step, retry_s
        self._lock = threading.Lock()
        self._queue: list[T] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.step()
            except Exception as e:  # the API server away, a dropped connection: try again shortly
                log.warning("%s failed (%s); retrying in %g s", self._thread.name, e, self.retry_s)
                self._stop.wait(self.retry_s)
                continue
            if got:
                with self._lock:
                    self._queue += got

    def drain(self) -> list[T]:
        with self._lock:
            out, self._queue = self._queue, []
        return out

    def close(self, timeout_s: float = 0.0) -> None:
        """Stop after the current step (a watch ends at its timeout); wait up to `timeout_s` for it."""
        self._stop.set()
        self._thread.join(timeout_s)
