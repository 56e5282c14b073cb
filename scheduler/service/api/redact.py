"""Other teams' job ids, out of what a caller reads.

The engine's reasons name the jobs they are about ("preempted by job-12", "job-9 needs 2"), and a job's events keep
them (`by`). Another team's job answers 404 like a missing one, so its id must not show up in the caller's own jobs'
reasons either: every id the caller may not read becomes "a job of another team", the same way in explain, events,
job lists and sandbox refusals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from scheduler.service.api.auth import Principal
from scheduler.service.store.db import jobs

if TYPE_CHECKING:
    from scheduler.service.core.loop import Core

JOB_REF = re.compile(r"\bjob-(\d+)\b")  # how the engine names jobs (specs.engine_id)
HIDDEN = "a job of another team"
ID_FIELDS = ("by",)  # event data fields that hold a job's id as a number


class Redactor:
    """Redacts for one caller: ids it may read stay, others are replaced. Which ids it may read is looked up once
    for everything given to `learn` (one query), so a list of jobs costs one look-up, not one per job."""

    def __init__(self, core: Core, conn: Connection, who: Principal) -> None:
        self.core, self.conn, self.who = core, conn, who
        self.everything = who.admin or who.scope is None  # reads every job: nothing to hide
        self.readable: dict[int, bool] = {}

    def learn(self, values: Iterable[Any]) -> None:
        """Look up, at once, every job id named in `values` (strings anywhere inside, and events' `by`)."""
        if self.everything:
            return
        ids = {i for v in values for i in _ids(v)} - self.readable.keys()
        if not ids:
            return
        found = {
            r["id"]: (r["queue"], r["owner"])
            for r in self.conn.execute(
                sa.select(jobs.c.id, jobs.c.queue, jobs.c.owner).where(jobs.c.id.in_(sorted(ids)))
            ).mappings()
        }
        with self.core.lock:  # the tree changes under the lock
            tree = self.core.tree
            for i in ids:
                self.readable[i] = i in found and self.who.may_read_job(tree, *found[i])

    def may_read(self, job_id: int) -> bool:
        if self.everything:
            return True
        if job_id not in self.readable:
            self.learn([{"by": job_id}])
        return self.readable[job_id]

    def value(self, v: Any) -> Any:
        """`v` (a reason, an event's data, a message) with unreadable job ids replaced."""
        if self.everything:
            return v
        self.learn([v])
        return self._redact(v)

    def _redact(self, v: Any) -> Any:
        if isinstance(v, str):
            return JOB_REF.sub(lambda m: m.group(0) if self.readable.get(int(m.group(1))) else HIDDEN, v)
        if isinstance(v, dict):
            return {
                k: (
                    HIDDEN
                    if k in ID_FIELDS and isinstance(x, int) and not isinstance(x, bool) and not self.readable.get(x)
                    else self._redact(x)
                )
                for k, x in v.items()
            }
        if isinstance(v, list):
            return [self._redact(x) for x in v]
        return v


def _ids(v: Any) -> Iterable[int]:
    if isinstance(v, str):
        yield from (int(m) for m in JOB_REF.findall(v))
    elif isinstance(v, dict):
        for k, x in v.items():
            if k in ID_FIELDS and isinstance(x, int) and not isinstance(x, bool):
                yield x
            else:
                yield from _ids(x)
    elif isinstance(v, list):
        for x in v:
            yield from _ids(x)
