"""The narrow interfaces through which the scheduling loop's parts reach the Core: each part depends on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine, RowMapping

from quotas import QueueTree
from sandbox.culling import IdleTracker
from scheduler.admission.rules import AdmissionPolicy
from scheduler.backends.base import Executor, Exit
from scheduler.engine import Engine as Scheduler
from scheduler.engine.decisions import Decision
from scheduler.engine.model import Settings
from scheduler.service.api.auth import Principal
from scheduler.service.core.cluster_state import ClusterState
from scheduler.service.core.leader import Leadership
from scheduler.service.core.settings import ServiceSettings

Stop = tuple[int, int, float]  # (job id, attempt, grace in seconds): an attempt the executor stops after the commit


class Service(Protocol):
    """What every part reads: the settings, the database, the executor, the clock, the lock and the cluster's state."""

    @property
    def settings(self) -> ServiceSettings: ...
    @property
    def db(self) -> Engine: ...
    @property
    def executor(self) -> Executor: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def lock(self) -> threading.RLock: ...
    @property
    def cluster(self) -> ClusterState: ...

    def writing(self) -> AbstractContextManager[Connection]:
        """A transaction that commits only while this instance leads (see Core.writing)."""
        ...


class Scheduling(Service, Protocol):
    """The engine and the queue tree in force, and transactions for changes the engine has made in memory."""

    @property
    def engine(self) -> Scheduler: ...
    @property
    def tree(self) -> QueueTree: ...

    def changing(self) -> AbstractContextManager[Connection]:
        """A transaction whose failure rebuilds the engine from the database (see Core.changing)."""
        ...


class RecordsDecisions(Protocol):
    def record(self, conn: Connection, d: Decision, now: float) -> list[Stop]:
        """Write an engine decision with its effects; the attempts to stop once it commits."""
        ...


class StopsAttempts(Protocol):
    def terminate(self, stops: Iterable[Stop], now: float) -> None:
        """Have the executor stop these attempts (after the commit that recorded why)."""
        ...


class EndsJobs(Protocol):
    def engine_end(self, job_id: int, now: float, failed: bool | None) -> None:
        """The engine frees the job's GPUs (cancelled when `failed` is None) and forgets it."""
        ...


class EndsAttempts(Protocol):
    def end_attempt(
        self,
        conn: Connection,
        job: RowMapping,
        a: Mapping[Any, Any],
        code: int | None,
        detail: str,
        now: float,
        engine: bool = True,
    ) -> None:
        """An attempt's process is gone: record it, and the job's end if it was the running attempt."""
        ...


class Invalidates(Protocol):
    def invalidate(self) -> None:
        """The engine no longer matches the database: the next cycle rebuilds it."""
        ...

    def refresh(self) -> None:
        """Rebuild the engine from the database now (it matches again)."""
        ...


class Cancels(Protocol):
    def cancel(self, who: Principal, job_id: int, reason: dict[str, Any] | None = None) -> dict[str, Any]: ...


class Admits(Scheduling, Protocol):
    """What the admission policies need (scheduler/service/core/admission.py): the policy in force is kept here."""

    policy: tuple[int, AdmissionPolicy] | None  # (version, policy) in force; None until first read


class Submits(Admits, Protocol):
    """What the intake needs (scheduler/service/core/intake.py) to check, store and hand submissions to the engine."""

    @property
    def wake(self) -> threading.Event: ...

    def pool_of(self, asked: str | None) -> str: ...


class SyncsCluster(Submits, RecordsDecisions, StopsAttempts, Invalidates, Cancels, Protocol):
    """What cluster_sync needs: node changes become decisions, arrivals become submissions."""


class Launches(Scheduling, EndsJobs, Protocol):
    """What launching needs: launches are recorded, an exit found at launch is handed to the next cycle."""

    runtime_due: float  # no max_runtime runs out before this time
    launch_owed: bool  # an admitted attempt may wait for its launch
    launch_lock: threading.Lock  # one launch phase at a time; taken before the lock, never while holding it
    # (job id, attempt) whose launch call has not been recorded yet: an exit the executor reports for one meanwhile
    # waits for that record (judged before it, the attempt would look never launched, or end twice)
    in_flight: set[tuple[int, int]]

    def note_exit(self, ended: Exit) -> None:
        """An exit the executor will not report again: the next cycle records it."""
        ...


class Culls(Service, Cancels, Protocol):
    """What the idle-GPU culler needs (scheduler/service/core/culler.py)."""

    @property
    def idle(self) -> IdleTracker: ...


class Rebuilds(Service, EndsAttempts, Protocol):
    """What recovery at start and the engine's rebuild read (scheduler/service/core/rebuild.py)."""

    @property
    def engine_settings(self) -> Settings: ...


class ChecksBindings(Scheduling, Protocol):
    """What the check of others' work on Corral's nodes needs (scheduler/service/core/outside.py)."""

    @property
    def leadership(self) -> Leadership | None: ...
    @property
    def started(self) -> bool: ...
