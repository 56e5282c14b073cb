"""The engine with every speed shortcut off: the rule as SCHEDULING.md states it, to check the shortcuts against.

Each shortcut the engine takes (the stuck-queue memo and its sleeping and parked queues, the cheap "nothing can
start" test, the bounds that skip a preemption walk bound to fail, the prune pass placing the job again only where
a dropped victim was, the free GPUs off the reserved nodes counted once per change) must change no decision:
tests/test_properties.py replays random worlds with Engine and with ShortcutFreeEngine and compares the event logs.
Still on here: the pass ending early once only tier 3 can start a job, and the victim-queue filters of
Preemption._victim_queues (the candidate order is the spec's). Not for production use: it is slow by design.
"""

from __future__ import annotations

from quotas.tree import Queue
from scheduler.engine.engine import Engine
from scheduler.engine.memo import Stuck
from scheduler.engine.preemption import Preemption, Victim
from scheduler.engine.state import PoolState


class PoolStateRecounted(PoolState):
    """PoolState with no memo of stuck queues (so none sleeps or is parked) and free GPUs counted afresh."""

    def remember(self, name: str, stuck: Stuck) -> None:
        pass

    def sleep(self, name: str, stuck: Stuck) -> None:
        pass

    def usable_free(self, queue: str | None) -> float:
        held_for, held, _ = self.reserved
        nodes = self.pool.nodes
        free = self.pool.free_gpus - (0 if held_for == queue else sum(len(nodes[n].free) for n in held if nodes[n].up))
        return free + self.pool.loose


class PreemptionWalked(Preemption):
    """Preemption that walks every plan to its end and prunes as the spec states it."""

    def priority_only_hopeless(self) -> bool:
        return False

    def _whole_nodes_hopeless(self) -> bool:
        return False

    def _prune(self, taken: list[Victim], nodes: list[str]) -> tuple[list[Victim], list[str]]:
        """Drop, latest first, each victim the job fits without (placing the job again after every drop)."""
        kept: list[Victim] = []
        for victim in reversed(taken):
            self._take(victim.job, -1)
            still = self.admissible()
            if still is not None:
                nodes = still
            else:
                self._take(victim.job, 1)
                kept.append(victim)
        return kept[::-1], nodes


class ShortcutFreeEngine(Engine):
    """Engine with its speed shortcuts off (see the module's docstring)."""

    pool_state = PoolStateRecounted
    planner = PreemptionWalked

    def _may_start_any(self, ps: PoolState, q: Queue) -> bool:
        return True
