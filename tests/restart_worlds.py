"""Two worlds where an engine rebuilt mid-run decided otherwise than its twin (hypothesis found them)."""

from __future__ import annotations

from quotas import QueueSpec
from scheduler.engine import Settings
from scheduler.sim.inputs import World
from tests.factories import node, sim_job, world

NODES = [node("a100-0", "a100", 8, None, None, "d0"), node("a100-1", "a100", 8, None, None, "d0")]
SETTINGS = Settings(min_runtime=15.0, starvation_timeout=1e9)

# Rebuilt at any t from 40 to 57, the engine lacked the wakeups at t=57 and t=61 that its twin had: young jobs'
# min_runtime, registered only when a preemption walk met them.
WORLD_1: World = world(
    NODES,
    [
        QueueSpec(name="q0", weight=2.0),
        QueueSpec(name="q0a", parent="q0", limit={"a100": 4}, weight=0.0),
        QueueSpec(name="q0b", parent="q0", weight=3.0),
        QueueSpec(name="q0c", parent="q0", limit={"a100": 9}, weight=3.0),
        QueueSpec(name="q1", weight=0.5),
        QueueSpec(name="q2", quota={"a100": 6}, weight=0.0),
    ],
    [
        sim_job("j0", 0, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j1", 0, 53, "q0a", gpus=2, workers=2),
        sim_job("j2", 0, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j3", 2, 30, "q0b", gpus=2),
        sim_job("j4", 0, 16, "q1", gpus=3, workers=3),
        sim_job("j5", 18, 31, "q0b", gpus=1, workers=3),
        sim_job("j6", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j7", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j8", 26, 15, "q0c", gpus=4, priority=1),
        sim_job("j9", 5, 1, "q0b", gpus=2, workers=3),
        sim_job("j10", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j11", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j12", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j13", 0, 3, "q0", gpus=0, preemptible=False),
        sim_job("j14", 27, 120, "q0c", gpus=8, priority=1),
        sim_job("j15", 33, 9, "q0c", gpus=3),
        sim_job("j16", 1, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j17", 3, 60, "q0a", max_runtime=10.0, gpus=4, preemptible=False, checkpoint=False),
        sim_job("j18", 1, 55, "q0c", gpus=1, workers=3),
        sim_job("j19", 40, 2, "q0a", gpus=0),
        sim_job("j20", 2, 26, "q0b", gpus=2, workers=2),
        sim_job("j21", 18, 22, "q2", gpus=2, preemptible=False),
    ],
    settings=SETTINGS,
)

# Equal weights, equal demands: shares of q0b and q0c that differed in the last bit, by the history of incremental
# updates, broke their tie of ratios at t=51 otherwise after a rebuild at t=51 (j9 started, not j18 and j15); and,
# rebuilt at t=38 to 40, a min_runtime wakeup at t=52 that only the twin had.
WORLD_2: World = world(
    NODES,
    [
        QueueSpec(name="q0", weight=2.0),
        QueueSpec(name="q0a", parent="q0", limit={"a100": 4}, weight=0.0),
        QueueSpec(name="q0b", parent="q0", weight=3.0),
        QueueSpec(name="q0c", parent="q0", limit={"a100": 9}, weight=3.0),
        QueueSpec(name="q1", weight=0.5),
        QueueSpec(name="q2", quota={"a100": 6}, weight=0.0),
    ],
    [
        sim_job("j0", 0, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j1", 0, 53, "q0a", gpus=2, workers=2),
        sim_job("j2", 0, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j3", 2, 30, "q0b", gpus=2),
        sim_job("j4", 0, 16, "q1", gpus=3, workers=3),
        sim_job("j5", 18, 31, "q0b", gpus=1, workers=3),
        sim_job("j6", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j7", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j8", 26, 15, "q0c", gpus=4, priority=1),
        sim_job("j9", 5, 1, "q0b", gpus=2, workers=3),
        sim_job("j10", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j11", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j12", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j13", 0, 1, "q0", gpus=0, preemptible=False),
        sim_job("j14", 1, 120, "q0c", gpus=3),
        sim_job("j15", 25, 1, "q0c", gpus=3),
        sim_job("j16", 0, 1, "q0a", gpus=0, preemptible=False),
        sim_job("j17", 0, 59, "q2", max_runtime=10.0, gpus=4, preemptible=False),
        sim_job("j18", 1, 36, "q0c", gpus=1, workers=3),
        sim_job("j19", 0, 2, "q0a", gpus=0, preemptible=False),
        sim_job("j20", 2, 26, "q0b", gpus=2, workers=2),
        sim_job("j21", 15, 21, "q2", gpus=2, preemptible=False),
    ],
    settings=SETTINGS,
)
