"""Unallocated GPUs while jobs wait (scheduler.sim.fragmentation) on hand-made event logs with known answers."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.sim import fragmentation
from scheduler.sim.runner import Simulation
from tests import factories as f


def _ev(t: float, event: str, job: str, **extra: Any) -> dict[str, Any]:
    return {"t": t, "event": event, "job": job, **extra}


def _log(*events: dict[str, Any]) -> dict[str, Any]:
    return {"policy": "test", "events": list(events), "fair_share": []}


def test_whole_gpus_free_while_a_gang_waits() -> None:
    # One 4-GPU node. a (2 GPUs) runs 0-100; big (4 GPUs) waits 0-100 with 2 GPUs free: 2 x 100 GPU-seconds over
    # 100 s of waiting, half the pool's 4 x 100. After 100 nothing waits: big's run adds nothing.
    log = _log(
        _ev(0, "submitted", "a"),
        _ev(0, "submitted", "big"),
        _ev(0, "started", "a", nodes={"a100-0": [0, 1]}),
        _ev(100, "completed", "a"),
        _ev(100, "started", "big", nodes={"a100-0": [0, 1, 2, 3]}),
        _ev(200, "completed", "big"),
    )
    m = fragmentation.compute(log, f.nodes("a100", 1, 4))
    assert m.wait_seconds == 100 and m.unallocated_gpu_seconds == 200 and m.capacity_gpu_seconds == 400
    assert m.mean_unallocated == 2 and m.unallocated_share == 0.5
    assert m.partial_gpu_seconds == 0 and m.partial_share == 0


def test_fractions_left_on_shared_gpus_are_unallocated_and_partial() -> None:
    # One 2-GPU node. f1 holds 0.5 of GPU 0 and f2 0.25 of GPU 1 (a placement that spread them): a whole-GPU job
    # w waits 0-50 though 1.25 GPUs are free, all of it in pieces: 1.25 x 50 = 62.5 GPU-seconds, all partial.
    # At 50 f2 ends and w takes GPU 1; f1's GPU stays half free, but nothing waits any more.
    log = _log(
        _ev(0, "started", "f1", nodes={"a100-0": [0]}, fraction=0.5),
        _ev(0, "started", "f2", nodes={"a100-0": [1]}, fraction=0.25),
        _ev(0, "submitted", "w"),
        _ev(50, "completed", "f2"),
        _ev(50, "started", "w", nodes={"a100-0": [1]}),
        _ev(100, "completed", "f1"),
        _ev(100, "completed", "w"),
    )
    m = fragmentation.compute(log, f.nodes("a100", 1, 2))
    assert m.wait_seconds == 50
    assert m.unallocated_gpu_seconds == pytest.approx(62.5) and m.partial_gpu_seconds == pytest.approx(62.5)
    assert m.mean_unallocated == pytest.approx(1.25) and m.partial_share == pytest.approx(1.0)
    assert m.unallocated_share == pytest.approx(62.5 / 100)


def test_fractions_that_fill_a_gpu_leave_nothing_partial() -> None:
    # 0.1 + 0.2 + 0.7 of GPU 0 is a full GPU (float sums notwithstanding); a waiting 2-GPU job sees 1 whole GPU.
    log = _log(
        _ev(0, "started", "x", nodes={"n-0": [0]}, fraction=0.1),
        _ev(0, "started", "y", nodes={"n-0": [0]}, fraction=0.2),
        _ev(0, "started", "z", nodes={"n-0": [0]}, fraction=0.7),
        _ev(0, "submitted", "two"),
        _ev(10, "cancelled", "two"),
    )
    m = fragmentation.compute(log, f.nodes("a100", 1, 2, names="n-{i}"))
    assert m.unallocated_gpu_seconds == pytest.approx(10) and m.partial_gpu_seconds == pytest.approx(0)


def test_a_preempted_job_waits_again_and_a_rejected_one_never_waits() -> None:
    # One 2-GPU node. v (2 GPUs) runs 0-10, is preempted at 10 by p (1 GPU), which runs 10-30; v waits 10-30 with
    # 1 GPU free: 20 GPU-seconds. r is rejected at 0 and never counts.
    log = _log(
        _ev(0, "submitted", "v"),
        _ev(0, "started", "v", nodes={"a100-0": [0, 1]}),
        _ev(0, "rejected", "r", reason="too big"),
        _ev(10, "preempted", "v", reason="priority", by="p"),
        _ev(10, "started", "p", nodes={"a100-0": [0]}),
        _ev(30, "completed", "p"),
        _ev(30, "started", "v", nodes={"a100-0": [0, 1]}),
        _ev(40, "completed", "v"),
    )
    m = fragmentation.compute(log, f.nodes("a100", 1, 2))
    assert (m.wait_seconds, m.unallocated_gpu_seconds, m.capacity_gpu_seconds) == (20, 20, 40)


def test_only_the_pool_a_job_waits_for_counts() -> None:
    # a100: 2 nodes x 4, idle. h100: 1 node x 2, h1 holds 1 GPU 0-60; h2 (2 GPUs, h100) waits 0-60. The idle a100
    # GPUs are not unallocated while h2 waits: it cannot use them. Per pool: h100 1 x 60; a100 nothing.
    cluster = f.nodes("a100", 2, 4) + f.nodes("h100", 1, 2)
    jobs = [f.sim_job("h1", 0, 60, pool="h100"), f.sim_job("h2", 0, 60, pool="h100", gpus=2)]
    log = _log(
        _ev(0, "submitted", "h1"),
        _ev(0, "submitted", "h2"),
        _ev(0, "started", "h1", nodes={"h100-0": [0]}),
        _ev(60, "completed", "h1"),
        _ev(60, "started", "h2", nodes={"h100-0": [0, 1]}),
        _ev(120, "completed", "h2"),
    )
    m = fragmentation.compute(log, cluster, jobs)
    assert (m.wait_seconds, m.unallocated_gpu_seconds, m.capacity_gpu_seconds) == (60, 60, 120)
    assert m.pools["a100"].wait_seconds == 0 and m.pools["h100"].unallocated_gpu_seconds == 60
    # From the log alone: h2's pool is the one it started in, the same answer.
    alone = fragmentation.compute(log, cluster)
    assert (alone.wait_seconds, alone.unallocated_gpu_seconds) == (60, 60)


def test_from_the_log_alone_a_job_that_never_started_waits_in_every_pool() -> None:
    # x is submitted at 0 and the log ends at 10 with it still waiting; its pool is unknown without the trace, so
    # both pools' free GPUs count: 4 + 2 over 10 s.
    cluster = f.nodes("a100", 1, 4) + f.nodes("h100", 1, 2)
    log = _log(_ev(0, "submitted", "x"), _ev(10, "started", "y", nodes={"a100-0": [0]}))
    m = fragmentation.compute(log, cluster)
    assert (m.wait_seconds, m.unallocated_gpu_seconds, m.capacity_gpu_seconds) == (10, 60, 60)


def test_a_down_node_is_neither_capacity_nor_free() -> None:
    # Two 2-GPU nodes; a100-1 is down 0-50. w (4 GPUs) waits 0-100: 2 GPUs free (of 2) for 50 s, then 4 (of 4)
    # for 50 s: 300 GPU-seconds of 300.
    log = _log(_ev(0, "submitted", "w"), _ev(100, "started", "w", nodes={"a100-0": [0, 1], "a100-1": [0, 1]}))
    events = [f.node_down(0, "a100-1"), f.node_up(50, "a100-1")]
    m = fragmentation.compute(log, f.nodes("a100", 2, 2), node_events=events)
    assert (m.wait_seconds, m.unallocated_gpu_seconds, m.capacity_gpu_seconds) == (100, 300, 300)


def test_nothing_waits_nothing_counts() -> None:
    log = _log(_ev(0, "submitted", "a"), _ev(0, "started", "a", nodes={"a100-0": [0]}), _ev(5, "completed", "a"))
    m = fragmentation.compute(log, f.nodes("a100", 1, 8))
    assert m.wait_seconds == 0 and m.mean_unallocated == 0 and m.unallocated_share == 0 and m.partial_share == 0


def test_a_replay_of_the_simulator() -> None:
    # The simulator's own log: one 8-GPU node; a (6 GPUs) 0-100; b (4 GPUs) waits 0-100 with 2 free.
    world = f.world(
        f.nodes("a100", 1, 8),
        [f.queue("team-a", quota={"a100": 8})],
        [f.sim_job("a", 0, 100, gpus=6), f.sim_job("b", 0, 100, gpus=4)],
    )
    log = Simulation(world).run()
    m = fragmentation.compute(log, world.nodes, world.jobs)
    assert (m.wait_seconds, m.unallocated_gpu_seconds, m.mean_unallocated) == (100, 200, 2)


def test_stranded_while_a_waiting_job_asks_for_no_more_than_is_unallocated() -> None:
    # One 4-GPU node. a (2 GPUs) runs 0-100; big (4) waits 0-100 with 2 free: unallocated, not stranded (it asks
    # for more). small (1 GPU) waits 50-60 (held back, say by the guard): 2 free x 10 s are stranded. At 100 big
    # is cancelled; h takes GPUs 0-1 until 110, x holds 0.5 of GPU 2 and y 0.75 of GPU 3. w (1 GPU) waits 100-110
    # and f (0.5) 100-105 with 0.75 free in pieces: stranded 0.75 x 5 while f waits (0.5 <= 0.75), not after
    # (w asks for more than the 0.25 left). m, a MIG job waiting throughout, asks for no GPU of the node: it never
    # makes anything stranded.
    jobs = [
        f.sim_job("a", 0, 100, gpus=2),
        f.sim_job("big", 0, 100, gpus=4),
        f.sim_job("h", 100, 10, gpus=2),
        f.sim_job("small", 50, 10, gpus=1),
        f.sim_job("x", 100, 100, gpus=0.5),
        f.sim_job("y", 100, 100, gpus=0.75),
        f.sim_job("f", 100, 10, gpus=0.5),
        f.sim_job("w", 100, 10, gpus=1),
        f.sim_job("m", 0, 10, mig="1g.10gb"),
    ]
    log = _log(
        _ev(0, "submitted", "a"),
        _ev(0, "submitted", "big"),
        _ev(0, "submitted", "m"),
        _ev(0, "started", "a", nodes={"a100-0": [0, 1]}),
        _ev(50, "submitted", "small"),
        _ev(60, "started", "small", nodes={"a100-0": [2]}),
        _ev(70, "completed", "small"),
        _ev(100, "completed", "a"),
        _ev(100, "cancelled", "big"),
        _ev(100, "started", "h", nodes={"a100-0": [0, 1]}),
        _ev(100, "started", "x", nodes={"a100-0": [2]}, fraction=0.5),
        _ev(100, "started", "y", nodes={"a100-0": [3]}, fraction=0.75),
        _ev(100, "submitted", "f"),
        _ev(100, "submitted", "w"),
        _ev(105, "started", "f", nodes={"a100-0": [2]}, fraction=0.5),
        _ev(110, "completed", "h"),
        _ev(110, "started", "w", nodes={"a100-0": [0]}),
    )
    m = fragmentation.compute(log, f.nodes("a100", 1, 4), jobs)
    # 0-60: 2 free (small leaves the wait at 60); 60-70: big waits, 1 free; 70-100: 2 free; 100-105: 0.75 free
    # (x and y on GPUs 2 and 3, big on 0 and 1); 105-110: 0.25 free (f joins x).
    assert m.unallocated_gpu_seconds == pytest.approx(2 * 60 + 1 * 10 + 2 * 30 + 0.75 * 5 + 0.25 * 5)
    assert m.stranded_gpu_seconds == pytest.approx(2 * 10 + 0.75 * 5)
    assert m.stranded_share == pytest.approx(m.stranded_gpu_seconds / m.unallocated_gpu_seconds)
    # Without the jobs nothing is known of what waiting jobs ask: nothing counts as stranded.
    assert fragmentation.compute(log, f.nodes("a100", 1, 4)).stranded_gpu_seconds == 0
