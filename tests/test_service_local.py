"""The service with the real local executor: jobs are processes that see exactly their GPUs, get SIGTERM when
preempted, and leave logs the API serves."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scheduler.backends.base import NodeInfo
from scheduler.backends.local import LocalExecutor
from scheduler.service.core.assemble import build_core
from tests.factories import service_settings
from tests.marks import starts_processes
from tests.restart_kit import Backend, issue_case, scripted_twin
from tests.service_kit import Service, gpus, make_service

SHOW_GPUS = "import os; print('gpus=' + os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CORRAL_QUEUE'])"
TRAP_TERM = """
import signal, sys, time
def stop(*_):
    print('checkpointed on SIGTERM', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print('training', flush=True)
while True:
    time.sleep(0.05)
"""


def until(svc: Service, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Cycle the service until `cond` holds (real processes take real time); fail after `timeout`."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail("condition not reached in time")
        svc.tick()
        time.sleep(0.02)


def state(svc: Service, jid: int) -> str:
    s: str = svc.admin.get(f"/v1/jobs/{jid}").json()["state"]
    return s


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture
@starts_processes  # real job processes
def local(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path / 'c.db'}", tmp_path, LocalExecutor(tmp_path / "runs"))


def submit(svc: Service, queue: str, gpus: int, command: Any, **kw: Any) -> int:
    r = svc.admin.post("/v1/jobs", json={"queue": queue, "gpus": gpus, "command": command, **kw})
    assert r.status_code == 201, r.text
    jid: int = r.json()["id"]
    return jid


def test_job_sees_exactly_its_gpus_and_logs_are_served(local: Service) -> None:
    first = submit(local, "ranking", 3, py(SHOW_GPUS))
    second = submit(local, "nlp", 2, py(SHOW_GPUS))
    until(local, lambda: state(local, first) == state(local, second) == "completed")
    # Both start in one cycle; nlp goes first (the lower ratio of usage to fair share), lowest indices first.
    assert local.admin.get(f"/v1/jobs/{second}/logs").text.strip() == "gpus=0,1 nlp"
    assert local.admin.get(f"/v1/jobs/{first}/logs").text.strip() == "gpus=2,3,4 ranking"


def test_shell_command_env_and_exit_code(local: Service) -> None:
    jid = submit(local, "nlp", 1, "echo $GREETING; exit 7", env={"GREETING": "hello"})
    until(local, lambda: state(local, jid) == "failed")
    got = local.admin.get(f"/v1/jobs/{jid}").json()
    assert got["exit_code"] == 7
    assert local.admin.get(f"/v1/jobs/{jid}/logs").text == "hello\n"


def test_preemption_sends_sigterm_and_the_preemptor_starts_after(local: Service) -> None:
    victim = submit(local, "ranking", 8, py(TRAP_TERM))
    until(local, lambda: "training" in local.admin.get(f"/v1/jobs/{victim}/logs").text)
    mine = submit(local, "nlp", 2, py(SHOW_GPUS))
    until(local, lambda: state(local, mine) == "completed")
    assert local.admin.get(f"/v1/jobs/{victim}/logs", params={"attempt": 1}).text == (
        "training\ncheckpointed on SIGTERM\n"
    )
    attempts = local.admin.get(f"/v1/jobs/{victim}").json()["attempts"]
    assert (attempts[0]["outcome"], attempts[0]["exit_code"]) == ("preempted", 0)
    # The victim is requeued and starts again in the GPUs nlp left.
    until(local, lambda: state(local, victim) == "running")
    local.admin.post(f"/v1/jobs/{victim}/cancel")
    until(local, lambda: not local.executor.alive(str(victim), 2))


def test_follow_streams_until_the_job_ends(local: Service) -> None:
    jid = submit(local, "nlp", 1, py("import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.1)"))
    until(local, lambda: state(local, jid) == "running")
    # The scheduling loop is not running in this test: poll exits from a thread while the follow streams.
    text = local.admin.get(f"/v1/jobs/{jid}/logs", params={"follow": True}).text
    assert text == "0\n1\n2\n"


def test_a_job_that_cannot_launch_fails_alone(local: Service, tmp_path: Path) -> None:
    # A missing workdir is refused at submission (422); one removed after it fails at launch, and alone.
    gone = tmp_path / "removed-after-submission"
    gone.mkdir()
    bad = submit(local, "nlp", 1, py(SHOW_GPUS), workdir=str(gone))
    gone.rmdir()
    good = submit(local, "nlp", 1, py(SHOW_GPUS))
    until(local, lambda: state(local, good) == "completed")
    got = local.admin.get(f"/v1/jobs/{bad}").json()
    assert (got["state"], got["reason"]["rule"]) == ("failed", "launch_failed")
    assert str(gone) in got["reason"]["message"]


@pytest.mark.integration  # real job processes
def test_a_restart_over_running_processes_decides_as_without_one(tmp_path: Path) -> None:
    """Issue 20 on real processes: the service is dropped without a stop while its jobs run and started again
    (a new executor adopts them by their pid files); demand and fair shares are those an engine built from scratch
    finds, and the team's job takes back the borrower's GPUs as a service never restarted decides (a scripted
    twin fed the same events)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    nodes = [NodeInfo("localhost", "local", gpus(8))]
    settings = service_settings(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", grace_s=5)
    real = Backend(
        lambda: build_core(settings, LocalExecutor(tmp_path / "runs"), nodes=nodes),
        "local",
        2,
        command=lambda name: f"while [ ! -e {marks / name} ] && [ ! -e {marks / 'all'} ]; do sleep 0.05; done",
        finish=lambda core, name: (marks / name).touch(),
        timeout_s=30,
    )
    try:
        restarted = issue_case(real, restart_it=True)
    finally:  # the jobs outlive a service dropped without a stop: end them, also when the test fails
        (marks / "all").touch()
    assert restarted == issue_case(scripted_twin(tmp_path, nodes, "local", 2), restart_it=False)
    assert ("Preempted", "b2") in restarted["decided"], restarted
