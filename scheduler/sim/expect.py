"""Checks a scenario's `expect` entries against an event log, rebuilt from the events alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scheduler.sim.inputs import World

STATES = ("running", "pending", "completed", "cancelled", "rejected", "failed")
EPS = 0.01


@dataclass
class Replay:
    """Job states after every event up to a time, and the history needed by `end` expectations."""

    state: dict[str, str] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    preemptions: Counter[str] = field(default_factory=Counter)
    nodes: dict[str, list[str]] = field(default_factory=dict)


def replay(events: list[dict[str, Any]], t: float | None) -> Replay:
    r = Replay()
    for e in events:
        if t is not None and e["t"] > t + 1e-9:
            break
        j, kind = e["job"], e["event"]
        if kind == "submitted":
            r.state[j] = "pending"
        elif kind == "started":
            r.state[j], r.start[j], r.nodes[j] = "running", e["t"], sorted(e.get("nodes", {}))
        elif kind == "preempted":
            r.state[j] = "pending"
            r.preemptions[j] += 1
        else:
            r.state[j] = kind
            if kind == "completed":
                r.finish[j] = e["t"]
    return r


def check(world: World, log: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(expectation, held, what differed) for every expected value."""
    events = sorted(log["events"], key=lambda e: e["t"])
    specs = {j.spec.id: j.spec for j in world.jobs}
    out: list[tuple[str, bool, str]] = []
    for exp in world.expect:
        t = None if exp.get("end") else float(exp["at"])
        where = "end" if t is None else f"t={exp['at']}"
        r = replay(events, t)

        def report(what: str, want: object, got: object, ok: bool, where: str = where) -> None:
            out.append((f"{where} {what}: {want}", ok, "" if ok else f"got {got}"))

        for key in STATES:
            if key in exp:
                got = sorted(j for j, s in r.state.items() if s == key)
                report(key, sorted(exp[key]), got, got == sorted(exp[key]))
        shares: dict[tuple[str, str], float] = {}
        for e in log.get("fair_share", []):
            if t is None or e["t"] <= t + 1e-9:
                shares[(e["queue"], e["pool"])] = e["value"]
        for q, pools in exp.get("fair_share", {}).items():
            for p, want in pools.items():
                got_v = shares.get((q, p), 0.0)
                report(f"fair_share {q}/{p}", want, got_v, abs(got_v - want) <= EPS)
        for q, pools in exp.get("usage", {}).items():
            for p, want in pools.items():
                used = sum(
                    s.request
                    for j, s in specs.items()
                    if r.state.get(j) == "running"
                    and s.pool == p
                    and (
                        s.queue == q or q in {a.name for a in world.tree[s.queue].path}
                        if s.queue in world.tree
                        else False
                    )
                )
                report(f"usage {q}/{p}", want, used, used == want)
        for key, got_map in (("start", r.start), ("finish", r.finish)):
            for j, want in exp.get(key, {}).items():
                got_t = got_map.get(j)
                report(f"{key} {j}", want, got_t, got_t is not None and abs(got_t - want) <= 1e-6)
        for j, want in exp.get("preemptions", {}).items():
            report(f"preemptions {j}", want, r.preemptions[j], r.preemptions[j] == want)
        for j, want in exp.get("nodes", {}).items():
            report(f"nodes {j}", sorted(want), r.nodes.get(j), r.nodes.get(j) == sorted(want))
        for j, bound in exp.get("start_by", {}).items():
            got_t = r.start.get(j)
            report(f"start_by {j}", bound, got_t, got_t is not None and got_t <= bound + 1e-6)
    return out
