"""Where a fractional GPU request goes: the rule that ranks shared GPUs with room (FGD-style, and best fit)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from scheduler.engine.model import exact

# Ranks one shared GPU for a fractional job, lowest first: (room on the GPU now, the job's fraction, the pending
# fractional sizes of the pool with their counts, the job among them) -> a sort key. Ties then go by node name and
# GPU index (Pool.pick_shared).
ShareKey = Callable[[float, float, Mapping[float, int]], tuple[float, ...]]


def fragmentation(room: float, mix: Mapping[float, int], placed: float | None = None) -> float:
    """FGD's measure for one GPU (Weng et al., USENIX ATC 2023), for fractions: the room a pending fractional job,
    drawn from `mix` by count (less one job of size `placed`: the one being placed, which will not wait), could
    not use (all of it when the job asks more than the room, none otherwise)."""
    if room <= 0:
        return 0.0
    total = unusable = 0
    for size, count in mix.items():
        if size == placed:
            count -= 1
        total += count
        if room < size:
            unusable += count
    return room * unusable / total if total > 0 else 0.0


def fgd_key(room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
    """Corral's rule: the shared GPU whose fragmentation for the other pending fractions grows least once the job
    takes `fraction` of its `room`, then the least room left (best fit)."""
    left = exact(room - fraction)
    return (exact(fragmentation(left, mix, fraction) - fragmentation(room, mix, fraction)), left)


def best_fit_key(room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
    """Plain best fit (the `best-fit-fractions` baseline): the shared GPU with the least room left."""
    return (exact(room - fraction),)
