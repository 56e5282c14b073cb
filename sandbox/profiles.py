"""Sandbox profiles ("1 x H100", "CPU only"): what users may pick, restricted per hub group."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT = {"name": "cpu", "display": "CPU only", "gpus": 0}


@dataclass(frozen=True)
class Profile:
    """One sandbox shape. `groups` empty: open to everyone; else only to members of one of them."""

    name: str
    display: str
    gpus: int = 0
    cpus: float = 0.0
    memory_gb: float = 0.0
    idle_timeout_s: float | None = None  # the idle-GPU culler's timeout for this profile (None: the default)
    groups: frozenset[str] = field(default_factory=frozenset)


def parse_profiles(raw: Iterable[Mapping[str, Any]]) -> list[Profile]:
    """Profiles from the spawner's config; a clear ValueError names the bad entry."""
    out: list[Profile] = []
    for i, p in enumerate(list(raw) or [DEFAULT]):
        unknown = set(p) - {"name", "display", "gpus", "cpus", "memory_gb", "idle_timeout_s", "groups"}
        if unknown or not p.get("name"):
            raise ValueError(f"CorralSpawner.profiles[{i}]: needs a name; unknown keys: {sorted(unknown)}")
        gpus = int(p.get("gpus", 0))
        if gpus < 0:
            raise ValueError(f"CorralSpawner.profiles[{i}] ({p['name']}): gpus must be >= 0, got {gpus}")
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
            )
        )
    return out


def allowed(profiles: Iterable[Profile], groups: Iterable[str]) -> list[Profile]:
    mine = set(groups)
    return [p for p in profiles if not p.groups or p.groups & mine]
