"""Launching admitted attempts several at once, for executors that allow it (LaunchesInParallel)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scheduler.backends.base import Exit, Handle, Launch, LaunchesInParallel
from scheduler.service.core import launching
from tests.service_kit import ScriptedExecutor, Service, make_service


@dataclass
class ParallelExecutor(ScriptedExecutor):
    """Each launch waits until three are in flight together: the cycle gets past them only if they ran at once."""

    launch_parallelism: int = 4
    together: threading.Barrier = field(default_factory=lambda: threading.Barrier(3, timeout=30))
    threads: set[str] = field(default_factory=set)

    def launch(self, launch: Launch) -> Handle:
        self.threads.add(threading.current_thread().name)
        if launch.env.get("FAIL"):
            raise OSError("no such image")
        self.together.wait()  # a BrokenBarrierError after 30 s would fail the cycle, not hang it
        return super().launch(launch)


def _one_cycle(
    tmp_path: Path, ex: ScriptedExecutor, envs: list[dict[str, str]]
) -> tuple[Service, list[int], dict[int, str]]:
    """One 1-GPU job per env, then one scheduling cycle: the service, the job ids, and every job's state."""
    svc = make_service(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, executor=ex)
    ids = [
        svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 1, "command": "x", "env": env}).json()["id"]
        for env in envs
    ]
    svc.tick()
    return svc, ids, {j["id"]: j["state"] for j in svc.admin.get("/v1/jobs").json()["jobs"]}


def test_admitted_attempts_launch_together_and_a_failure_stays_alone(tmp_path: Path) -> None:
    ex = ParallelExecutor()
    assert isinstance(ex, LaunchesInParallel)
    svc, ids, states = _one_cycle(tmp_path, ex, [{}, {}, {}, {"FAIL": "1"}])
    assert [states[i] for i in ids] == ["running", "running", "running", "failed"]
    assert len(ex.threads) > 1 and threading.current_thread().name not in ex.threads
    # Each got GPUs of its own: launched together, no GPU is in two of them.
    gpus = [(n, g) for la in ex.launched for n, gs in la.gpus.items() for g in gs]
    assert len(gpus) == len(set(gpus)) == 3


@dataclass
class FlakyExecutor(ScriptedExecutor):
    """Launches in parallel; the first launch of a job with DROP in its env fails like a dropped connection."""

    launch_parallelism: int = 4
    dropped: set[str] = field(default_factory=set)

    def launch(self, launch: Launch) -> Handle:
        if launch.env.get("DROP") and launch.job_id not in self.dropped:
            self.dropped.add(launch.job_id)
            raise RuntimeError("connection dropped")  # not an OSError: says nothing of what was done
        return super().launch(launch)


def test_a_launch_whose_outcome_is_unknown_is_tried_again_not_failed(tmp_path: Path) -> None:
    ex = FlakyExecutor()
    svc, ids, states = _one_cycle(tmp_path, ex, [{"DROP": "1"}, {}, {}])
    assert [states[i] for i in ids] == ["starting", "running", "running"]  # the others are recorded all the same
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{ids[0]}").json()["state"] == "running"
    assert [la.attempt for la in ex.launched if la.job_id == str(ids[0])] == [1]


def test_a_launch_reads_only_what_may_hold_its_gpus_not_every_running_attempt(tmp_path: Path) -> None:
    """The preemptor waits for its victims' processes (stopping); the attempts running meanwhile are not read:
    the launching cycle's cost does not grow with the jobs running (a third of the service's CPU in the
    Kubernetes benchmark, run 4, when it read them all)."""
    ex = ScriptedExecutor(exits_on_term=False)
    svc = make_service(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, executor=ex)
    for _ in range(8):  # ranking's quota is 4: it borrows the other 4
        svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 1, "command": "x"})
    svc.tick()
    mine = svc.admin.post("/v1/jobs", json={"queue": "nlp", "gpus": 2, "command": "x"}).json()["id"]
    svc.tick()
    states = [j["state"] for j in svc.admin.get("/v1/jobs").json()["jobs"]]
    assert sorted(states) == ["pending"] * 2 + ["running"] * 6 + ["starting"]
    engine = svc.core.db
    seen: list[tuple[str, Any]] = []

    def listen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(engine, "after_cursor_execute", listen)
    try:
        ready, waiting = launching._ready(svc.core)
    finally:
        sa.event.remove(engine, "after_cursor_execute", listen)
    assert (ready, waiting) == ([], True)  # its GPUs are still held by the two stopping victims
    with engine.connect() as conn:  # the rows each of its queries of the attempts returned
        read = sum(len(conn.exec_driver_sql(s, p).fetchall()) for s, p in seen if "FROM attempts" in s)
    assert read == 1 + 2  # the attempt to launch and the two stopping ones; none of the six running
    ex.exits_on_term = True
    svc.tick()  # the victims exit
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{mine}").json()["state"] == "running"


@dataclass
class GatedExecutor(ScriptedExecutor):
    """Each launch waits until the test opens the gate: the launch's network calls, held as long as the test likes."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def launch(self, launch: Launch) -> Handle:
        self.entered.set()
        assert self.gate.wait(30), "the gate was never opened"
        return super().launch(launch)


def _cycle_in_background(svc: Service) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            svc.tick()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    t = threading.Thread(target=run)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def test_submissions_go_on_while_a_launch_waits_on_the_cluster(tmp_path: Path) -> None:
    """The scheduling loop held the Core's lock through the launches' network calls, and every submission waited
    for them: under a stream of submissions, most of their time (Kubernetes benchmark)."""
    ex = GatedExecutor()
    svc = make_service(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, executor=ex)
    first = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 1, "command": "x"}).json()["id"]
    cycle = _cycle_in_background(svc)
    assert ex.entered.wait(30)
    # The launch is in flight: a submission, a read and a cancel of another job are answered meanwhile.
    r = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 1, "command": "x"})
    assert r.status_code == 201, r.text
    assert svc.admin.get(f"/v1/jobs/{first}").json()["state"] == "starting"
    assert svc.admin.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"
    ex.gate.set()
    cycle.join(30)
    assert not cycle.is_alive() and cycle.errors == []  # type: ignore[attr-defined]
    assert svc.admin.get(f"/v1/jobs/{first}").json()["state"] == "running"


def test_a_job_cancelled_while_it_launches_is_stopped_and_holds_its_gpus_until_gone(tmp_path: Path) -> None:
    ex = GatedExecutor(exits_on_term=False)
    svc = make_service(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, executor=ex)
    jid = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 8, "command": "x"}).json()["id"]
    cycle = _cycle_in_background(svc)
    assert ex.entered.wait(30)
    assert svc.admin.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "cancelled"
    ex.gate.set()
    cycle.join(30)
    assert not cycle.is_alive() and cycle.errors == []  # type: ignore[attr-defined]
    assert ex.terminated == [(str(jid), 1)]  # launched for an attempt that had ended: stopped
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert got["state"] == "cancelled"
    assert (got["attempts"][0]["state"], got["attempts"][0]["outcome"]) == ("stopping", "cancelled")
    # The engine freed the GPUs at the cancel, but its process still holds them: the next job waits for its exit.
    nxt = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 8, "command": "x"}).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{nxt}").json()["state"] == "starting"
    assert [la.job_id for la in ex.launched] == [str(jid)]
    svc.clock.advance(31)  # past the grace period: SIGKILL, and the exit is recorded
    svc.tick()
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert (got["state"], got["attempts"][0]["state"]) == ("cancelled", "ended")
    assert svc.admin.get(f"/v1/jobs/{nxt}").json()["state"] == "running"


@dataclass
class EndsWhileLaunching(ScriptedExecutor):
    """The process ends during its own launch call, which then waits for the gate; `polled` is set once another
    cycle has read that exit."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    polled: threading.Event = field(default_factory=threading.Event)

    def launch(self, launch: Launch) -> Handle:
        handle = super().launch(launch)
        if not self.entered.is_set():
            self.exit(launch.job_id, 0, launch.attempt)
            self.entered.set()
            assert self.gate.wait(30), "the gate was never opened"
        return handle

    def poll(self, now: float) -> list[Exit]:
        out = super().poll(now)
        if out and self.entered.is_set():
            self.polled.set()
        return out


def test_an_exit_read_while_its_launch_is_in_flight_waits_for_the_launch_to_be_recorded(tmp_path: Path) -> None:
    """A cycle run meanwhile (a sandbox's, from an API thread) read the exit while the attempt was still starting in
    the database: it ended the job, then the launch's record put the attempt back to stopping, where nothing ever
    ended it, and every later job on its GPUs waited forever (review of the unlocked launch phase)."""
    ex = EndsWhileLaunching()
    svc = make_service(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, executor=ex)
    jid = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 8, "command": "x"}).json()["id"]
    launching_cycle = _cycle_in_background(svc)
    assert ex.entered.wait(30)
    other = _cycle_in_background(svc)  # holds the Core's lock while it reads exits; then waits for the launch phase
    assert ex.polled.wait(30)
    ex.gate.set()
    for t in (launching_cycle, other):
        t.join(30)
        assert not t.is_alive() and t.errors == []  # type: ignore[attr-defined]
    svc.tick()
    got = svc.admin.get(f"/v1/jobs/{jid}").json()
    assert (got["state"], got["attempts"][0]["state"], got["attempts"][0]["exit_code"]) == ("completed", "ended", 0)
    nxt = svc.admin.post("/v1/jobs", json={"queue": "ranking", "gpus": 8, "command": "x"}).json()["id"]
    svc.tick()
    assert svc.admin.get(f"/v1/jobs/{nxt}").json()["state"] == "running"
