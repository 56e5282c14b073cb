"""Simulator input files (SIMULATOR.md): scenario and cluster YAML, trace CSV; errors name file, line and field."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quotas import QueueSpec, QueueTree, QuotaError
from scheduler.engine import JobSpec, NodeSpec, Settings
from scheduler.engine.model import check_gpus, mig_fraction

# A CSV row with its line number.
Row = tuple[int, Mapping[str, str]]


class InputError(Exception):
    """Bad input: which file, where in it, and what is wrong. The CLI prints it and exits 2."""

    def __init__(self, path: str | Path, where: str, what: str):
        self.path, self.where, self.what = str(path), where, what
        super().__init__(f"{path}: {where}: {what}" if where else f"{path}: {what}")


class _In(BaseModel):
    # Unknown keys are reported on stderr and ignored, so a newer file still runs on an older Corral.
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)


class PoolIn(_In):
    name: str
    nodes: int = Field(ge=0)
    gpus_per_node: int = Field(ge=0)
    cpus_per_node: float | None = Field(default=None, ge=0)
    memory_gb_per_node: float | None = Field(default=None, ge=0)
    domains: dict[str, list[str]] = Field(default_factory=dict)
    # MIG slices each node advertises, profile -> count (GPU sharing, docs/scheduling.md); their GPUs are not
    # in gpus_per_node.
    mig_per_node: dict[str, int] = Field(default_factory=dict)

    @field_validator("mig_per_node")
    @classmethod
    def _mig(cls, v: dict[str, int]) -> dict[str, int]:
        for profile, count in v.items():
            mig_fraction(profile)  # ValueError: not a MIG profile
            if count < 0:
                raise ValueError(f"mig_per_node {profile}: {count} slices; 0 or more")
        return v


class ClusterIn(_In):
    pools: list[PoolIn] = Field(min_length=1)


class QueueIn(_In):
    name: str = Field(min_length=1)
    parent: str | None = None
    quota: dict[str, int] = Field(default_factory=dict)
    limit: dict[str, int] = Field(default_factory=dict)
    weight: float | dict[str, float] = 1.0


class SettingsIn(_In):
    min_runtime: float = Field(default=0.0, ge=0)
    starvation_timeout: float = Field(default=Settings.starvation_timeout, gt=0)


class JobIn(_In):
    id: str = Field(min_length=1)
    queue: str
    pool: str
    # GPUs per worker: a whole number, or a fraction of one GPU below 1 for one worker (GPU sharing).
    gpus: int | float = Field(default=1, allow_inf_nan=False)
    workers: int = Field(default=1, ge=1)
    cpus: float = Field(default=0.0, ge=0)
    memory_gb: float = Field(default=0.0, ge=0)
    priority: int = 0
    preemptible: bool = True
    checkpoint: bool = False
    submit: float = Field(ge=0, allow_inf_nan=False)
    duration: float = Field(ge=0, allow_inf_nan=False)
    max_runtime: float | None = Field(default=None, gt=0)
    mig: str | None = None  # a MIG profile: one slice of it (gpus is then the profile's fraction)

    @model_validator(mode="after")
    def _sharing(self) -> JobIn:
        if self.mig is not None:
            fraction = mig_fraction(self.mig)
            if "gpus" in self.model_fields_set and self.gpus != fraction:
                raise ValueError(
                    f"job {self.id}: mig {self.mig} is {fraction} of a GPU; leave gpus out (it is {self.gpus})"
                )
            if self.workers != 1:
                raise ValueError(
                    f"job {self.id}: mig {self.mig} with {self.workers} workers: a slice is for one worker"
                )
            self.gpus = fraction
        else:
            self.gpus = check_gpus(self.gpus, self.workers, f"job {self.id}")
        return self

    def spec(self) -> JobSpec:
        return JobSpec(
            id=self.id,
            queue=self.queue,
            pool=self.pool,
            gpus=self.gpus,
            workers=self.workers,
            cpus=self.cpus,
            memory_gb=self.memory_gb,
            priority=self.priority,
            preemptible=self.preemptible,
            checkpoint=self.checkpoint,
            mig=self.mig,
        )


class EventIn(_In):
    at: float = Field(ge=0, allow_inf_nan=False)
    cancel: str | None = None
    node_down: str | None = None
    node_up: str | None = None

    @model_validator(mode="after")
    def _one_action(self) -> EventIn:
        given = [k for k in ("cancel", "node_down", "node_up") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"an event needs exactly one of cancel, node_down, node_up (got {given or 'none'})")
        return self


class ClusterFileIn(_In):
    cluster: ClusterIn
    queues: list[QueueIn] = Field(default_factory=list)
    settings: SettingsIn = Field(default_factory=SettingsIn)


class ScenarioIn(ClusterFileIn):
    name: str = ""
    description: str = ""
    jobs: list[JobIn] = Field(default_factory=list)
    events: list[EventIn] = Field(default_factory=list)
    expect: list[dict[str, Any]] = Field(default_factory=list)


@dataclass
class SimJob:
    """A job as the simulator replays it: its spec, when it arrives, how long it runs."""

    spec: JobSpec
    submit: float
    duration: float
    max_runtime: float | None = None


@dataclass
class World:
    """A validated cluster, queue tree and settings, plus the jobs and events to replay on it."""

    nodes: list[NodeSpec]
    domains: dict[str, dict[str, list[str]]]
    tree: QueueTree
    settings: Settings
    jobs: list[SimJob] = field(default_factory=list)
    events: list[EventIn] = field(default_factory=list)
    name: str = ""
    expect: list[dict[str, Any]] = field(default_factory=list)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of a field in the YAML source, following the path as far as it exists."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _load_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(path, "", f"cannot read the file: {err.strerror}") from err
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise InputError(path, where, f"not valid YAML: {getattr(err, 'problem', err)}") from err


def _validate(model: type[_In], path: Path) -> Any:
    data, root = _load_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union"))))
        line = _line(root, loc)
        where = (f"line {line}, " if line else "") + (_loc(loc) or "top level")
        more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
        raise InputError(path, where, f"{e['msg']}, got {e.get('input')!r}{more}") from err
    _warn_extra(parsed, path, ())
    return parsed


def _warn_extra(obj: Any, path: Path, loc: tuple[int | str, ...]) -> None:
    if isinstance(obj, BaseModel):
        for k in obj.model_extra or {}:
            print(f"{path}: {_loc(loc + (k,))}: unknown field, ignored", file=sys.stderr)
        for name in type(obj).model_fields:
            _warn_extra(getattr(obj, name), path, loc + (name,))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            _warn_extra(item, path, loc + (i,))


def _world(c: ClusterFileIn, path: Path) -> World:
    nodes: list[NodeSpec] = []
    domains: dict[str, dict[str, list[str]]] = {}
    capacity: dict[str, int] = {}
    for i, p in enumerate(c.cluster.pools):
        where = f"cluster.pools[{i}]"
        if p.name in capacity:
            raise InputError(path, f"{where}.name", f"pool {p.name!r} is declared twice")
        names = [f"{p.name}-{k}" for k in range(p.nodes)]
        member: dict[str, str] = {}
        for d, ns in p.domains.items():
            for n in ns:
                if n not in names:
                    raise InputError(
                        path,
                        f"{where}.domains.{d}",
                        f"node {n!r} is not a node of pool {p.name} ({names[0] if names else 'no nodes'}..)",
                    )
                if n in member:
                    raise InputError(path, f"{where}.domains.{d}", f"node {n!r} is already in domain {member[n]}")
                member[n] = d
        # Quotas are whole GPUs: MIG slices add the whole GPUs their fractions make up.
        mig = sum(count * mig_fraction(profile) for profile, count in p.mig_per_node.items())
        capacity[p.name] = p.nodes * p.gpus_per_node + int(p.nodes * mig + 1e-6)
        domains[p.name] = dict(p.domains)
        nodes += [
            NodeSpec(
                n, p.name, p.gpus_per_node, p.cpus_per_node, p.memory_gb_per_node, member.get(n), mig=p.mig_per_node
            )
            for n in names
        ]
    specs = [QueueSpec(q.name, q.parent, q.quota, q.limit, q.weight) for q in c.queues]
    try:
        tree = QueueTree(specs, capacity)
    except QuotaError as err:
        where, what = err.problems[0]
        raise InputError(
            path, where, what + (f" (and {len(err.problems) - 1} more)" if len(err.problems) > 1 else "")
        ) from err
    s = c.settings
    return World(nodes, domains, tree, Settings(min_runtime=s.min_runtime, starvation_timeout=s.starvation_timeout))


def load_cluster(path: str | Path) -> World:
    """A cluster file: the cluster, queues and settings of a scenario."""
    path = Path(path)
    parsed = _validate(ClusterFileIn, path)
    return _world(parsed, path)


def load_scenario(path: str | Path) -> World:
    path = Path(path)
    parsed = _validate(ScenarioIn, path)
    world = _world(parsed, path)
    seen: set[str] = set()
    for i, j in enumerate(parsed.jobs):
        if j.id in seen:
            raise InputError(path, f"jobs[{i}].id", f"job id {j.id!r} is used twice")
        seen.add(j.id)
        world.jobs.append(SimJob(j.spec(), j.submit, j.duration, j.max_runtime))
    node_names = {n.name for n in world.nodes}
    for i, e in enumerate(parsed.events):
        if e.cancel is not None and e.cancel not in seen:
            raise InputError(path, f"events[{i}].cancel", f"job {e.cancel!r} is not in jobs")
        for key in ("node_down", "node_up"):
            n = getattr(e, key)
            if n is not None and n not in node_names:
                raise InputError(path, f"events[{i}].{key}", f"node {n!r} does not exist")
    world.events = list(parsed.events)
    for i, x in enumerate(parsed.expect):
        if "at" not in x and not x.get("end"):
            raise InputError(path, f"expect[{i}]", "an expectation needs `at: T` or `end: true`")
    world.expect, world.name = parsed.expect, parsed.name or path.stem
    return world


TRACE_COLUMNS = ("id", "submit", "duration", "queue", "pool", "workers", "gpus", "priority", "preemptible")
_REQUIRED = ("id", "submit", "duration", "queue", "pool")


def _number(path: Path, line: int, col: str, raw: str, kind: type, default: Any, low: float) -> Any:
    if raw.strip() == "":
        if default is None:
            raise InputError(path, f"line {line}, column {col}", "is empty; it is required")
        return default
    try:
        v = kind(raw) if kind is float else int(raw)
    except ValueError as err:
        what = "a whole number" if kind is int else "a number"
        raise InputError(path, f"line {line}, column {col}", f"{raw!r} is not {what}") from err
    if isinstance(v, float) and not math.isfinite(v) or v < low:
        raise InputError(path, f"line {line}, column {col}", f"{raw!r} must be at least {low:g}")
    return v


def _gpus(path: Path, line: int, raw: str, workers: int) -> float:
    """The gpus column: a whole number, or a decimal below 1 (a fraction of one GPU) for a one-worker job."""
    if "." not in raw and "e" not in raw.lower():
        return int(_number(path, line, "gpus", raw, int, 1, 0))
    try:
        return check_gpus(_number(path, line, "gpus", raw, float, 1, 0), workers, f"job on line {line}")
    except ValueError as err:
        raise InputError(path, f"line {line}, column gpus", str(err).split(": ", 1)[1]) from err


def _bool(path: Path, line: int, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("", "true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise InputError(path, f"line {line}, column preemptible", f"{raw!r} is not true or false")


def read_rows(path: Path, columns: Iterable[str]) -> Iterator[Row]:
    """Rows of a CSV file with their line numbers; InputError when the file or a required column is missing."""
    try:
        f = path.open(newline="")
    except OSError as err:
        raise InputError(path, "", f"cannot read the file: {err.strerror}") from err
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(
                path,
                "line 1",
                f"the header lacks column(s) {', '.join(missing)}; found {','.join(header) or 'no header'}",
            )
        for row in reader:
            yield reader.line_num, row


def load_trace(path: str | Path) -> list[SimJob]:
    """A trace CSV (SIMULATOR.md): header row, then one job a row."""
    path = Path(path)
    jobs: list[SimJob] = []
    seen: set[str] = set()
    for line, row in read_rows(path, _REQUIRED):
        jid = (row["id"] or "").strip()
        if not jid:
            raise InputError(path, f"line {line}, column id", "is empty; it is required")
        if jid in seen:
            raise InputError(path, f"line {line}, column id", f"job id {jid!r} is used twice")
        seen.add(jid)
        for col in ("queue", "pool"):
            if not (row.get(col) or "").strip():
                raise InputError(path, f"line {line}, column {col}", "is empty; it is required")
        workers = _number(path, line, "workers", row.get("workers") or "", int, 1, 1)
        gpus = _gpus(path, line, row.get("gpus") or "", workers)
        spec = JobSpec(
            id=jid,
            queue=row["queue"].strip(),
            pool=row["pool"].strip(),
            workers=workers,
            gpus=gpus,
            priority=_number(path, line, "priority", row.get("priority") or "", int, 0, -math.inf),
            preemptible=_bool(path, line, row.get("preemptible") or ""),
        )
        jobs.append(
            SimJob(
                spec,
                _number(path, line, "submit", row["submit"] or "", float, None, 0),
                _number(path, line, "duration", row["duration"] or "", float, None, 0),
            )
        )
    return jobs
