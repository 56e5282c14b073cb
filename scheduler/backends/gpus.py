"""Which GPUs this machine has: read live through NVML, declared by hand, or parsed from a saved NVML inventory.

Memory is reported in MiB (what nvidia-smi prints as "MiB"), so an H100 80GB reads 81559, as in nvidia-smi.
GPU indices are NVML's, which follow PCI bus order; the local executor sets CUDA_DEVICE_ORDER=PCI_BUS_ID so
that CUDA numbers the GPUs the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scheduler.backends import mig
from scheduler.backends.base import GPUInfo, MigDevice

try:
    # nvidia-ml-py ships no type information; `unused-ignore` keeps mypy quiet should an override appear later.
    import pynvml  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # a machine without nvidia-ml-py is a machine without discoverable GPUs
    pynvml = None

log = logging.getLogger(__name__)

_MIB = 1 << 20


@dataclass(frozen=True)
class GpuSource:
    """The GPUs of this node and where that knowledge came from (shown to users, so `declared` is visible)."""

    kind: Literal["nvml", "declared", "inventory", "none"]
    gpus: list[GPUInfo]


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returned bytes before version 11.x and str since; accept both.
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def nvml_session(lib: Any) -> Iterator[bool]:
    """NVML (the `pynvml` module `lib`, or None) initialised for the block (yields True), or False when the
    library or driver is missing. Callers pass their own module reference, so tests can replace it."""
    if lib is None:
        yield False
        return
    try:
        lib.nvmlInit()
    except lib.NVMLError as err:  # no libnvidia-ml.so, no driver, or no permission: no GPUs we can see
        log.debug("NVML unavailable: %s", err)
        yield False
        return
    try:
        yield True
    finally:
        lib.nvmlShutdown()


def _mig_current(handle: Any) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # GPUs without MIG answer "Not Supported"
        return False
    return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)


def discover_nvml() -> list[GPUInfo] | None:
    """This machine's GPUs as NVML sees them; None when NVML is not installed or cannot initialise."""
    with nvml_session(pynvml) as ok:
        if not ok:
            return None
        gpus: list[GPUInfo] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                mig_mode = _mig_current(handle)
                gpus.append(
                    GPUInfo(
                        index=index,
                        model=_text(pynvml.nvmlDeviceGetName(handle)),
                        memory_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // _MIB,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        mig_mode=mig_mode,
                        # As the admin laid it out: read, never changed (scheduler/backends/mig.py).
                        mig=mig.discover_instances(pynvml, handle) if mig_mode else (),
                    )
                )
            except pynvml.NVMLError as err:
                # A GPU that fell off the bus must not be scheduled, but it should not hide the healthy ones.
                log.warning("skipping GPU %d: NVML error %s", index, err)
        return gpus


def declared(count: int, model: str, memory_mb: int = 0) -> list[GPUInfo]:
    """GPUs taken on trust, for machines without them (`--gpus 8 --gpu-model virtual`) or without NVML."""
    if count < 0:
        raise ValueError(f"GPU count must be 0 or more, got {count}")
    if not model.strip():
        raise ValueError("a declared GPU needs a model name (e.g. --gpu-model virtual)")
    if memory_mb < 0:
        raise ValueError(f"GPU memory must be 0 or more MiB, got {memory_mb}")
    return [GPUInfo(index=i, model=model.strip(), memory_mb=memory_mb) for i in range(count)]


def _inventory_device(raw: dict[str, Any], position: int) -> GPUInfo:
    # Calls the driver refused are stored as "error: ..." strings; read them as "unknown".
    def ok(value: Any) -> bool:
        return not (isinstance(value, str) and value.startswith("error:"))

    name, uuid, memory, mode = raw.get("name"), raw.get("uuid"), raw.get("memory_total"), raw.get("mig_mode")
    if not isinstance(name, str) or not ok(name):
        raise ValueError(f"device {position}: no readable name ({name!r})")
    index = raw.get("index", position)
    return GPUInfo(
        index=int(index),
        model=name,
        memory_mb=int(memory) // _MIB if isinstance(memory, int) else 0,
        uuid=uuid if isinstance(uuid, str) and ok(uuid) else None,
        # [current, pending]: a pending change only takes effect after a GPU reset, so only `current` counts.
        mig_mode=(on := isinstance(mode, list) and bool(mode) and mode[0] == 1),
        mig=_inventory_instances(raw.get("mig_devices"), position) if on else (),
    )


def _inventory_instances(raw: Any, position: int) -> tuple[MigDevice, ...]:
    """A MIG GPU's instances in an inventory: [{"uuid", "name" or "profile", "memory_total"}] (absent: none)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"device {position}: mig_devices is not a list")
    out = []
    for i, d in enumerate(raw):
        profile = d.get("profile") or mig.profile_of(str(d.get("name", ""))) if isinstance(d, dict) else None
        if not isinstance(d, dict) or not isinstance(d.get("uuid"), str) or not profile:
            raise ValueError(f"device {position}: mig_devices[{i}] needs a uuid and a profile (or a MIG name)")
        memory = d.get("memory_total")
        out.append(MigDevice(d["uuid"], mig.check_profile(profile), memory // _MIB if isinstance(memory, int) else 0))
    return tuple(out)


def from_inventory(path: str | Path) -> list[GPUInfo]:
    """GPUs from an NVML inventory JSON (the format of shared/fixtures/gpu/*/nvml_inventory.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise ValueError(f"{path}: no 'devices' list; is this an NVML inventory?")
    return [_inventory_device(raw, i) for i, raw in enumerate(devices) if isinstance(raw, dict)]


def detect(count: int | None = None, model: str | None = None, memory_mb: int = 0) -> GpuSource:
    """What the server should schedule on: declared GPUs when given, else NVML's, else none."""
    if model is not None and count is None:
        raise ValueError("a declared GPU model needs a GPU count (--gpus N)")
    if count is not None:
        return GpuSource("declared", declared(count, model or "", memory_mb))
    found = discover_nvml()
    return GpuSource("nvml", found) if found is not None else GpuSource("none", [])
