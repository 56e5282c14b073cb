"""High availability: which of several Corral instances schedules, and the fence that keeps a deposed one from acting.

- Fence (every backend): on PostgreSQL, a session-level advisory lock held on a connection of its own; taking it
  bumps the `leadership` row's epoch (the fencing token) and records where the leader answers. Every decision
  transaction reads the epoch FOR SHARE (`check`) and fails unless it is still this instance's: the next leader's
  bump waits for such a transaction to commit, and any transaction after it fails. The lock is released by PostgreSQL
  when the holder's session ends (a killed process at once; a cut network after TCP keepalives, about 15 s). On
  SQLite there is one instance: an exclusive lock on a file beside the database, and a second instance refuses to
  start.
- Lease (backend kubernetes; scheduler/backends/kubernetes/lease.py): a coordination.k8s.io Lease, as Kubernetes' own
  controllers use.
- Leadership runs both in a thread. Leading needs the lease (where there is one) and then the fence; the leader acts
  (decides, binds) only while its last successful renewal of both is younger than `renew_deadline_s`, shorter than
  `lease_s`, so it stops before another can take the lease. Once that passes it steps down for good (`on_lost`: the
  process exits and its supervisor starts it again as a follower, with nothing stale in memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from scheduler.service.store.db import leadership

log = logging.getLogger("corral.service")
LOCK_KEY = 0x636F7272616C  # "corral": the advisory lock's key, the same for every instance of one database
KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "connect_timeout": 5,
}


class Fenced(RuntimeError):
    """This instance no longer leads: what it was about to write or bind must not happen."""


def identity() -> str:
    """This instance's name in the lease and the leadership row: host, pid and a random part (a restarted process
    with the same pid is another instance)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Fence(Protocol):
    def try_acquire(self) -> bool: ...
    def alive(self) -> bool: ...
    def check(self, conn: Connection) -> None: ...
    def leader_url(self) -> str | None: ...
    def release(self) -> None: ...


class PostgresFence:
    """The advisory lock and the epoch (see the module's docstring)."""

    def __init__(self, url: str, me: str, advertise_url: str | None, clock: Callable[[], float] = time.time) -> None:
        self.engine = sa.create_engine(url, poolclass=NullPool, connect_args=KEEPALIVE, hide_parameters=True)
        self.me, self.url, self.clock = me, advertise_url, clock
        self.conn: Connection | None = None
        self.epoch: int | None = None

    def try_acquire(self) -> bool:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            # The server notices a vanished holder as quickly as the client does (its own keepalives, per session).
            conn.exec_driver_sql(
                "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3"
            )
            if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar_one():
                conn.close()
                return False
            epoch = conn.execute(
                leadership.update()
                .where(leadership.c.id == 1)
                .values(epoch=leadership.c.epoch + 1, holder=self.me, url=self.url, since=self.clock())
                .returning(leadership.c.epoch)
            ).scalar_one()
        except Exception:
            conn.close()
            raise
        self.conn, self.epoch = conn, int(epoch)
        log.info("leading: advisory lock held, epoch %d", self.epoch)
        return True

    def alive(self) -> bool:
        """The lock's session still answers (so PostgreSQL still holds the lock for it)."""
        if self.conn is None:
            return False
        try:
            self.conn.exec_driver_sql("SELECT 1")
            return True
        except Exception as e:
            log.error("the advisory lock's session failed: %s", e)
            return False

    def check(self, conn: Connection) -> None:
        """In a decision transaction: the epoch is still ours (read FOR SHARE: the next leader's bump waits for it)."""
        epoch = conn.execute(
            sa.select(leadership.c.epoch).where(leadership.c.id == 1).with_for_update(read=True)
        ).scalar_one_or_none()
        if self.epoch is None or epoch != self.epoch:
            raise Fenced(f"no longer the leader (epoch {epoch}, ours {self.epoch})")

    def leader_url(self) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leadership.c.url, leadership.c.holder).where(leadership.c.id == 1)).first()
        return row.url if row is not None and row.holder else None

    def release(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn, self.epoch = None, None


class SqliteFence:
    """One instance per SQLite database: an exclusive lock on `<database>.lock`, taken at start or never."""

    def __init__(self, database: str) -> None:
        self.path = Path(database + ".lock")
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def alive(self) -> bool:
        return self.fd is not None

    def check(self, conn: Connection) -> None:
        pass  # nobody else can hold the file lock while this process lives

    def leader_url(self) -> str | None:
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Renews(Protocol):
    """A lease held while renewed (backends.kubernetes.lease.Lease)."""

    def try_acquire_or_renew(self) -> bool: ...


class Leadership:
    """Runs the election in a daemon thread; `acting()` says whether this instance may decide and bind now."""

    def __init__(
        self,
        fence: Fence,
        lease: Renews | None = None,
        retry_s: float = 2.0,
        renew_deadline_s: float = 10.0,
        on_lead: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fence, self.lease, self.retry_s, self.renew_deadline_s = fence, lease, retry_s, renew_deadline_s
        self.on_lead, self.on_lost, self.clock = on_lead, on_lost, clock
        self.leading = threading.Event()
        self.valid_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-leader", daemon=True)

    def start(self) -> Leadership:
        self._thread.start()
        return self

    def acting(self) -> bool:
        return self.leading.is_set() and self.clock() < self.valid_until

    def check(self, conn: Connection) -> None:
        """For every decision transaction: still leading, and the fence's epoch still ours."""
        if not self.acting():
            raise Fenced("not the leader now")
        self.fence.check(conn)

    def check_bind(self) -> None:
        """Before every bind: still leading, renewed within the renew deadline."""
        if not self.acting():
            raise Fenced("not the leader now: no binds")

    def step(self) -> None:
        """One round: try to lead, or renew; step down once renewals failed for renew_deadline_s."""
        started = self.clock()
        if not self.leading.is_set():
            if (self.lease is None or self._quietly(self.lease.try_acquire_or_renew)) and self._quietly(
                self.fence.try_acquire
            ):
                self.valid_until = started + self.renew_deadline_s
                self.leading.set()
                self.on_lead()
            return
        renewed = (self.lease is None or self._quietly(self.lease.try_acquire_or_renew)) and self.fence.alive()
        if renewed:
            self.valid_until = started + self.renew_deadline_s
        elif self.clock() >= self.valid_until:
            log.error("lost the lead: no renewal for %g s; stepping down", self.renew_deadline_s)
            self.leading.clear()
            self.fence.release()
            self.on_lost()

    @staticmethod
    def _quietly(call: Callable[[], bool]) -> bool:
        try:
            return call()
        except Exception as e:  # the API server or the database away: not leading this round
            log.warning("leader election: %s", e)
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.retry_s)

    def close(self) -> None:
        self._stop.set()
        if self.leading.is_set():
            self.leading.clear()
            self.fence.release()
