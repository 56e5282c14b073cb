"""The pieces of high availability (scheduler/service/core/leader.py, ha.py, forward.py) on a real PostgreSQL server and
SQLite file, with a clock the test moves: the fence, stepping down, one instance per SQLite database. The whole of
it, two `corral serve` processes on the test control plane: tests/test_ha_k8s.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler.service.core.ha import AlreadyRunning, single
from scheduler.service.core.leader import Fenced, Leadership, PostgresFence, SqliteFence
from scheduler.service.store.db import jobs, leadership, migrate
from tests.factories import service_settings
from tests.k8s_kit import free_port
from tests.marks import starts_processes
from tests.service_kit import database_url


@pytest.fixture
@starts_processes
def pg(tmp_path: Path) -> Iterator[str]:
    for url in database_url("postgresql", tmp_path):
        migrate(url)
        yield url


def epoch(url: str) -> int:
    with sa.create_engine(url).connect() as conn:
        return int(conn.execute(sa.select(leadership.c.epoch)).scalar_one())


def test_one_fence_at_a_time_and_the_next_one_fences_the_old(pg: str) -> None:
    a, b = PostgresFence(pg, "a", "http://a:8265"), PostgresFence(pg, "b", "http://b:8265")
    assert a.try_acquire() and not b.try_acquire()
    assert a.leader_url() == b.leader_url() == "http://a:8265" and a.alive()
    db = sa.create_engine(pg)
    with db.begin() as conn:  # a decision transaction of the leader: allowed
        a.check(conn)
    # The leader's lock session dies (its process was killed): PostgreSQL releases the lock, b takes it.
    assert a.conn is not None
    pid = a.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with db.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    assert not a.alive()
    assert b.try_acquire() and b.epoch == a.epoch + 1 == epoch(pg)  # type: ignore[operator]
    with pytest.raises(Fenced, match="no longer the leader"), db.begin() as conn:  # a's late write: refused
        a.check(conn)
        conn.execute(jobs.delete())
    with db.begin() as conn:
        b.check(conn)
    b.release()


def test_a_new_leader_waits_for_the_old_ones_decision_in_flight(pg: str) -> None:
    """The bump of the epoch waits for a transaction that read it FOR SHARE: a decision that passed the check
    commits before the next leader's first, never after."""
    a = PostgresFence(pg, "a", None)
    assert a.try_acquire()
    db = sa.create_engine(pg)
    conn = db.connect()
    tx = conn.begin()
    a.check(conn)  # in flight: checked, not committed yet
    b = PostgresFence(pg, "b", None)
    a.release()  # the lock passes, but the epoch row is still read-locked by a's transaction
    took: list[bool] = []
    t = threading.Thread(target=lambda: took.append(b.try_acquire()))
    t.start()
    t.join(1.5)
    assert t.is_alive() and not took  # waiting on a's transaction
    tx.commit()
    conn.close()
    t.join(10)
    assert took == [True]
    b.release()


def test_a_leader_that_cannot_renew_stops_acting_within_the_deadline_and_steps_down() -> None:
    t = [0.0]
    lost: list[bool] = []

    class Flaky:
        ok = True

        def try_acquire_or_renew(self) -> bool:
            if not self.ok:
                raise ConnectionError("the API server is away")
            return True

    class Held:
        def try_acquire(self) -> bool:
            return True

        def alive(self) -> bool:
            return True

        def check(self, conn: object) -> None:
            pass

        def leader_url(self) -> str | None:
            return None

        def release(self) -> None:
            pass

    lease = Flaky()
    ld = Leadership(
        Held(), lease, retry_s=2, renew_deadline_s=10, on_lost=lambda: lost.append(True), clock=lambda: t[0]
    )
    ld.step()
    assert ld.acting()
    lease.ok = False  # cut off from the API server
    for _ in range(4):
        t[0] += 2
        ld.step()
        assert ld.acting() and not lost  # within the deadline
    t[0] += 2.5  # 10.5 s after the last renewal: no more binds or decisions
    assert not ld.acting()
    with pytest.raises(Fenced):
        ld.check_bind()
    ld.step()
    assert lost == [True] and not ld.leading.is_set()


def test_on_sqlite_a_second_instance_refuses_to_start(tmp_path: Path) -> None:
    settings = service_settings(tmp_path)
    first = single(settings)
    assert isinstance(first, SqliteFence)
    with pytest.raises(AlreadyRunning, match="another Corral instance uses the SQLite database"):
        single(settings)
    first.release()
    again = single(settings)  # the first is gone: the next may start
    assert again is not None
    again.release()


@pytest.mark.integration
def test_corral_serve_refuses_a_second_instance_on_one_sqlite_file(tmp_path: Path) -> None:
    corral = str(Path(sys.executable).parent / "corral")
    env = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_RUN_AS": "service", "CORRAL_GPUS": "1"}
    port = free_port()
    first = subprocess.Popen(
        [corral, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            time.sleep(0.3)
        second = subprocess.run(
            [corral, "serve", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "another Corral instance uses the SQLite database" in second.stderr
    finally:
        first.terminate()
        first.wait(20)
