"""Engine decisions and their reasons: pending, rejected, preempted, started; node failure; wakeups."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from scheduler.engine import Engine, Job, JobState, Preempted, Rejected, Settings, Started
from scheduler.engine.guard import Reservation
from scheduler.engine.memo import may_fit_any
from tests.factories import job as job_spec
from tests.factories import pool_engine as engine
from tests.factories import queue

job = partial(job_spec, gpus=8)  # these tests' jobs take a whole a100 node unless told


def test_rejections_say_why() -> None:
    e = engine([queue("dept", quota={"a100": 8}, limit={"a100": 8}), queue("a", "dept", quota={"a100": 8})])
    cases = {
        "q": (job("q", "ghost"), "queue ghost does not exist"),
        "i": (job("i", "dept"), "queue dept is not a leaf queue; submit to one of: a"),
        "p": (job_spec("p", "a", "h100"), "pool h100 does not exist"),
        "w": (job("w", "a", gpus=9), "no node of pool a100 can hold one worker (9 GPUs"),
        "g": (job("g", "a", workers=3), "the gang asks 24 GPUs (3 x 8); pool a100 has 16 in all"),
        "l": (job("l", "a", workers=2), "more than queue dept's limit of 8"),
    }
    for jid, (spec, needle) in cases.items():
        [d] = e.submit(spec, 0)
        assert isinstance(d, Rejected) and needle in d.reason.message, d
        assert e.jobs[jid].state is JobState.REJECTED and needle in e.explain(jid, 0).message


def test_pending_reasons_name_rule_and_numbers() -> None:
    e = engine([queue("a", quota={"a100": 4}, limit={"a100": 16}), queue("b", quota={"a100": 4})])
    e.submit(job("a1", "a"), 0)
    e.submit(job("a2", "a", gpus=4, preemptible=False), 0)
    e.submit(job("a3", "a"), 0)
    e.submit(job("a4", "a", gpus=4, preemptible=False), 0)
    s1, s2 = [d for d in e.schedule(0) if isinstance(d, Started)]
    assert s1.job == "a1" and "borrowing" in s1.reason.message
    # Its queue's preemptible a1 does not count against a2's guarantee (SCHEDULING.md, Admission).
    assert s2.job == "a2" and "within its guarantee (non-preemptible): a holds 0 + 4" in s2.reason.message
    limit = e.explain("a3", 0)
    assert limit.rule == "limit" and "queue a would use 12 + 8 GPUs of a100, over its limit of 16" in limit.message
    guarantee = e.explain("a4", 0)
    assert guarantee.rule == "guarantee" and "holds 4 non-preemptible GPUs" in guarantee.message
    assert "4 + 4 > 4" in guarantee.message
    assert guarantee.numbers["quota"] == 4 and guarantee.numbers["np_usage"] == 4


def test_fit_reason_and_running_reason() -> None:
    e = engine([queue("a", quota={"a100": 16})], nodes=2)
    e.submit(job("a1", "a", gpus=4), 0)
    e.submit(job("a2", "a", gpus=4), 0)
    e.submit(job("g", "a", workers=2), 0)
    e.schedule(0)
    why = e.explain("g", 0)
    assert why.rule == "fit" and "needs 2 x 8 GPUs on a100: 8 GPUs free" in why.message
    assert e.explain("a1", 0).rule == "within_quota"


def test_reclaim_reason_has_shares() -> None:
    e = engine([queue("a", quota={"a100": 8}), queue("b", quota={"a100": 8})])
    e.submit(job("a1", "a"), 0)
    e.submit(job("a2", "a"), 0)
    e.schedule(0)
    e.submit(job("b1", "b"), 10)
    out = e.schedule(10)
    pre = [d for d in out if isinstance(d, Preempted)]
    assert [(p.job, p.cause, p.by) for p in pre] == [("a2", "reclaim", "b1")]
    assert "b reclaims its guarantee on a100" in pre[0].reason.message
    assert "a uses 16 GPUs, over its quota of 8" in pre[0].reason.message
    assert isinstance(out[-1], Started) and out[-1].job == "b1"


def test_node_down_interrupts_whole_gang_and_node_up_restores() -> None:
    e = engine([queue("a", quota={"a100": 16})])
    e.submit(job("g", "a", workers=2), 0)
    assert [d.job for d in e.schedule(0)] == ["g"]
    out = e.node_down("a100-1", 5)
    assert [(d.job, d.cause) for d in out if isinstance(d, Preempted)] == [("g", "node_down")]
    assert e.schedule(5) == [] and e.shares("a100")["a"] == 8
    e.node_up("a100-1", 9)
    [s] = e.schedule(9)
    assert isinstance(s, Started) and s.placement == {"a100-0": list(range(8)), "a100-1": list(range(8))}


def test_min_runtime_wakeup_and_gpu_indices() -> None:
    e = engine(
        [queue("a", quota={"a100": 4}), queue("b", quota={"a100": 4})], nodes=1, settings=Settings(min_runtime=30)
    )
    e.submit(job("a1", "a", gpus=3), 0)
    e.submit(job("a2", "a", gpus=3), 0)
    started = e.schedule(0)
    assert [d.placement for d in started if isinstance(d, Started)] == [{"a100-0": [0, 1, 2]}, {"a100-0": [3, 4, 5]}]
    e.submit(job("b1", "b", gpus=4), 10)
    assert e.schedule(10) == []
    assert e.next_wakeup(10) == 30
    out = e.schedule(30)
    assert [(d.job, type(d).__name__) for d in out] == [("a2", "Preempted"), ("b1", "Started")]
    assert isinstance(out[1], Started) and out[1].placement == {"a100-0": [3, 4, 5, 6]}


def test_cancel_and_finish() -> None:
    e = engine([queue("a", quota={"a100": 8})], nodes=1)
    e.submit(job("a1", "a"), 0)
    e.submit(job("a2", "a"), 0)
    e.schedule(0)
    assert e.cancel("a1", 5) and not e.cancel("a1", 6)
    assert [d.job for d in e.schedule(6)] == ["a2"]
    assert e.finish("a2", 7) and e.jobs["a2"].state is JobState.COMPLETED
    assert e.pools["a100"].pool.free_gpus == 8


def test_non_preemptible_bigger_than_quota_is_rejected() -> None:
    e = engine([queue("a", quota={"a100": 4})])
    [d] = e.submit(job("nb", "a", gpus=8, preemptible=False), 0)
    assert isinstance(d, Rejected) and "more than queue a's quota of 4" in d.reason.message
    assert e.submit(job("ok", "a", gpus=8), 0) == []


def test_a_long_backlog_is_not_walked_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of one queue with the same ask get the same answer: behind a job no tier may take, a backlog of a
    thousand is read until every shape in it was asked about, not to its end at every cycle (this was the
    service's tail latency under a burst of submissions)."""
    e = engine([queue("a", quota={"a100": 8}), queue("b")], nodes=1, settings=Settings(min_runtime=1000))
    e.submit(job("big", "b"), 0)  # borrowed, but too young to take back
    e.schedule(0)
    for i in range(1000):
        e.submit(job(f"j{i}", "a", gpus=1 + i % 2), 1)
    read: list[str] = []
    shape = Job.shape
    monkeypatch.setattr(Job, "shape", lambda j: read.append(j.id) or shape(j))
    assert e.schedule(1) == []
    assert read == ["j0", "j1"]
    e.finish("big", 2)
    assert [d.job for d in e.schedule(2)][:2] == ["j0", "j1"]


def test_a_gang_stuck_behind_its_own_lower_priority_job_wakes_when_room_frees() -> None:
    """A queue whose only way in is its own lower-priority work sleeps until free GPUs plus what that work holds
    could make room: here 4 freed GPUs elsewhere and the 4 of its own low job fit the 2 x 4 gang."""
    e = engine([queue("a", quota={"a100": 4}), queue("b", quota={"a100": 4})], nodes=2, gpus=4)
    e.submit(job("low", "a", gpus=4), 0)
    e.submit(job("b1", "b", gpus=4), 0)
    e.schedule(0)
    e.submit(job("high", "a", gpus=4, workers=2, priority=1), 1)
    assert e.schedule(1) == []  # neither its quota nor its share has room for 8: only "low" could go
    e.finish("b1", 100)
    out = e.schedule(100)
    assert [(type(d).__name__, d.job) for d in out] == [("Preempted", "low"), ("Started", "high")]
    assert out[0].cause == "priority"


def test_usable_free_gpus_follow_every_allocation_release_node_and_reservation() -> None:
    """PoolState.usable_free counts the free GPUs on held nodes once per change to free room: each change must
    show (a stale count would let a job onto a held node, or keep one off free GPUs)."""
    e = engine([queue("a", quota={"a100": 4}), queue("b", quota={"a100": 4})], nodes=2, gpus=4)
    ps, pool = e.pools["a100"], e.pools["a100"].pool
    ps.reserved_for(Reservation(Job(job_spec("s", "a"), 0, 0), frozenset({"a100-0"}), False))
    assert (ps.usable_free("a"), ps.usable_free("b")) == (8, 4)  # a's own reservation keeps nothing from it
    placed = pool.allocate(job_spec("x", "b", gpus=3), ["a100-0"])
    assert (ps.usable_free("a"), ps.usable_free("b")) == (5, 4)
    pool.allocate(job_spec("y", "b", gpus=1), ["a100-1"])
    assert ps.usable_free("b") == 3
    pool.release(job_spec("x", "b", gpus=3), placed)
    assert ps.usable_free("b") == 3
    pool.set_up("a100-1", False)
    assert ps.usable_free("b") == 0
    ps.reserved_for(Reservation(Job(job_spec("s", "a"), 0, 0), frozenset(), False))
    assert ps.usable_free("b") == 4


def test_sleeping_queues_that_tried_the_same_shapes_share_one_room_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a release, queues asleep on the same shapes get one answer per change to free room (memo.py)."""
    e = engine(
        [queue("a", quota={"a100": 6}), queue("c", quota={"a100": 1}), queue("d", quota={"a100": 1})], nodes=2, gpus=4
    )
    for i in range(2):
        e.submit(job(f"a{i}", "a", gpus=3), 0)  # one per node: 1 GPU left on each
    e.schedule(0)
    for q in "cd":
        e.submit(job(f"wait-{q}", q, gpus=2), 1)  # 2 GPUs free, but not on one node; nothing to take back
    assert e.schedule(1) == []
    ps = e.pools["a100"]
    assert set(ps.asleep) == {"c", "d"} and ps.asleep["c"].needs == ps.asleep["d"].needs
    checks: list[str] = []

    def counted(*args: Any) -> bool:  # (pool, reserved, needs, queue)
        checks.append(args[3])
        return may_fit_any(*args)

    monkeypatch.setattr("scheduler.engine.state.may_fit_any", counted)
    e.finish("a0", 2)  # 3 GPUs back on a100-0: either could fit there now
    assert not ps.room_still_short(ps.asleep["c"], "c")
    assert not ps.room_still_short(ps.asleep["d"], "d")
    assert checks == ["c"]  # d tried what c tried: the same answer
    ps.pool.allocate(job_spec("z", "a", gpus=3), ["a100-0"])  # taken again (no release: same `grown`)
    assert ps.room_still_short(ps.asleep["d"], "d")
    assert checks == ["c", "d"]  # free room changed since: asked again


def test_a_job_preempted_at_one_instant_is_asked_again_at_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job preempted at an instant may take GPUs back across queues from the next one on: its pool is scheduled
    at the next instant even when nothing else changed there (found by a longer fixpoint search: a second pass at
    that instant would preempt and start a job the first had left waiting)."""
    e = engine([queue("a", quota={"a100": 8}), queue("b", quota={"a100": 8})])
    e.submit(job("a1", "a"), 0)
    e.submit(job("a2", "a"), 0)
    e.schedule(0)
    e.submit(job("b1", "b"), 10)
    assert [d.job for d in e.schedule(10) if isinstance(d, Preempted)] == ["a2"]
    scheduled: list[str] = []
    inner = Engine._schedule_pool

    def spy(self: Engine, ps: Any, now: float, out: list[Any]) -> None:
        scheduled.append(ps.name)
        inner(self, ps, now, out)

    monkeypatch.setattr(Engine, "_schedule_pool", spy)
    e.schedule(20)
    assert scheduled == ["a100"]
