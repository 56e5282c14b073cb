"""Restart equivalence (issue 20): a service restarted at random points decides exactly as its twin that never was.

The service (Core, over SQLite) runs a scripted executor that outlives it (tests/restart_kit.DurableExecutor) and an
injected clock. A random sequence of steps drives two services alike: submissions (gangs, priorities,
non-preemptible jobs, max_runtime), exits, cancellations, nodes going down and up, queue-tree applies and clock
advances past min_runtime and the starvation timeout. After each step both run one scheduling cycle. The subject is
also restarted at random points: a new Core over the same database and executor, started through the service's own
start-up (recovery, then the engine rebuilt from the database), without any clean stop; sometimes after a crash
between a cycle's decisions and their commit (the cycle's transaction fails after `engine.schedule` decided), or a
crash in a queue-tree apply (before its commit: the client applies it again; after it: the restarted service finds
the new version).

A restart takes RESTART_S of the clock, during which neither side runs a cycle (the twin is the same service had it
only paused): the engine's one rule that lasts a single instant ("a job preempted at this instant may not take
GPUs back from other queues until the next") is not stored, and a real restart never happens within one instant.

"Same", checked after every step (so after the first cycle that follows each restart):

- every job: state, attempt number, exit code, submit/start/end times, guard clock (jobs.overtaken_at), and reason:
  the whole reason for a live job; for an ended one, its rule and numbers (an exit recorded at start-up is worded
  "ended while Corral was down", the same exit recorded by a cycle "exited with code N");
- every attempt: state, placement, GPUs, admission time and number, launch and end times, outcome, exit code, stop
  deadline (not the pid: the scripted executor numbers its launches);
- the engine: per pool each node's free GPUs, every queue's usage (all and non-preemptible), demand and fair share,
  pending jobs in queue order with their submit times and guard clocks, running jobs in victim order with their
  start times, placements and `explain`;
- the API's answers that `corral top` reads (GET /v1/queues, GET /v1/pools, job ids read as names) and
  `GET /v1/jobs/{id}/explain` of every pending job (its reason and its preemptions);
- and, on the restarted side, every queue's demand and fair share equal those recomputed from the rows alone.

A crash loses the uncommitted decisions of its cycle (and the exits that cycle had collected, which the restarted
service finds again through the executor): the twin runs no cycle at that instant, and after the restart both run
their next cycle at the same instant, in which the restarted service makes those decisions again. Events and the
audit log are not compared: a restart adds its own ("adopted"), and a crashed apply is audited when sent again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from hypothesis import given, note, settings
from hypothesis import strategies as st

from scheduler.backends.base import NodeInfo
from scheduler.engine.decisions import Decision
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Principal, Role
from scheduler.service.api.errors import ServiceError
from scheduler.service.core import loop as core_module
from scheduler.service.core import queues
from scheduler.service.core.assemble import build_core, create_token
from scheduler.service.core.loop import Core
from scheduler.service.core.specs import JobSubmit, engine_id, job_id_of
from scheduler.service.store.db import attempts, connect, jobs
from tests.factories import service_settings
from tests.prop_model import PROPERTY
from tests.restart_kit import (
    DurableExecutor,
    assert_demand_and_shares_from_scratch,
    differences,
    engine_view,
    names,
    restart,
    running_by_queue,
)
from tests.service_kit import Clock, gpus

ROOT = Principal("root", Role.PLATFORM_ADMIN)
RESTART_S = 1.0  # how long the service is away when it restarts: no cycle on either side meanwhile
NODES = [NodeInfo(f"a-{i}", "a", gpus(4)) for i in range(2)] + [NodeInfo(f"b-{i}", "b", gpus(2)) for i in range(2)]
LEAVES = ("nlp", "vision", "ranking", "borrower")
# Three trees over the same leaves (an apply never strands a job), quotas within the 8 GPUs of pool a and 4 of b:
# a small cluster, so that jobs wait, borrow and are taken back.
TREES: list[dict[str, Any]] = [
    {
        "queues": [
            {"name": "research", "quota": {"a": 6, "b": 2}},
            {"name": "nlp", "parent": "research", "quota": {"a": 3, "b": 1}, "weight": 2},
            {"name": "vision", "parent": "research", "quota": {"a": 3, "b": 1}},
            {"name": "ranking", "quota": {"a": 2, "b": 2}},
            {"name": "borrower"},
        ]
    },
    {
        "queues": [
            {"name": "research", "quota": {"a": 2}},
            {"name": "nlp", "parent": "research", "quota": {"a": 2}},
            {"name": "vision", "parent": "research"},
            {"name": "ranking", "quota": {"a": 6, "b": 4}, "limit": {"a": 8}},
            {"name": "borrower", "weight": 0.5},
        ]
    },
    {
        "queues": [
            {"name": "research", "quota": {"a": 8, "b": 4}},
            {"name": "nlp", "parent": "research", "quota": {"a": 4, "b": 2}},
            {"name": "vision", "parent": "research", "quota": {"a": 4, "b": 2}},
            {"name": "ranking", "weight": 3},
            {"name": "borrower", "limit": {"a": 6}},
        ]
    },
]


class Crash(Exception):
    """The process dies here: nothing after this point happens, and what was not committed is lost."""


# ----- one service -----


class Side:
    """One service: its core, executor, clock and an API client (a token in its database)."""

    def __init__(self, root: Path, clock: Clock, **settings: Any):
        self.clock = clock
        self.url = f"sqlite:///{root / 'corral.db'}"
        self.settings = service_settings(root, self.url, **settings)
        self.executor = DurableExecutor(exits_on_term=settings.get("grace_s", 0) == 0, infos={n.name: n for n in NODES})
        self.core = build_core(self.settings, self.executor, nodes=list(NODES), clock=clock)
        self.token = create_token(self.core, "root", Role.PLATFORM_ADMIN)
        self.api = self._client()

    def _client(self) -> TestClient:
        c = TestClient(create_app(self.core, run_loop=False))
        c.headers["Authorization"] = f"Bearer {self.token}"
        return c

    def restart(self) -> None:
        self.executor.restarted()

        def make() -> Core:
            core = Core(self.settings, connect(self.url), self.executor, list(NODES), self.clock)
            core.start()
            return core

        self.core = restart(self.core, make)
        self.api = self._client()

    def ids(self) -> dict[str, int]:
        return {n: i for i, n in names(self.core).items()}


def snapshot(side: Side) -> dict[str, Any]:
    """What must be the same on both sides (see the module's docstring), by job name."""
    core, name = side.core, names(side.core)
    with core.db.connect() as conn:
        job_rows = list(conn.execute(sa.select(jobs)).mappings())
        attempt_rows = list(conn.execute(sa.select(attempts)).mappings())
    out: dict[str, Any] = {"jobs": {}, "attempts": {}, "explain": {}}
    for j in job_rows:
        reason = j["reason"]
        if reason is not None and j["state"] not in ("pending", "starting", "running"):
            reason = {"rule": reason["rule"], "numbers": reason["numbers"]}
        out["jobs"][j["name"]] = (
            j["state"],
            j["attempt"],
            j["exit_code"],
            j["submitted_at"],
            j["started_at"],
            j["ended_at"],
            j["overtaken_at"],
            reason,
        )
        if j["state"] == "pending":
            e = side.api.get(f"/v1/jobs/{j['id']}/explain").json()
            for p in e["preemptions"]:
                p["by"] = name.get(p["by"])
            out["explain"][j["name"]] = (e["reason"], e["preemptions"])
    for a in attempt_rows:
        out["attempts"][(name[a["job_id"]], a["attempt"])] = (
            a["state"],
            a["placement"],
            a["gpus"],
            a["admitted_at"],
            a["admission"],
            a["started_at"],
            a["ended_at"],
            a["outcome"],
            a["exit_code"],
            a["stop_deadline"],
        )
    out["engine"] = engine_view(core)
    out["queues"] = side.api.get("/v1/queues").json()
    pools = side.api.get("/v1/pools").json()["pools"]
    for p in pools:
        for n in p["nodes"]:
            for g in n["gpus"]:
                g["job"] = name.get(g["job"]) if isinstance(g["job"], int) else g["job"]
    out["pools"] = pools
    return out


# ----- crashes -----


@contextmanager
def crash_after_schedule(core: Core) -> Iterator[None]:
    """The cycle's transaction fails after the engine decided: its admissions are never committed."""
    real = core.engine.schedule

    def dying(now: float) -> list[Decision]:
        real(now)
        raise Crash("killed between the decisions and their commit")

    with mock.patch.object(core.engine, "schedule", dying), pytest.raises(Crash):
        yield


@contextmanager
def crash_in_apply(core: Core, after_commit: bool) -> Iterator[None]:
    """A queue-tree apply dies before its transaction commits, or after (before the engine is rebuilt on it)."""
    if after_commit:
        patch = mock.patch.object(core, "_rebuild", side_effect=Crash("killed after the apply's commit"))
    else:
        real = core_module.store.add_audit

        def dying(conn: sa.Connection, at: float, actor: str, action: str, target: str, **detail: Any) -> None:
            real(conn, at, actor, action, target, **detail)
            if action == "queues.apply":
                raise Crash("killed before the apply's commit")

        patch = mock.patch.object(core_module.store, "add_audit", dying)
    with patch, pytest.raises(Crash):
        yield


# ----- steps -----

Step = tuple[Any, ...]

submit_steps = st.tuples(
    st.just("submit"),
    st.sampled_from(LEAVES),
    st.sampled_from(["a", "a", "b"]),
    st.sampled_from([1, 1, 1, 2]),
    st.sampled_from([1, 1, 2, 2, 4]),
    st.integers(0, 2),
    st.sampled_from([True, True, True, False]),
    st.sampled_from([None, None, None, 15.0, 40.0]),
)
STEPS: dict[str, st.SearchStrategy[Step]] = {
    "submit": submit_steps,
    "exit": st.tuples(st.just("exit"), st.integers(0, 50), st.sampled_from([0, 0, 3])),
    "cancel": st.tuples(st.just("cancel"), st.integers(0, 50)),
    "node": st.tuples(st.just("node"), st.sampled_from([n.name for n in NODES]), st.booleans()),
    "apply": st.tuples(st.just("apply"), st.integers(0, len(TREES) - 1), st.sampled_from(["", "before", "after"])),
    "advance": st.tuples(st.just("advance"), st.sampled_from([1.0, 3.0, 6.0, 12.0, 25.0])),
    "restart": st.tuples(st.just("restart"), st.sampled_from(["kill", "stop", "crash", "crash"])),
}
# How often each kind of step comes: mostly submissions, so that queues fill, borrow and wait.
MIX = ["submit"] * 8 + ["advance"] * 3 + ["exit"] * 2 + ["cancel", "node", "apply"] + ["restart"] * 3
steps = st.sampled_from(MIX).flatmap(STEPS.__getitem__)


def attempt(action: Callable[[], Any]) -> str:
    """An API action's outcome as the caller sees it: fine, or the error it answered."""
    try:
        action()
    except ServiceError as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def live_names(side: Side) -> list[str]:
    with side.core.db.connect() as conn:
        return sorted(
            conn.execute(sa.select(jobs.c.name).where(jobs.c.state.in_(("pending", "starting", "running")))).scalars()
        )


def running_names(side: Side) -> list[str]:
    name = names(side.core)
    return sorted({name[int(j)] for j, _ in side.executor.live})


def down_for_a_while(twin: Side, subject: Side) -> None:
    """The subject restarts, which takes RESTART_S; the twin makes no cycle meanwhile either."""
    for side in (twin, subject):
        side.clock.advance(RESTART_S)
    subject.restart()


def play(twin: Side, subject: Side, step: Step, n: int) -> None:
    """One step on both sides, then one cycle on each."""
    kind = step[0]
    if kind == "submit":
        _, queue, pool, workers, per, prio, preemptible, max_runtime = step
        sub = JobSubmit(
            name=f"j{n}",
            queue=queue,
            pool=pool,
            workers=workers,
            gpus=per,
            priority=prio,
            preemptible=preemptible,
            max_runtime=max_runtime,
            command="train",
        )
        assert attempt(lambda: twin.core.submit(ROOT, sub)) == attempt(lambda: subject.core.submit(ROOT, sub))
    elif kind == "exit":
        alive = running_names(twin)
        assert alive == running_names(subject)
        if alive:
            job = alive[step[1] % len(alive)]
            twin.executor.exit(twin.ids()[job], step[2])
            subject.executor.exit(subject.ids()[job], step[2])
    elif kind == "cancel":
        live = live_names(twin)
        if live:
            job = live[step[1] % len(live)]
            assert attempt(lambda: twin.core.cancel(ROOT, twin.ids()[job])) == attempt(
                lambda: subject.core.cancel(ROOT, subject.ids()[job])
            )
    elif kind == "node":
        for side in (twin, subject):
            side.executor.set_node(step[1], step[2])
    elif kind == "apply":
        doc, crash = TREES[step[1]], step[2]
        with subject.core.db.connect() as conn:
            current = queues.latest(conn)
        assert current is not None
        if crash and queues.diff(current["document"], doc):  # an apply that changes nothing writes nothing
            with crash_in_apply(subject.core, crash == "after"):
                subject.core.apply_queues(ROOT, doc)
            down_for_a_while(twin, subject)
        # A client whose call failed sends it again (after a commit it changes nothing); the twin's comes now too.
        assert attempt(lambda: twin.core.apply_queues(ROOT, doc)) == attempt(
            lambda: subject.core.apply_queues(ROOT, doc)
        )
    elif kind == "advance":
        for side in (twin, subject):
            side.clock.advance(step[1])
    else:
        assert kind == "restart"
        if step[1] == "crash":  # its cycle's decisions die uncommitted; the twin decides after the pause
            with crash_after_schedule(subject.core):
                subject.core.tick()
        elif step[1] == "stop":  # a clean stop: the loop ends its cycle, then the process exits
            for side in (twin, subject):
                side.core.tick()
        down_for_a_while(twin, subject)
    twin.core.tick()
    subject.core.tick()


@settings(PROPERTY, max_examples=30)
@given(st.lists(steps, min_size=10, max_size=40), st.sampled_from([0.0, 0.0, 4.0]))
def test_a_restarted_service_decides_as_one_never_restarted(script: list[Step], grace: float) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-restart-") as tmp:
        settings = {"grace_s": grace, "min_runtime_s": 5.0, "starvation_timeout_s": 20.0}
        twin = Side(Path(tmp) / "twin", Clock(), **settings)
        subject = Side(Path(tmp) / "subject", Clock(), **settings)
        for side in (twin, subject):
            side.core.apply_queues(ROOT, TREES[0])
        for n, step in enumerate(script):
            note(f"step {n}: {step}")
            play(twin, subject, step, n)
            diff = differences(snapshot(subject), snapshot(twin))
            assert not diff, f"after step {n} {step}, restarted != never restarted:\n" + "\n".join(diff)
            assert_demand_and_shares_from_scratch(subject.core)
        for side in (twin, subject):
            side.core.db.dispose()


# ----- the case -----


def test_a_borrower_taken_back_after_a_restart_as_without_one(db_url: str, tmp_path: Path) -> None:
    """Issue 20: a borrower (quota 0) holds 20 of 24 GPUs, the service restarts, one of its jobs ends; a team's
    4-GPU jobs within its fair share then take back what it borrowed exactly as without the restart, and no fair
    share is ever negative or other than an engine built from scratch finds."""
    tree = {
        "queues": [{"name": "team", "quota": {"gpu": 16}}, {"name": "other", "quota": {"gpu": 8}}, {"name": "borrower"}]
    }
    infos = [NodeInfo(f"n{i}", "gpu", gpus(8)) for i in range(3)]
    runs: dict[bool, dict[str, Any]] = {}
    for restarted in (False, True):
        root = tmp_path / str(restarted)
        clock, executor = Clock(), DurableExecutor()
        url = db_url if restarted else f"sqlite:///{root / 'twin.db'}"
        s = service_settings(root, url, grace_s=0)
        core = build_core(s, executor, nodes=infos, clock=clock)
        core.apply_queues(ROOT, tree)

        def submit(c: Core, queue: str, name: str) -> int:
            return int(c.submit(ROOT, JobSubmit(name=name, queue=queue, gpus=4, command="x"))[0]["id"])

        submit(core, "other", "other-0")
        borrowed = [submit(core, "borrower", f"b{i}") for i in range(5)]
        core.tick()
        core.tick()
        assert running_by_queue(core)["borrower"] and core.engine.pools["gpu"].usage["borrower"] == 20
        clock.advance(60)
        if restarted:
            core = restart(core, lambda: build_core(s, executor, nodes=infos, clock=clock))  # noqa: B023
            assert core.engine.pools["gpu"].fs.raw["borrower"] == 20  # its running jobs are its demand
        assert_demand_and_shares_from_scratch(core)
        executor.exit(borrowed[0], 0)  # ended after the restart: its demand goes, once
        core.tick()
        assert_demand_and_shares_from_scratch(core)
        team = [submit(core, "team", f"t{i}") for i in range(2)]
        decisions = core.tick()
        assert_demand_and_shares_from_scratch(core)
        core.tick()  # the victim's process exited at SIGTERM: the team's job is launched
        assert_demand_and_shares_from_scratch(core)
        shares = core.engine.shares("gpu")
        ps = core.engine.pools["gpu"]
        assert all(v >= 0 for v in shares.values()) and all(ps.fs.raw[q] >= 0 for q in core.tree.queues)
        name = names(core)
        runs[restarted] = {
            "decisions": [(type(d).__name__, name[int(d.job.removeprefix("job-"))]) for d in decisions],
            "running": {q: [name[int(j.removeprefix("job-"))] for j in js] for q, js in running_by_queue(core).items()},
            "shares": {q: round(v, 6) for q, v in shares.items()},
            "demand": dict(ps.fs.raw),
            "usage": dict(ps.usage),
            "explain": core.engine.explain(engine_id(team[1]), clock()) if ps.pending else None,
        }
        core.db.dispose()
    assert runs[True] == runs[False]
    decided = runs[True]["decisions"]
    assert ("Preempted", "b4") in decided and ("Started", "t0") in decided and ("Started", "t1") in decided
    assert runs[True]["shares"]["borrower"] >= 0 and runs[True]["demand"]["borrower"] == 16


# ----- ties a rebuilt engine must break as the first one did -----


def pair(tmp: Path, tree: dict[str, Any]) -> tuple[Side, Side]:
    sides = Side(tmp / "twin", Clock(), grace_s=0), Side(tmp / "subject", Clock(), grace_s=0)
    for side in sides:
        side.core.apply_queues(ROOT, tree)
    return sides


def submit_on(side: Side, name: str, queue: str, per: int, workers: int = 1, priority: int = 0) -> int:
    sub = JobSubmit(name=name, queue=queue, pool="a", gpus=per, workers=workers, priority=priority, command="x")
    return int(side.core.submit(ROOT, sub)[0]["id"])


def same(twin: Side, subject: Side) -> None:
    diff = differences(snapshot(subject), snapshot(twin))
    assert not diff, "restarted != never restarted:\n" + "\n".join(diff)


TEAMS = {"queues": [{"name": "team", "quota": {"a": 8, "b": 4}}, {"name": "borrower"}]}


def test_jobs_admitted_at_one_instant_are_taken_back_in_admission_order(tmp_path: Path) -> None:
    """Two borrower jobs start at the same instant, the later-submitted one first (the other did not fit yet).
    Victims at one instant go latest admitted first: after a restart, the same one, which the order of ids
    (or of admission times) alone would not tell."""
    twin, subject = pair(tmp_path, TEAMS)
    for side in (twin, subject):
        x = submit_on(side, "x", "team", 3)
        submit_on(side, "y", "team", 3)
        side.core.tick()  # x and y take 3 GPUs on each node: no node has 2 free
        submit_on(side, "wide", "borrower", 2)
        submit_on(side, "narrow", "borrower", 1)
        side.core.tick()  # narrow starts, wide does not fit
        side.executor.exit(x, 0)
        side.core.tick()  # wide starts at the same instant, admitted after narrow
    same(twin, subject)
    for side in (twin, subject):
        side.clock.advance(10)
    subject.restart()
    for side in (twin, subject):
        submit_on(side, "z", "team", 4)
        side.core.tick()
    same(twin, subject)
    with subject.core.db.connect() as conn:
        preempted = (
            conn.execute(sa.select(jobs.c.name).where(jobs.c.reason["rule"].as_string() == "reclaim")).scalars().all()
        )
    assert preempted == ["wide"], preempted


def test_equal_jobs_keep_their_submission_order_through_a_restart(tmp_path: Path) -> None:
    """Two jobs of one queue, same priority, submitted at the same instant: the second starts past the first (which
    does not fit) and is later sent back to wait by a higher-priority job. Its place is behind the first, as before
    the restart, and the first keeps its starvation-guard clock."""
    twin, subject = pair(tmp_path, TEAMS)
    for side in (twin, subject):
        submit_on(side, "x", "team", 4)
        side.core.tick()
        submit_on(side, "first", "team", 4, workers=2)
        submit_on(side, "second", "team", 4)
        side.core.tick()  # second starts past first: first's guard clock starts
    same(twin, subject)
    for side in (twin, subject):
        side.clock.advance(10)
    subject.restart()
    for side in (twin, subject):
        submit_on(side, "urgent", "team", 4, priority=1)
        side.core.tick()  # takes second's GPUs back: lower-priority work of its own queue, started last
    same(twin, subject)
    name = names(subject.core)
    pending = [(name[job_id_of(j.id)], j.skipped_since) for j in subject.core.engine.pools["a"].pending["team"]]
    assert pending == [("first", 1_000_000.0), ("second", None)], pending
