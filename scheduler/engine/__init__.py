"""The pure scheduling engine: snapshot and events in, decisions with reasons out (SCHEDULING.md)."""

from scheduler.engine.decisions import Decision, Preempted, Rejected, Started
from scheduler.engine.engine import Engine
from scheduler.engine.model import Job, JobSpec, JobState, NodeSpec, Reason, Settings

__all__ = [
    "Decision",
    "Engine",
    "Job",
    "JobSpec",
    "JobState",
    "NodeSpec",
    "Preempted",
    "Reason",
    "Rejected",
    "Settings",
    "Started",
]
