"""The simulator: replays jobs and cluster events against a policy on a virtual clock, writing the event log."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from scheduler.engine import Preempted, Rejected, Started
from scheduler.engine.baselines import make_policy
from scheduler.engine.engine import Engine
from scheduler.sim.inputs import SimJob, World

# At one instant: completions and node events, then cancellations, then submissions, then timer wakeups
# (SCHEDULING.md, Simulation clock); the engine's admission pass runs after all of them.
COMPLETION, NODE, CANCEL, SUBMIT, WAKEUP = range(5)

# A heap entry: (instant, phase, order, what). (instant, phase, order) is unique, so `what` is never compared:
# a completion's order is the engine's admission counter at the start it ends, a submission's its index in the
# world's jobs, a node event's or cancellation's its index in the world's events, and one wakeup per instant.
Entry = tuple[float, int, int, Any]


def _num(t: float) -> float | int:
    return int(t) if float(t).is_integer() else t


@dataclass(slots=True)
class _Live:
    job: SimJob
    remaining: float
    token: int = 0  # bumps at every start, so a stale completion of an earlier run is ignored
    started_at: float = 0.0


class Simulation:
    """One replay of a world under one policy; `run()` returns the event log of SIMULATOR.md.

    The loop runs once per event of a replay of up to hundreds of thousands of jobs: it keeps its work per event
    small (no strings built and parsed for completions, the instant's log value computed once, log entries built
    in place); the log itself is as SIMULATOR.md writes it, key order included.
    """

    def __init__(
        self, world: World, policy: str = "corral", log_fair_share: bool = True, engine_type: type[Engine] | None = None
    ):
        """`engine_type`: replay with this Engine class instead of the policy's (the slow engines the fast one is
        checked against: ReferenceEngine, ShortcutFreeEngine)."""
        self.world = world
        self.policy_name = policy
        self.engine = (
            engine_type(world.tree, world.nodes, world.domains, world.settings)
            if engine_type is not None
            else make_policy(policy, world.tree, world.nodes, world.domains, world.settings)
        )
        if hasattr(self.engine, "holds"):
            # The engine records starvation-guard holds only into a list it is given (the live service gives none:
            # it would grow without end); the report counts them (scheduler.sim.waste). setattr: policies without
            # the attribute exist, and this must type-check against an engine that has none.
            setattr(self.engine, "holds", [])  # noqa: B010
        self.log_fair_share = log_fair_share
        self.events: list[dict[str, Any]] = []
        self.fair_share: list[dict[str, Any]] = []
        self._live = {j.spec.id: _Live(j, j.duration) for j in world.jobs}
        self._heap: list[Entry] = []
        self._last_shares: dict[str, Any] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self._cancelled_early: set[str] = set()
        self._tn: float | int = 0  # the instant being replayed, as the log writes it (set once per instant)

    @property
    def holds(self) -> list[Any] | None:
        """The starvation guard's Hold records of this run; None where the policy records none."""
        holds: list[Any] | None = getattr(self.engine, "holds", None)
        return holds

    def run(self) -> dict[str, Any]:
        heap = self._heap
        heap.extend((j.submit, SUBMIT, i, j.spec.id) for i, j in enumerate(self.world.jobs))
        heap.extend((e.at, CANCEL if e.cancel is not None else NODE, i, None) for i, e in enumerate(self.world.events))
        heapq.heapify(heap)  # the same pops as pushing one by one: the entries' order is total
        self._log_shares(0.0, force=True)
        wakeups: set[float] = set()
        heappop, handle, decided = heapq.heappop, self._handle, self._decided
        while heap:
            t = heap[0][0]
            self._tn = _num(t)
            while heap and heap[0][0] == t:
                _, phase, order, ref = heappop(heap)
                handle(t, phase, order, ref)
            engine = self.engine
            for d in engine.schedule(t):
                decided(t, d)
            if self.log_fair_share:
                self._log_shares(t)
            w = engine.next_wakeup(t)
            if w is not None and w not in wakeups:
                wakeups.add(w)
                heapq.heappush(heap, (w, WAKEUP, 0, None))
        return {"policy": self.policy_name, "events": self.events, "fair_share": self.fair_share}

    def _handle(self, t: float, phase: int, order: int, ref: Any) -> None:
        if phase == SUBMIT:
            if ref in self._cancelled_early:
                return
            spec = self._live[ref].job.spec
            decisions = self.engine.submit(spec, t)
            if not decisions:
                self.events.append({"t": self._tn, "event": "submitted", "job": ref, "queue": spec.queue})
            for d in decisions:
                self._decided(t, d)
        elif phase == COMPLETION:
            job_id, token, failed = ref
            if token == self._live[job_id].token and self.engine.finish(job_id, t, failed=failed):
                if failed:
                    self.events.append({"t": self._tn, "event": "failed", "job": job_id, "reason": "max_runtime"})
                else:
                    self.events.append({"t": self._tn, "event": "completed", "job": job_id})
        elif phase == NODE:
            e = self.world.events[order]
            if e.node_down is not None:
                for d in self.engine.node_down(e.node_down, t):
                    self._decided(t, d)
            elif e.node_up is not None:
                self.engine.node_up(e.node_up, t)
        elif phase == CANCEL:
            cancel = self.world.events[order].cancel
            assert cancel is not None
            if cancel not in self.engine.jobs:
                if cancel not in self._cancelled_early:
                    self._cancelled_early.add(cancel)
                    self._log(t, "cancelled", cancel, reason="cancelled before its submission")
            elif self.engine.cancel(cancel, t):
                self._log(t, "cancelled", cancel)

    def _decided(self, t: float, d: Started | Preempted | Rejected) -> None:
        if isinstance(d, Started):
            live = self._live[d.job]
            live.token += 1
            live.started_at = t
            run = live.remaining
            limit = live.job.max_runtime
            failed = limit is not None and limit < run
            end = t + (limit if failed and limit is not None else run)
            heapq.heappush(self._heap, (end, COMPLETION, self.engine.jobs[d.job].admitted, (d.job, live.token, failed)))
            entry = {"t": self._tn, "event": "started", "job": d.job, "nodes": d.placement}
            spec = live.job.spec
            if spec.shared:  # GPU sharing: what the job holds of the GPU it lists (or its MIG slice's profile)
                entry["fraction"] = spec.gpus
                if spec.mig is not None:
                    entry["mig"] = spec.mig
            self.events.append(entry)
        elif isinstance(d, Preempted):
            live = self._live[d.job]
            live.token += 1
            if live.job.spec.checkpoint:
                live.remaining = max(0.0, live.remaining - (t - live.started_at))
            else:
                live.remaining = live.job.duration
            extra = {"by": d.by} if d.by else {}
            self._log(t, "preempted", d.job, reason=d.cause, **extra, detail=d.reason.message)
        else:
            job = self._live[d.job].job
            self._log(t, "rejected", d.job, queue=job.spec.queue, reason=d.reason.message)

    def _log(self, t: float, event: str, job: str, **extra: Any) -> None:
        self.events.append({"t": self._tn, "event": event, "job": job, **extra})

    def _log_shares(self, t: float, force: bool = False) -> None:
        if not (self.log_fair_share or force):
            return
        for pool in self.engine.pools:
            shares = self.engine.shares(pool)
            if shares is self._last_shares.get(pool) and not force:
                continue
            self._last_shares[pool] = shares
            for q in self.world.tree.leaves:
                v = float(shares.get(q.name, 0.0))
                key = (q.name, pool)
                if force or abs(self._logged.get(key, 0.0) - v) > 1e-9:
                    self._logged[key] = v
                    self.fair_share.append({"t": _num(t), "queue": q.name, "pool": pool, "value": round(v, 6)})
