"""The order in which one admission pass reads a pool's leaf queues: lowest ratio first, visiting only the awake.

A pass reads queues by key (ratio, then usage/quota, then name; keys frozen during the pass) from three
sources merged: the awake queues (PoolState.awake), the parked queues that an event woke during or before the
pass (`_woken`), and queues whose key changed in the pass (they started a job or lost one), which come back
through a small heap with their new key (`_heap`, versioned, since a queue may change again). Parked queues that
stay asleep are never read: the pass behaves as if it had passed each of them by, as ReferenceEngine does one by
one, so the order remembers how far it has reached (`high`) to answer which of them it has passed.
"""

from __future__ import annotations

import heapq
import math

from scheduler.engine.state import Entry, PoolState, QueueKey

ONE: Entry = ((1.0, -math.inf, ""), "")  # below every entry of a queue at or over its fair share (ratio 1)


class PassOrder:
    """One pass's queue order over a frozen PoolState."""

    def __init__(self, ps: PoolState) -> None:
        self.ps = ps
        self._cursor = iter(ps.awake)
        self._awake: Entry | None = next(self._cursor, None)
        self.moved: dict[str, int] = {}  # queue -> version of its entry in `_heap`; -1: read, nothing started
        self._heap: list[tuple[QueueKey, int, str]] = []
        self.high: Entry | None = None  # the highest entry read: parked queues below it were passed by
        # Queues read in this pass: a parked one that was woken and read is no longer "passed by" (its parked mark
        # is stale until the pass ends), even where it started its last pending job and so left no mark in `moved`.
        self._read: set[str] = set()
        self._woken = ps.parked_fitting(None) + [ps.entry(n) for n in ps.woken if n in ps.pending]
        heapq.heapify(self._woken)
        ps.woken.clear()
        self._waking = {n for _, n in self._woken}  # each parked queue is read once, at its place
        self._seen = ps.grown  # room given back as of the last look for parked queues it may fit

    def pop(self) -> Entry | None:
        """The next queue to read, or None at the end. Call reach() with it before reading it."""
        moved, woken = self.moved, self._woken
        while self._awake is not None and self._awake[1] in moved:
            self._awake = next(self._cursor, None)
        while woken and woken[0][1] in moved:
            heapq.heappop(woken)
        heap = self._heap
        while heap and moved.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        awake = self._awake
        from_awake = awake is not None and (not woken or awake < woken[0])
        nxt = awake if from_awake else (woken[0] if woken else None)
        if heap and (nxt is None or heap[0][0] < nxt[0]):
            key, _, name = heapq.heappop(heap)
            return key, name
        if nxt is not None:
            if from_awake:
                self._awake = next(self._cursor, None)
            else:
                heapq.heappop(woken)
        return nxt

    def passes_parked(self, upto: Entry | None) -> bool:
        """Would the pass, on its way to `upto` (None: the end), pass by a parked queue at or over its fair share?"""
        return self.ps.parked_between(max(self.high, ONE) if self.high is not None else ONE, upto, self.moved)

    def reach(self, entry: Entry) -> None:
        self._read.add(entry[1])
        if self.high is None or entry > self.high:
            self.high = entry

    def skip(self, name: str) -> None:
        """The queue was read and starts nothing more in this pass."""
        self.moved[name] = -1

    def read(self, name: str) -> bool:
        """Has the queue been read in this pass (started something or not)?"""
        return name in self.moved

    def changed(self, names: set[str]) -> None:
        """These queues started a job or lost one: those not done with this pass come back with their new key; then
        parked queues that this start woke, or that room given back may now fit, join at their place."""
        ps, moved = self.ps, self.moved
        for name in names:
            if (
                moved.get(name) == -1
                or name not in ps.pending
                or (name not in moved and name not in self._read and ps.visited_parked(name, self.high))
            ):
                continue
            moved[name] = moved.get(name, 0) + 1
            heapq.heappush(self._heap, (ps.queue_key(ps.tree[name]), moved[name], name))
        wake = [ps.entry(n) for n in ps.woken if n in ps.pending]
        ps.woken.clear()
        if ps.grown != self._seen:
            self._seen = ps.grown
            wake += ps.parked_fitting(self.high)
        high = self.high
        for w in wake:
            if w[1] not in moved and w[1] not in self._waking and (high is None or w > high):
                self._waking.add(w[1])
                heapq.heappush(self._woken, w)
