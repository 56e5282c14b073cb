"""The engine's node states besides up and down: cordoned (nothing new, running jobs stay) and the room pods Corral
did not place hold on a node (Kubernetes: DaemonSets, kube-scheduler's pods)."""

from __future__ import annotations

from functools import partial

from scheduler.engine import Engine, JobState, Preempted, Started
from tests.factories import job as job_spec
from tests.factories import pool_engine, queue


def engine(nodes: int = 2, gpus: int = 8, cpus: float | None = None) -> Engine:
    """One queue "a" guaranteed every GPU of nodes n0, n1, ... (64 GB each when CPUs are counted)."""
    return pool_engine(
        [queue("a", quota={"a100": nodes * gpus})],
        nodes,
        gpus,
        cpus=cpus,
        memory_gb=None if cpus is None else 64.0,
        names="n{i}",
    )


job = partial(job_spec, queue="a", gpus=8)  # these tests' jobs are a's, a whole node each unless told


def started(out: list[object]) -> dict[str, dict[str, list[int]]]:
    return {d.job: d.placement for d in out if isinstance(d, Started)}


def test_cordon_keeps_running_jobs_and_places_nothing_new() -> None:
    e = engine()
    e.submit(job("r", gpus=4), 0)
    assert started(e.schedule(0)) == {"r": {"n0": [0, 1, 2, 3]}}
    e.node_cordoned("n0", 1)
    assert e.jobs["r"].state is JobState.RUNNING
    e.submit(job("x", gpus=4), 2)
    e.submit(job("y", gpus=8), 2)
    assert started(e.schedule(2)) == {"x": {"n1": [0, 1, 2, 3]}}  # n0's 4 free GPUs are not offered
    assert e.explain("y", 2).rule == "fit"
    e.finish("r", 3)  # its GPUs free up on the cordoned node: still nothing new there
    assert started(e.schedule(3)) == {}
    e.node_up("n0", 4)  # uncordoned
    assert started(e.schedule(4)) == {"y": {"n0": list(range(8))}}


def test_a_cordoned_node_that_goes_down_stops_its_jobs() -> None:
    e = engine()
    e.submit(job("r"), 0)
    e.schedule(0)
    e.node_cordoned("n0", 1)
    out = e.node_down("n0", 2)
    assert [(d.job, d.cause) for d in out if isinstance(d, Preempted)] == [("r", "node_down")]
    assert started(e.schedule(2)) == {"r": {"n1": list(range(8))}}


def test_no_victims_on_a_cordoned_node() -> None:
    e = pool_engine([queue("a", quota={"a100": 8}), queue("b", quota={"a100": 8})], names="n{i}")
    e.submit(job_spec("a1", "a", gpus=8), 0)
    e.submit(job_spec("a2", "a", gpus=8), 0)
    e.schedule(0)
    cordoned = next(n for n, g in e.jobs["a1"].placement().items())
    e.node_cordoned(cordoned, 1)
    e.submit(job_spec("b1", "b", gpus=8), 2)
    out = e.schedule(2)
    # b reclaims its guarantee from the job on the open node: freeing the cordoned one would not help it.
    assert [d.job for d in out if isinstance(d, Preempted)] == ["a2"] and started(out).keys() == {"b1"}
    assert e.jobs["a1"].state is JobState.RUNNING


def test_others_pods_take_room_before_corral_places() -> None:
    e = engine(nodes=1, cpus=32.0)
    e.node_held("n0", 2, 30.0, 8.0)
    assert e.node_room("n0") == (6, 2.0, 56.0)
    e.submit(job("big", gpus=4, cpus=4.0), 0)
    e.submit(job("small", gpus=4, cpus=2.0), 0)
    assert started(e.schedule(0)) == {"small": {"n0": [0, 1, 2, 3]}}  # GPUs 6 and 7 are theirs
    e.node_held("n0", 0, 0.0, 0.0)  # their pods ended: room comes back and a waiting job starts
    assert started(e.schedule(1)) == {"big": {"n0": [4, 5, 6, 7]}}
    assert e.node_room("n0") == (0, 26.0, 64.0)


def test_others_placed_beside_corral_take_gpus_as_jobs_end() -> None:
    e = engine(nodes=1)
    e.submit(job("r"), 0)
    e.schedule(0)
    e.node_held("n0", 2, 0.0, 0.0)  # a race: they hold 2 of a full node
    assert e.node_room("n0")[0] == 0
    e.finish("r", 1)
    assert e.node_room("n0")[0] == 6  # theirs first
    e.submit(job("x", gpus=8), 2)
    e.submit(job("y", gpus=6), 2)
    assert started(e.schedule(2)) == {"y": {"n0": list(range(6))}}


def test_holds_on_a_cordoned_node_are_kept_for_when_it_opens() -> None:
    e = engine(nodes=1)
    e.node_cordoned("n0", 0)
    e.node_held("n0", 3, 0.0, 0.0)
    e.node_up("n0", 1)
    e.submit(job("x", gpus=6), 1)
    e.submit(job("y", gpus=5), 1)
    assert started(e.schedule(1)) == {"y": {"n0": list(range(5))}}


def test_a_rebuild_restores_jobs_before_others_holds() -> None:
    """Holds applied first would take the GPUs a running job holds (the highest free ones), and restoring it fail."""
    e = engine(nodes=1)
    e.restore(job("r", gpus=4), 0, 0, [("n0", [4, 5, 6, 7])])
    e.node_held("n0", 2, 0.0, 0.0)
    assert e.node_room("n0")[0] == 2


def test_preemption_counts_gpus_others_are_owed() -> None:
    """Others placed beside a job hold 2 GPUs it still has: a victim freeing its 4 frees only 2 for Corral."""
    e = pool_engine([queue("a", quota={"a100": 4}), queue("b", quota={"a100": 0})], nodes=1, gpus=4, names="n{i}")
    e.submit(job_spec("a1", "b", gpus=4), 0)  # b borrows a's whole guarantee
    e.schedule(0)
    e.node_held("n0", 2, 0.0, 0.0)  # a race: others now hold 2 of the node's 4
    e.submit(job_spec("x", "a", gpus=4), 1)
    out = e.schedule(1)
    assert started(out) == {}  # reclaiming a1 would give x 2 GPUs, not 4: no victim, no start
    assert e.jobs["a1"].state is JobState.RUNNING
