"""Where a fractional GPU request goes: the rule that ranks shared GPUs with room (FGD-style, and best fit)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from scheduler.engine.model import exact

# Ranks one shared GPU for a fractional job, lowest first: (room on the GPU now, the job's fraction, the pending
# fractional sizes of the pool with their counts, the job among them) -> a sort key. Ties then go by node name and
# GPU index (Pool.pick_shared).
ShareKey = Callable[[float, float, Mapping[float, int]], tuple[float, ...]]


def fragmentation(room: float, mix: Mapping[float, int]) -> float:
    """FGD's measure for one GPU (Weng et al., USENIX ATC 2023), for fractions: the room a pending fractional job,
    drawn from `mix` by count, could not use (all of it when the job asks more than the room, none otherwise)."""
    if room <= 0 or not mix:
        return 0.0
    total = sum(mix.values())
    return room * sum(count for size, count in mix.items() if room < size) / total


def fgd_key(room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
    """Corral's rule: the shared GPU whose fragmentation for the pending mix grows least once the job takes
    `fraction` of its `room` (an exact fit lowers it most), then the least room left (best fit)."""
    left = exact(room - fraction)
    return (exact(fragmentation(left, mix) - fragmentation(room, mix)), left)


def best_fit_key(room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
    """Plain best fit (the `best-fit-fractions` baseline): the shared GPU with the least room left."""
    return (exact(room - fraction),)
