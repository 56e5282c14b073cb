"""Builders for every test: queue trees, node lists, job specs, simulator worlds, engines and service settings,
with defaults for everything and keyword overrides for what a test is about (CONTRIBUTING.md).

Everything here is plain construction (no files, no processes): a test states only what matters to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quotas import QueueSpec, QueueTree
from scheduler.engine import Engine, JobSpec, NodeSpec, Settings
from scheduler.service.core.settings import ServiceSettings
from scheduler.sim.inputs import EventIn, SimJob, World

# ----- cluster -----


def node(
    name: str,
    pool: str = "a100",
    gpus: int = 8,
    cpus: float | None = None,
    memory_gb: float | None = None,
    domain: str | None = None,
    **kw: Any,
) -> NodeSpec:
    """One node (8 GPUs of a100 unless told; `kw`: the rest of NodeSpec, labels)."""
    return NodeSpec(name, pool, gpus, cpus, memory_gb, domain, **kw)


def nodes(
    pool: str,
    count: int,
    gpus: int,
    cpus: float | None = None,
    memory_gb: float | None = None,
    domains: Mapping[str, Sequence[int]] | None = None,
    names: str = "{pool}-{i}",
) -> list[NodeSpec]:
    """`count` identical nodes named `names` (`<pool>-<i>` unless told); `domains` maps a domain name to node
    indices."""
    member = {i: d for d, idx in (domains or {}).items() for i in idx}
    return [NodeSpec(names.format(pool=pool, i=i), pool, gpus, cpus, memory_gb, member.get(i)) for i in range(count)]


_nodes = nodes  # for the builders below whose `nodes` argument is a count


def capacity(node_list: Iterable[NodeSpec]) -> dict[str, int]:
    """Configured GPUs per pool."""
    out: dict[str, int] = {}
    for n in node_list:
        out[n.pool] = out.get(n.pool, 0) + n.gpus
    return out


def domains_of(node_list: Iterable[NodeSpec]) -> dict[str, dict[str, list[str]]]:
    """Pool -> domain -> node names, from each node's `domain`."""
    out: dict[str, dict[str, list[str]]] = {}
    for n in node_list:
        if n.domain is not None:
            out.setdefault(n.pool, {}).setdefault(n.domain, []).append(n.name)
    return out


# ----- queues -----


def queue(
    name: str,
    parent: str | None = None,
    quota: Mapping[str, int] | None = None,
    limit: Mapping[str, int] | None = None,
    weight: float | Mapping[str, float] = 1.0,
    default_weight: float = 1.0,
) -> QueueSpec:
    return QueueSpec(name, parent, dict(quota or {}), dict(limit or {}), weight, default_weight)


def tree(specs: Iterable[QueueSpec], node_list: Iterable[NodeSpec]) -> QueueTree:
    """A validated tree against the pools of `node_list` (raises QuotaError like the real thing)."""
    return QueueTree(list(specs), capacity(node_list))


def queue_tree(*specs: QueueSpec, gpus: int | Mapping[str, int] = 32, pool: str = "a100") -> QueueTree:
    """A validated tree against `gpus` GPUs of `pool`, or GPUs per pool when `gpus` is a mapping (no nodes)."""
    return QueueTree(list(specs), {pool: gpus} if isinstance(gpus, int) else dict(gpus))


# ----- jobs -----


def job(id: str, queue: str = "team-a", pool: str = "a100", **kw: object) -> JobSpec:
    """A JobSpec with the spec's defaults (1 worker x 1 GPU, priority 0, preemptible)."""
    return JobSpec(id=id, queue=queue, pool=pool, **kw)  # type: ignore[arg-type]


def sim_job(
    id: str,
    submit: float,
    duration: float,
    queue: str = "team-a",
    pool: str = "a100",
    max_runtime: float | None = None,
    **kw: object,
) -> SimJob:
    return SimJob(job(id, queue, pool, **kw), float(submit), float(duration), max_runtime)


def cancel(at: float, job_id: str) -> EventIn:
    return EventIn(at=at, cancel=job_id)


def node_down(at: float, name: str) -> EventIn:
    return EventIn(at=at, node_down=name)


def node_up(at: float, name: str) -> EventIn:
    return EventIn(at=at, node_up=name)


# ----- worlds and engines -----


def world(
    node_list: list[NodeSpec],
    queues: QueueTree | Iterable[QueueSpec],
    jobs: Iterable[SimJob] = (),
    events: Iterable[EventIn] = (),
    settings: Settings | None = None,
    name: str = "test",
) -> World:
    """A simulator World built directly (no files); domains come from the nodes' `domain` fields."""
    t = queues if isinstance(queues, QueueTree) else tree(queues, node_list)
    return World(
        nodes=list(node_list),
        domains=domains_of(node_list),
        tree=t,
        settings=settings or Settings(),
        jobs=list(jobs),
        events=list(events),
        name=name,
    )


def engine(
    node_list: list[NodeSpec], queues: QueueTree | Iterable[QueueSpec], settings: Settings | None = None
) -> Engine:
    t = queues if isinstance(queues, QueueTree) else tree(queues, node_list)
    return Engine(t, node_list, domains_of(node_list), settings)


def pool_engine(
    queues: Iterable[QueueSpec],
    nodes: int = 2,
    gpus: int = 8,
    pool: str = "a100",
    settings: Settings | None = None,
    **node_kw: Any,
) -> Engine:
    """An engine on one pool of `nodes` identical nodes (`node_kw`: the rest of `nodes()`'s arguments)."""
    return engine(_nodes(pool, nodes, gpus, **node_kw), queues, settings)


# ----- the service -----


def service_settings(
    root: Path, database_url: str | None = None, *, data: str = "data", **overrides: Any
) -> ServiceSettings:
    """The service's settings with its files under `root` (data_dir `root/<data>`); `database_url` None is the
    default, SQLite in data_dir. Everything else as ServiceSettings has it (CORRAL_* variables included)."""
    return ServiceSettings(data_dir=root / data, database_url=database_url, **overrides)
