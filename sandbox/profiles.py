"""Sandbox profiles ("1 x H100", "1/4 H100", "1g.10gb MIG", "CPU only"): what users may pick, per hub group.

A profile's `gpus` is whole GPUs or a share of one GPU below 1 (0.25: a quarter, sharing its GPU with other
notebooks, each within its share of the memory); `mig` asks for one MIG slice of that profile instead."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.engine.model import check_gpus, mig_fraction

DEFAULT = {"name": "cpu", "display": "CPU only", "gpus": 0}


@dataclass(frozen=True)
class Profile:
    """One sandbox shape. `groups` empty: open to everyone; else only to members of one of them."""

    name: str
    display: str
    gpus: float = 0  # whole GPUs, or a share of one in (0, 1)
    cpus: float = 0.0
    memory_gb: float = 0.0
    idle_timeout_s: float | None = None  # the idle-GPU culler's timeout for this profile (None: the default)
    groups: frozenset[str] = field(default_factory=frozenset)
    mig: str | None = None  # one MIG slice of this profile ("1g.10gb") in place of `gpus`


def parse_profiles(raw: Iterable[Mapping[str, Any]]) -> list[Profile]:
    """Profiles from the spawner's config; a clear ValueError names the bad entry."""
    out: list[Profile] = []
    for i, p in enumerate(list(raw) or [DEFAULT]):
        unknown = set(p) - {"name", "display", "gpus", "cpus", "memory_gb", "idle_timeout_s", "groups", "mig"}
        if unknown or not p.get("name"):
            raise ValueError(f"CorralSpawner.profiles[{i}]: needs a name; unknown keys: {sorted(unknown)}")
        where = f"CorralSpawner.profiles[{i}] ({p['name']})"
        mig = p.get("mig")
        if isinstance(p.get("gpus"), int | float) and p["gpus"] < 0:
            raise ValueError(f"{where}: gpus must be >= 0, got {p['gpus']}")
        try:
            if mig is not None and "gpus" in p:
                raise ValueError(f"{where}: give gpus or mig, not both (a MIG slice is its own GPU share)")
            gpus = mig_fraction(str(mig)) if mig is not None else check_gpus(p.get("gpus", 0), 1, where)
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
        timeout = p.get("idle_timeout_s")
        out.append(
            Profile(
                str(p["name"]),
                str(p.get("display", p["name"])),
                gpus,
                float(p.get("cpus", 0)),
                float(p.get("memory_gb", 0)),
                None if timeout is None else float(timeout),
                frozenset(p.get("groups", ())),
                None if mig is None else str(mig),
            )
        )
    return out


def allowed(profiles: Iterable[Profile], groups: Iterable[str]) -> list[Profile]:
    mine = set(groups)
    return [p for p in profiles if not p.groups or p.groups & mine]
