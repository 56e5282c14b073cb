"""MIG as a GPU's admin laid it out: profile names, the layout read from NVML or nvidia-smi, never changed here.

A MIG-enabled GPU (A100, H100, H200) is cut into GPU instances of fixed profiles ("1g.10gb": one of seven compute
slices and about 10 GB of memory). Corral reads the instances that exist and schedules them by profile; it never
switches a GPU's MIG mode or creates or destroys instances (that needs a GPU reset and root, and a lent GPU's mode
is its owner's). Every call below is a read: nvmlDeviceGetMigMode, nvmlDeviceGetMigDeviceHandleByIndex, and the
UUID, name and memory of each instance; nvidia-smi -L and nvidia-smi mig -lgip are parsed from their text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from scheduler.backends.base import MigDevice

log = logging.getLogger(__name__)

_MIB = 1 << 20
# <compute slices>g.<memory>gb, with an optional "+me" (the instance owns the media engines), as NVIDIA names them.
_PROFILE = re.compile(r"(?P<slices>[1-9])g\.(?P<memory>[1-9][0-9]{0,3})gb(?P<extra>\+me)?")
COMPUTE_SLICES = 7  # every MIG GPU so far (A30: 4, named 1g.6gb...4g.24gb) has seven; a profile uses 1-4 or 7
VALID_SLICES = (1, 2, 3, 4, 7)
_SMI_GPU = re.compile(r"^GPU (?P<index>\d+): (?P<name>.+?) \(UUID: (?P<uuid>GPU-[0-9a-fA-F-]+)\)\s*$")
_SMI_MIG = re.compile(r"^\s+MIG (?P<profile>\S+)\s+Device\s+(?P<n>\d+): \(UUID: (?P<uuid>MIG-[0-9a-fA-F/-]+)\)\s*$")
_LGIP = re.compile(
    r"^\|\s+(?P<gpu>\d+)\s+MIG (?P<name>\S+)\s+(?P<id>\d+)\s+(?P<free>\d+)/(?P<total>\d+)\s+(?P<gib>[\d.]+)\s"
)


def check_profile(text: str) -> str:
    """`text` if it names a MIG profile ("1g.10gb", "3g.40gb", "1g.10gb+me"); else ValueError saying why."""
    m = _PROFILE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"MIG profile {str(text)[:40]!r} is not a profile name: <compute slices>g.<memory>gb, e.g. 1g.10gb"
        )
    if int(m["slices"]) not in VALID_SLICES:
        raise ValueError(
            f"MIG profile {text!r}: no MIG GPU has a {m['slices']}-slice profile (1, 2, 3, 4 or 7 compute slices)"
        )
    return text.strip()


def slices(profile: str) -> int:
    """Compute slices of a profile: 1 for 1g.10gb, 7 for 7g.80gb."""
    return int(check_profile(profile).split("g.", 1)[0])


def profile_of(device_name: str) -> str | None:
    """The profile in an instance's NVML name ("NVIDIA H100 80GB HBM3 MIG 1g.10gb" -> "1g.10gb"); None if none."""
    head, sep, tail = device_name.rpartition("MIG ")
    if not sep:
        return None
    try:
        return check_profile(tail.split()[0]) if tail.split() else None
    except ValueError:
        return None


@dataclass(frozen=True)
class GpuProfile:
    """A profile a GPU can be cut into (nvidia-smi mig -lgip): its id, how many fit, their memory."""

    name: str
    id: int
    instances: int
    memory_gib: float


def parse_lgip(text: str) -> dict[int, list[GpuProfile]]:
    """GPU index -> its GPU-instance profiles, from `nvidia-smi mig -lgip` (lines of other commands are skipped,
    so the fixture's topo-mig.txt, `topo -m` then `mig -lgip`, reads as is)."""
    out: dict[int, list[GpuProfile]] = {}
    for line in text.splitlines():
        m = _LGIP.match(line)
        if m is not None:
            out.setdefault(int(m["gpu"]), []).append(
                GpuProfile(m["name"], int(m["id"]), int(m["total"]), float(m["gib"]))
            )
    return out


def parse_smi_list(text: str) -> dict[int, list[MigDevice]]:
    """GPU index -> its MIG instances, from `nvidia-smi -L` (a GPU without MIG maps to [])."""
    out: dict[int, list[MigDevice]] = {}
    gpu: int | None = None
    for line in text.splitlines():
        if (g := _SMI_GPU.match(line)) is not None:
            gpu = int(g["index"])
            out[gpu] = []
        elif (m := _SMI_MIG.match(line)) is not None:
            if gpu is None:
                raise ValueError(f"nvidia-smi -L: MIG line before any GPU line: {line.strip()!r}")
            out[gpu].append(MigDevice(m["uuid"], check_profile(m["profile"])))
    return out


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def discover_instances(lib: Any, handle: Any) -> tuple[MigDevice, ...]:
    """The MIG instances of one GPU in MIG mode, through NVML (`lib` is the pynvml module; reads only)."""
    found: list[MigDevice] = []
    try:
        count = int(lib.nvmlDeviceGetMaxMigDeviceCount(handle))
    except AttributeError:  # an nvidia-ml-py older than MIG (before 11): the GPU offers nothing, not a crash
        log.warning("this nvidia-ml-py cannot list MIG instances: the MIG GPU is left out")
        return ()
    except lib.NVMLError as err:
        log.warning("MIG GPU without a readable instance count: %s", err)
        return ()
    for i in range(count):
        try:
            mig = lib.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except lib.NVMLError:  # an empty slot: instances need not be numbered densely
            continue
        try:
            name, uuid = _text(lib.nvmlDeviceGetName(mig)), _text(lib.nvmlDeviceGetUUID(mig))
            memory = int(lib.nvmlDeviceGetMemoryInfo(mig).total) // _MIB
        except lib.NVMLError as err:
            log.warning("skipping MIG instance %d: NVML error %s", i, err)
            continue
        profile = profile_of(name)
        if profile is None:
            log.warning("skipping MIG instance %s: no profile in its name %r", uuid, name)
            continue
        found.append(MigDevice(uuid, profile, memory))
    return tuple(found)
