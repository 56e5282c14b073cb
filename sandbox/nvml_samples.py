"""GPU samples for the idle-GPU culler: read live through NVML, or replayed from a recorded NVML trace.

`read_samples` is what the scheduling loop calls each tick; `load_trace` reads the trace files in
shared/fixtures/gpu/*/nvml_*trace.json so that tests replay what real H100/H200s reported.

Per-process readings: `nvmlDeviceGetComputeRunningProcesses` gives each process's memory, and
`nvmlDeviceGetProcessUtilization` its SM utilisation. NVML lists a process there only if it ran kernels in the
recent sample period, and answers "Not Found" when none did, so an absent process reads 0 %. Where the call is
not supported, processes carry no utilisation and the culler falls back to the whole GPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sandbox.culling import GpuSample, ProcSample
from scheduler.backends.gpus import nvml_session

try:
    # nvidia-ml-py ships no type information; `unused-ignore` keeps mypy quiet should an override appear later.
    import pynvml  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # without nvidia-ml-py there is nothing to sample, and the culler is simply not fed
    pynvml = None

log = logging.getLogger(__name__)


def _process_util(handle: Any, since_us: int) -> dict[int, float] | None:
    """pid -> latest SM utilisation % since `since_us`; {} when no process ran kernels; None when unsupported."""
    try:
        entries = pynvml.nvmlDeviceGetProcessUtilization(handle, since_us)
    except pynvml.NVMLError_NotFound:  # no process has had a sample since then: all of them sat idle
        return {}
    except pynvml.NVMLError as err:
        log.debug("no per-process utilisation: %s", err)
        return None
    latest: dict[int, tuple[int, float]] = {}
    for e in entries:
        # NVML may return several samples of one process from its ring buffer; the newest one describes it now.
        if e.pid not in latest or e.timeStamp >= latest[e.pid][0]:
            latest[e.pid] = (int(e.timeStamp), float(e.smUtil))
    return {pid: util for pid, (_ts, util) in latest.items()}


def _procs(handle: Any, since_us: int) -> tuple[ProcSample, ...] | None:
    try:
        running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError as err:  # e.g. no permission to list other users' processes
        log.debug("no process list: %s", err)
        return None
    utils = _process_util(handle, since_us)
    return tuple(
        ProcSample(
            pid=int(p.pid),
            # usedGpuMemory is None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE), e.g. under WDDM.
            used_memory_bytes=int(p.usedGpuMemory or 0),
            sm_util_pct=None if utils is None else utils.get(int(p.pid), 0.0),
        )
        for p in running
    )


def read_samples(indices: Iterable[int] | None = None, window_s: float = 1.0) -> dict[int, GpuSample] | None:
    """GPU index -> sample now, for `indices` (None: every GPU); None without NVML.

    `window_s`: how far back per-process utilisation may reach, matching the device reading's own period.
    A GPU that cannot report utilisation (MIG mode answers "Not Supported") is left out: the culler reads a
    missing GPU as not idle rather than guess.
    """
    with nvml_session(pynvml) as ok:
        if not ok:
            return None
        wanted = range(pynvml.nvmlDeviceGetCount()) if indices is None else indices
        since_us = int((time.time() - window_s) * 1e6)  # NVML stamps process samples in CPU wall-clock µs
        samples: dict[int, GpuSample] = {}
        for index in wanted:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except pynvml.NVMLError as err:
                log.debug("no utilisation for GPU %d: %s", index, err)
                continue
            samples[index] = GpuSample(util, used, _procs(handle, since_us))
        return samples


def _trace_procs(raw: dict[str, Any]) -> tuple[ProcSample, ...] | None:
    if "compute_procs" in raw:  # the two-process format: dicts, with a separate per-process utilisation
        util = raw.get("process_util")
        if isinstance(util, list):
            sm: dict[int, float] | None = {int(u["pid"]): float(u["sm"]) for u in util}
        else:  # "error: Not Found" means no process had samples yet; other errors mean no per-process data
            sm = {} if isinstance(util, str) and "Not Found" in util else None
        return tuple(
            ProcSample(int(p["pid"]), int(p["used_memory"]), None if sm is None else sm.get(int(p["pid"]), 0.0))
            for p in raw["compute_procs"]
        )
    procs = raw.get("procs")
    if not isinstance(procs, list):
        return None
    return tuple(ProcSample(int(pid), int(mem)) for pid, mem in procs)  # [pid, bytes] pairs, no utilisation


def load_trace(path: str | Path) -> list[tuple[float, str, GpuSample]]:
    """(t seconds, phase, sample) per recorded sample; phase is "" where the trace does not tag one."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    raw_samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(raw_samples, list):
        raise ValueError(f"{path}: no 'samples' list; is this an NVML trace?")
    return [
        (float(s["t"]), str(s.get("phase", "")), GpuSample(float(s["gpu_util"]), int(s["mem_used"]), _trace_procs(s)))
        for s in raw_samples
    ]
