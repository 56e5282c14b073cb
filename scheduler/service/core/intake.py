"""Submissions in groups: concurrent submits share one trip through the lock and one transaction (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from scheduler.backends.base import ChecksWorkdirs
from scheduler.engine.explain import rejection
from scheduler.service.api.auth import Principal
from scheduler.service.api.errors import Conflict, Forbidden, Invalid, ServiceError
from scheduler.service.core import admission
from scheduler.service.core.interfaces import Submits
from scheduler.service.core.specs import JobSubmit
from scheduler.service.core.states import JobState
from scheduler.service.store import rows as store
from scheduler.service.store.db import audit, events, jobs

# The field of a job spec to fix when the engine says a job can never run.
REJECTED_FIELD = {
    "unknown_queue": "queue",
    "inner_queue": "queue",
    "unknown_pool": "pool",
    "worker_too_big": "gpus",
    "gang_too_big": "workers",
    "over_limit": "gpus",
    "over_quota": "preemptible",
    "no_mig_slice": "mig",
}


Answer = tuple[dict[str, Any], bool]  # the job as the API shows it; False when an idempotency key repeated


@dataclass(eq=False)
class Submission:
    who: Principal
    sub: JobSubmit
    done: bool = False
    result: Answer | None = None
    error: BaseException | None = None


class Intake:
    """Whoever arrives while no group is being written writes every submission waiting then (it leads); the
    others wait for their answer or for the next turn to lead. Under load a few dozen submissions share one
    commit; alone, a submission is written at once."""

    def __init__(self, core: Submits):
        self.core = core
        self._cv = threading.Condition()
        self._inbox: list[Submission] = []
        self._leading = False
        # The same for the API's event loop: one hop to a worker thread per group, not per request. Kept per
        # loop: a future may only be completed by its own loop (test clients run a loop per request).
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[Submission, asyncio.Future[Answer]]]] = {}

    async def submit_async(self, who: Principal, sub: JobSubmit) -> Answer:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        waiting = self._waiting.get(loop)
        if waiting is None:  # nobody drains for this loop: start a drain
            self._waiting[loop] = waiting = []
            loop.create_task(self._drain(loop))
        waiting.append((Submission(who, sub), answer))
        return await answer

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while group := self._waiting[loop]:
                self._waiting[loop] = []
                items = [item for item, _ in group]
                with contextlib.suppress(Exception):  # each submission carries its own error, answered below
                    await loop.run_in_executor(None, write, self.core, items)
                for item, answer in group:
                    if answer.done():  # its caller went away (a cancelled request): nobody to answer
                        continue
                    if item.error is not None:
                        answer.set_exception(item.error)
                    else:
                        assert item.result is not None
                        answer.set_result(item.result)
        finally:
            del self._waiting[loop]

    def submit(self, who: Principal, sub: JobSubmit) -> tuple[dict[str, Any], bool]:
        item = Submission(who, sub)
        batch: list[Submission] = []
        with self._cv:
            self._inbox.append(item)
            while not item.done and self._leading:
                self._cv.wait()
            if not item.done:
                self._leading = True
                batch, self._inbox = self._inbox, []
        if batch:
            try:
                write(self.core, batch)
            finally:
                with self._cv:
                    self._leading = False
                    self._cv.notify_all()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result


def write(core: Submits, batch: list[Submission]) -> None:
    """Check each submission, then store all that pass in one transaction and hand them to the engine."""
    try:
        _admit(core, batch)  # outside the lock: a policy hook may be slow, and must not hold up scheduling
        with core.lock:
            now = core.clock()
            fresh = _check(core, [i for i in batch if i.error is None])
            if fresh:
                _store(core, fresh, now)
        core.wake.set()
    except BaseException as e:  # the database failed: every submission not answered yet gets the error
        for item in batch:
            if item.error is None and item.result is None:  # keep answers already decided (403, a repeat)
                item.error = e
        raise
    finally:
        for item in batch:
            item.done = True


def _admit(core: Submits, batch: list[Submission]) -> None:
    """Who may submit where, and the admission policy (defaults filled in, or Invalid naming the rule; audited
    there). Before the idempotency check, so a retry compares like with like (both with defaults)."""
    for item in batch:
        who, sub = item.who, item.sub
        try:
            if not who.may_submit(core.tree, sub.queue):
                # For a scoped caller a missing queue answers the same: queue names do not leak across teams.
                raise Forbidden(f"{who.user} ({who.role}) may not submit to queue {sub.queue}", "queue")
            if sub.queue not in core.tree:
                raise Invalid(f"queue {sub.queue!r} does not exist", "queue")
            check_workdir(core, sub, who.user)
            item.sub = admission.check(core, who, sub)
        except ServiceError as e:
            item.error = e


def check_workdir(core: Submits, sub: JobSubmit, owner: str) -> None:
    """With the local backend a job runs on this machine, so a working directory that is not a directory here would
    only fail at launch, after waiting its turn: refuse it now (the docs promise a 422). Where jobs run as their
    users, the question is whether the owner's account may enter it, and the answer is the same for "missing" and
    "closed to you" (the service must not tell a member which of root's directories exist). Other backends run jobs
    in their own filesystems (an image, a Ray worker), which this machine cannot see."""
    if sub.workdir is None or core.settings.backend != "local":
        return
    if isinstance(core.executor, ChecksWorkdirs):
        ok = core.executor.may_use_workdir(owner, sub.workdir)
    else:
        try:
            ok = os.path.isdir(sub.workdir)
        except (OSError, ValueError):  # a name the OS refuses (too long for a path component)
            ok = False
    if not ok:
        raise Invalid(
            f"workdir {sub.workdir!r} is not a directory on this machine that {owner}'s jobs may enter: "
            "the job could not start in it",
            "workdir",
        )


def _check(core: Submits, batch: list[Submission]) -> list[Submission]:
    """Answer refusals and repeated idempotency keys at once; return the submissions to store."""
    pools = {p: ps.pool for p, ps in core.engine.pools.items()}
    keyed = {(i.who.user, i.sub.idempotency_key) for i in batch if i.sub.idempotency_key is not None}
    earlier: dict[tuple[str, str], dict[str, Any]] = {}
    if keyed:
        with core.db.connect() as conn:
            for user, k in keyed:
                row = (
                    conn.execute(sa.select(jobs).where(jobs.c.owner == user, jobs.c.idempotency_key == k))
                    .mappings()
                    .first()
                )
                if row is not None:
                    earlier[(user, k)] = store.job_view(row)
    fresh: list[Submission] = []
    for item in batch:
        who, sub = item.who, item.sub
        key = None if sub.idempotency_key is None else (who.user, sub.idempotency_key)
        try:
            if key is not None and key in earlier:
                first = earlier[key]
                _same_job(key[1], first["id"], first["spec"], sub)
                item.result = (first, False)
                continue
            why = rejection(sub.engine_spec(0, core.pool_of(sub.pool)), core.tree, pools)
            if why is not None:
                raise Invalid(why.message, REJECTED_FIELD.get(why.rule), store.reason_json(why))
        except ServiceError as e:
            item.error = e
            continue
        fresh.append(item)  # a key repeated inside this group is settled by _store
    return fresh


def _store(core: Submits, fresh: list[Submission], now: float) -> None:
    firsts: dict[tuple[str, str], Submission] = {}
    new: list[Submission] = []
    for item in fresh:
        key = item.sub.idempotency_key
        if key is not None and (item.who.user, key) in firsts:
            continue
        if key is not None:
            firsts[(item.who.user, key)] = item
        new.append(item)
    rows: list[dict[str, Any]] = [
        dict(
            name=i.sub.name,
            owner=i.who.user,
            queue=i.sub.queue,
            pool=core.pool_of(i.sub.pool),
            state=JobState.PENDING,
            spec=i.sub.model_dump(mode="json"),
            gpus=i.sub.workers * i.sub.gpus,
            priority=i.sub.priority,
            idempotency_key=i.sub.idempotency_key,
            submitted_at=now,
            attempt=0,
        )
        for i in new
    ]
    with core.changing() as conn:
        ids = conn.execute(jobs.insert().returning(jobs.c.id, sort_by_parameter_order=True), rows).scalars().all()
        conn.execute(
            events.insert(),
            [
                dict(
                    at=now,
                    job_id=j,
                    kind="submitted",
                    message=f"submitted to {r['queue']} by {r['owner']}",
                    data={"gpus": r["gpus"]},
                )
                for j, r in zip(ids, rows, strict=True)
            ],
        )
        conn.execute(
            audit.insert(),
            [
                dict(at=now, actor=r["owner"], action="job.submit", target=f"job {j}", detail={"queue": r["queue"]})
                for j, r in zip(ids, rows, strict=True)
            ],
        )
        for item, job_id, row in zip(new, ids, rows, strict=True):
            # Its id as its place in submission order: a rebuilt engine orders equal jobs the same way.
            core.engine.submit(item.sub.engine_spec(job_id, row["pool"]), now, seq=job_id)
            item.result = (
                store.job_view(
                    {**row, "id": job_id, "started_at": None, "ended_at": None, "exit_code": None, "reason": None}
                ),
                True,
            )
    for item in fresh:
        key = item.sub.idempotency_key
        if item.result is None and key is not None:
            first = firsts[(item.who.user, key)]
            assert first.result is not None
            try:  # the same key twice in one group: the same rule as across groups
                _same_job(key, first.result[0]["id"], first.sub.model_dump(mode="json"), item.sub)
                item.result = (first.result[0], False)
            except Conflict as e:
                item.error = e


def _same_job(key: str, first_id: int, first_spec: dict[str, Any], sub: JobSubmit) -> None:
    """Conflict unless `sub` asks for the job submitted first under `key` (env aside: views mask it)."""
    spec = sub.model_dump(mode="json")
    changed = sorted(f for f in set(first_spec) | set(spec) if f != "env" and first_spec.get(f) != spec.get(f))
    if changed:
        raise Conflict(
            f"idempotency key {key!r} was used for job {first_id} with other values of: "
            f"{', '.join(changed)}; use a new key for a different job",
            "idempotency_key",
            {"job": first_id, "fields": changed},
        )
