"""Importers that turn public GPU-cluster traces into the trace CSV of SIMULATOR.md (`corral sim import`)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scheduler.sim.inputs import TRACE_COLUMNS, InputError, Row, read_rows

# A source row and the 1-based line of the file it came from, so errors can point at it.


class RowError(ValueError):
    """A bad source row: the line, the column and what is wrong. The file wrapper adds the path."""

    def __init__(self, line: int, column: str, what: str):
        self.line, self.column, self.what = line, column, what
        super().__init__(f"line {line}, column {column}: {what}")


@dataclass(frozen=True)
class ImportOptions:
    """Choices the source trace does not make: the pool every job asks for and the node size gangs are cut to."""

    pool: str = "philly"
    gpus_per_node: int = 8


@dataclass(frozen=True)
class TraceJob:
    """One row of the output trace CSV."""

    id: str
    submit: float
    duration: float
    queue: str
    pool: str
    workers: int
    gpus: float  # per worker: a whole number, or a fraction below 1 of one GPU for one worker (GPU sharing)
    priority: int = 0
    preemptible: bool = True

    def cells(self) -> list[str]:
        return [
            self.id,
            _fmt(self.submit),
            _fmt(self.duration),
            self.queue,
            self.pool,
            str(self.workers),
            _fmt(self.gpus),
            str(self.priority),
            "true" if self.preemptible else "false",
        ]


@dataclass(frozen=True)
class Format:
    """A source format: the columns it must have and the pure function that converts its rows."""

    columns: tuple[str, ...]
    convert: Callable[[Iterable[Row], ImportOptions], list[TraceJob]]
    description: str


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def gang(n: int, gpus_per_node: int = 8) -> tuple[int, int]:
    """(workers, gpus per worker) for a job of n GPUs, so that every worker fits one node.

    Up to a node: one worker. Larger: the fewest workers that divide n exactly with at most a node's GPUs each,
    so the GPU count (and the GPU-time) is kept exactly: 16 -> 2x8, 12 -> 2x6, 24 -> 3x8, a prime 11 -> 11x1.
    """
    if n <= gpus_per_node:
        return 1, n
    w = math.ceil(n / gpus_per_node)
    while n % w:
        w += 1
    return w, n // w


def _when(line: int, column: str, raw: str) -> float:
    """Seconds since the epoch, from either a number or an ISO 8601 date and time (naive means UTC)."""
    text = raw.strip()
    try:
        v = float(text)
    except ValueError:
        try:
            d = datetime.fromisoformat(text)
        except ValueError as err:
            raise RowError(line, column, f"{raw!r} is not a date and time (YYYY-MM-DD HH:MM:SS) nor seconds") from err
        return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(v):
        raise RowError(line, column, f"{raw!r} is not a finite number")
    return v


def _seconds(line: int, column: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError as err:
        raise RowError(line, column, f"{raw!r} is not a number") from err
    if not math.isfinite(v) or v < 0:
        raise RowError(line, column, f"{raw!r} must be a finite number of seconds >= 0")
    return v


def _count(line: int, column: str, raw: str, low: int) -> int:
    try:
        v = float(raw)
    except ValueError as err:
        raise RowError(line, column, f"{raw!r} is not a whole number") from err
    # Some exports write counts as "8.0"; accept those, not 1.5.
    if not v.is_integer() or v < low:
        raise RowError(line, column, f"{raw!r} must be a whole number >= {low}")
    return int(v)


def _finish(parsed: list[tuple[float, int, str, float, int]], opts: ImportOptions) -> list[TraceJob]:
    """Sort by submit (file order breaks ties), make submit relative to the first one, number the jobs."""
    parsed.sort(key=lambda p: (p[0], p[1]))
    t0 = parsed[0][0] if parsed else 0.0
    width = max(6, len(str(len(parsed))))
    out: list[TraceJob] = []
    for i, (t, _, queue, duration, n) in enumerate(parsed, 1):
        workers, gpus = gang(n, opts.gpus_per_node)
        out.append(TraceJob(f"p{i:0{width}d}", t - t0, duration, queue, opts.pool, workers, gpus))
    return out


def philly(rows: Iterable[Row], opts: ImportOptions) -> list[TraceJob]:
    """Microsoft Philly (timestamp,duration,num_gpus,gpu_time,cluster): one queue per virtual cluster."""
    parsed: list[tuple[float, int, str, float, int]] = []
    for line, r in rows:
        vc = (r.get("cluster") or "").strip()
        if not vc:
            raise RowError(line, "cluster", "is empty; it names the virtual cluster")
        # "vc-" keeps a hex name such as 6214e9 from reading as a number (YAML would parse 6214e9 as 6.2e12).
        parsed.append(
            (
                _when(line, "timestamp", r.get("timestamp") or ""),
                line,
                f"vc-{vc}",
                _seconds(line, "duration", r.get("duration") or ""),
                _count(line, "num_gpus", r.get("num_gpus") or "", 1),
            )
        )
    return _finish(parsed, opts)


def alibaba_gpu(rows: Iterable[Row], opts: ImportOptions) -> list[TraceJob]:
    """Alibaba's GPU-sharing trace (cluster-trace-gpu-v2023, the FGD paper's: openb_pod_list_*.csv).

    One job a task that asks for GPUs and was scheduled: `num_gpu` whole GPUs, or, for a task sharing one GPU
    (`num_gpu` 1, `gpu_milli` below 1000), gpu_milli / 1000 of it. It runs from `scheduled_time` to
    `deletion_time` and is submitted at `creation_time`; one queue per QoS class (`qos-ls`, `qos-be`, ...).
    CPU-only tasks (`num_gpu` 0) and tasks never scheduled (`scheduled_time` empty) are left out."""
    parsed: list[tuple[float, int, str, float, float]] = []  # (submit, line, queue, duration, GPUs)
    for line, r in rows:
        n = _count(line, "num_gpu", r.get("num_gpu") or "", 0)
        scheduled = (r.get("scheduled_time") or "").strip()
        if n == 0 or not scheduled:
            continue
        milli = _count(line, "gpu_milli", r.get("gpu_milli") or "1000", 0)
        if n == 1 and not 0 < milli <= 1000:
            raise RowError(line, "gpu_milli", f"{milli} must be from 1 to 1000 (thousandths of one GPU)")
        created = _seconds(line, "creation_time", r.get("creation_time") or "")
        start = _seconds(line, "scheduled_time", scheduled)
        end = _seconds(line, "deletion_time", r.get("deletion_time") or "")
        if end < start:
            raise RowError(line, "deletion_time", f"{end:g} is before scheduled_time {start:g}")
        qos = (r.get("qos") or "").strip().lower() or "none"
        parsed.append((created, line, f"qos-{qos}", end - start, milli / 1000 if n == 1 and milli < 1000 else n))
    parsed.sort(key=lambda p: (p[0], p[1]))
    t0 = parsed[0][0] if parsed else 0.0
    width = max(6, len(str(len(parsed))))
    out: list[TraceJob] = []
    for i, (t, _, queue, duration, gpus) in enumerate(parsed, 1):
        workers, per = (1, gpus) if gpus < 1 else gang(int(gpus), opts.gpus_per_node)
        out.append(TraceJob(f"a{i:0{width}d}", t - t0, duration, queue, opts.pool, workers, per))
    return out


# FORMAT -> how to read it. Helios and Alibaba PAI join here with their own columns and converter.
FORMATS: dict[str, Format] = {
    "philly": Format(
        ("timestamp", "duration", "num_gpus", "cluster"),
        philly,
        "Microsoft Philly, as processed in the Pollux artifact",
    ),
    "alibaba-gpu": Format(
        ("num_gpu", "gpu_milli", "qos", "creation_time", "deletion_time", "scheduled_time"),
        alibaba_gpu,
        "Alibaba cluster-trace-gpu-v2023 (openb_pod_list_*.csv, the FGD paper's GPU-sharing trace)",
    ),
}


def import_trace(fmt: str, src: str | Path, opts: ImportOptions) -> list[TraceJob]:
    """Read a source trace of format `fmt` (a key of FORMATS); bad input raises InputError naming file and line."""
    path = Path(src)
    spec = FORMATS[fmt]
    try:
        return spec.convert(read_rows(path, spec.columns), opts)
    except RowError as err:
        raise InputError(path, f"line {err.line}, column {err.column}", err.what) from err


def write_trace(jobs: Iterable[TraceJob], dest: str | Path) -> int:
    """Write the trace CSV of SIMULATOR.md; returns the number of jobs written."""
    n = 0
    with Path(dest).open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TRACE_COLUMNS)
        for j in jobs:
            w.writerow(j.cells())
            n += 1
    return n
