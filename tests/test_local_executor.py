"""The local executor with real processes: GPUs, env, exit codes, termination, and adoption after a restart.

The service's clock is injected (`now`); real waiting is only the few milliseconds processes need, bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scheduler.backends import shim
from scheduler.backends.base import Exit, Handle, Launch
from scheduler.backends.local import KILLED_AFTER_GRACE, VANISHED_WHILE_DOWN, LocalExecutor

PY = sys.executable
SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
TRAPS_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('bye', flush=True), sys.exit(0)))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORES_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a process")
        time.sleep(0.01)


def wait_exit(ex: LocalExecutor, now: float = 0.0) -> Exit:
    found: list[Exit] = []

    def ended() -> bool:
        found.extend(ex.poll(now))
        return bool(found)

    wait_for(ended)
    assert len(found) == 1
    return found[0]


def stdout(ex: LocalExecutor, job: str, attempt: int = 1) -> str:
    return Path(ex.logs(job, attempt)[0]).read_text()


@pytest.fixture
def ex(tmp_path: Path) -> Iterator[LocalExecutor]:
    executor = LocalExecutor(tmp_path / "runs")
    yield executor
    # Leave no process behind, whichever executor started it, and reap what this one started.
    pidfiles = list((tmp_path / "runs").glob("*/*/pid"))
    for pidfile in pidfiles:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
    wait_for(lambda: not any(executor.alive(p.parent.parent.name, int(p.parent.name)) for p in pidfiles))


def run(ex: LocalExecutor, job: str, command: list[str] | str, **kw: object) -> Handle:
    return ex.launch(Launch(job_id=job, attempt=1, command=command, **kw))  # type: ignore[arg-type]


def test_job_sees_exactly_its_gpus(ex: LocalExecutor) -> None:
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'])"
    # The job's own env must not widen what the scheduler gave it.
    run(ex, "j", [PY, "-c", code], gpus={"local": [1, 3]}, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert wait_exit(ex) == Exit("j", 1, 0)
    assert stdout(ex, "j").split() == ["1,3", "PCI_BUS_ID"]


def test_cpu_job_sees_no_gpu(ex: LocalExecutor) -> None:
    run(ex, "cpu", "printf '[%s]' \"$CUDA_VISIBLE_DEVICES\"", gpus={})
    assert wait_exit(ex).code == 0
    assert stdout(ex, "cpu") == "[]"


def test_env_workdir_and_ids(ex: LocalExecutor, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run(ex, "e", 'echo "$FOO $CORRAL_JOB_ID $CORRAL_ATTEMPT"; pwd', env={"FOO": "bar"}, workdir=str(work), gpus={})
    assert wait_exit(ex).code == 0
    assert stdout(ex, "e").splitlines() == ["bar e 1", str(work)]
    assert os.environ.get("FOO") != "bar"  # the server's own environment is untouched


def test_default_workdir_is_the_run_directory(ex: LocalExecutor) -> None:
    run(ex, "d", ["pwd"], gpus={})  # a one-element argv goes through the shell too
    wait_exit(ex)
    assert stdout(ex, "d").strip() == str(ex.rundir("d", 1))
    assert Path(ex.logs("d", 1)[1]).parent == ex.rundir("d", 1)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_recorded_and_reported_once(ex: LocalExecutor, code: int) -> None:
    run(ex, "x", [PY, "-c", f"import sys; print('out'); print('err', file=sys.stderr); sys.exit({code})"], gpus={})
    assert wait_exit(ex) == Exit("x", 1, code)
    assert ex.poll(0.0) == []
    assert not ex.alive("x", 1)
    out, err = ex.logs("x", 1)
    assert (Path(out).read_text(), Path(err).read_text()) == ("out\n", "err\n")


def test_missing_program_is_exit_127(ex: LocalExecutor) -> None:
    run(ex, "m", ["/no/such/program", "arg"], gpus={})
    assert wait_exit(ex).code == 127
    assert "cannot run" in Path(ex.logs("m", 1)[1]).read_text()


def test_terminate_lets_a_trapping_job_exit_cleanly(ex: LocalExecutor) -> None:
    run(ex, "t", [PY, "-c", TRAPS_TERM], gpus={})
    wait_for(lambda: "ready" in stdout(ex, "t"))
    ex.terminate("t", 1, grace_s=30.0, now=0.0)
    assert wait_exit(ex, now=1.0) == Exit("t", 1, 0)
    assert stdout(ex, "t") == "ready\nbye\n"  # one SIGTERM only: the shim does not echo its own copy


def test_sigkill_after_grace_for_a_job_ignoring_sigterm(ex: LocalExecutor) -> None:
    run(ex, "k", [PY, "-c", IGNORES_TERM], gpus={})
    wait_for(lambda: "ready" in stdout(ex, "k"))
    ex.terminate("k", 1, grace_s=5.0, now=0.0)
    time.sleep(0.05)  # give SIGTERM time to (not) work
    assert ex.poll(now=4.9) == []
    assert ex.alive("k", 1)
    assert wait_exit(ex, now=6.0) == Exit("k", 1, -signal.SIGKILL, KILLED_AFTER_GRACE)


def test_terminate_right_after_launch(ex: LocalExecutor) -> None:
    # Whether SIGTERM lands before the shim's handler, before the job starts, or in the job: -15 each time.
    run(ex, "early", [PY, "-c", SLEEPER], gpus={})
    ex.terminate("early", 1, grace_s=30.0, now=0.0)
    assert wait_exit(ex, now=0.0).code == -signal.SIGTERM


def test_leftover_processes_are_killed_when_the_job_ends(ex: LocalExecutor) -> None:
    run(ex, "bg", "sleep 60 & echo $!", gpus={})
    assert wait_exit(ex).code == 0
    straggler = int(stdout(ex, "bg"))
    wait_for(lambda: (shim.read_stat(straggler) or ("Z", 0))[0] == "Z")


def test_adopt_after_restart(ex: LocalExecutor) -> None:
    running = run(ex, "run", [PY, "-c", SLEEPER], gpus={})
    done = run(ex, "done", [PY, "-c", "raise SystemExit(5)"], gpus={})
    wait_for(lambda: "ready" in stdout(ex, "run"))
    wait_for(lambda: (ex.rundir("done", 1) / shim.EXIT_FILE).exists())

    again = LocalExecutor(ex.root)  # the restarted server: none of these processes are its children
    assert again.adopt(running) is None
    assert again.alive("run", 1)
    assert again.adopt(done) == Exit("done", 1, 5, "ended while Corral was down")

    again.terminate("run", 1, grace_s=30.0, now=100.0)
    assert wait_exit(again, now=101.0) == Exit("run", 1, -signal.SIGTERM)


def test_adopt_a_vanished_attempt(ex: LocalExecutor) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    ex.rundir("v", 1).mkdir(parents=True)
    assert ex.adopt(Handle("v", 1, dead.pid, 1.0)) == Exit("v", 1, None, VANISHED_WHILE_DOWN)
    assert not ex.alive("v", 1)


def test_adopt_guards_against_pid_reuse(ex: LocalExecutor) -> None:
    ex.rundir("reuse", 1).mkdir(parents=True)
    stat = shim.read_stat(os.getpid())
    assert stat is not None
    # Our own pid is alive, but it started at another time: not the job's process.
    assert ex.adopt(Handle("reuse", 1, os.getpid(), stat[1] + 1.0)) == Exit("reuse", 1, None, VANISHED_WHILE_DOWN)


def test_adopt_without_pid_reads_the_pid_file(ex: LocalExecutor) -> None:
    real = run(ex, "np", [PY, "-c", SLEEPER], gpus={})
    wait_for(lambda: "ready" in stdout(ex, "np"))
    again = LocalExecutor(ex.root)
    assert again.adopt(Handle("np", 1, None, 0.0)) is None  # crashed before the pid was recorded
    assert again.alive("np", 1)
    assert real.pid is not None
    os.killpg(real.pid, signal.SIGKILL)
    assert wait_exit(again).code is None  # no exit file: the shim was killed too

    # Never started at all: no pid file either.
    ex.rundir("never", 1).mkdir(parents=True)
    assert again.adopt(Handle("never", 1, None, 0.0)) == Exit("never", 1, None, VANISHED_WHILE_DOWN)


def test_launch_refuses_bad_input(ex: LocalExecutor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run directory"):
        run(ex, "../escape", ["true"], gpus={})
    with pytest.raises(ValueError, match="one node"):
        run(ex, "multi", ["true"], gpus={"a": [0], "b": [0]})
    with pytest.raises(ValueError, match="empty command"):
        run(ex, "empty", [], gpus={})
    with pytest.raises(ValueError, match="workdir"):
        run(ex, "wd", ["true"], gpus={}, workdir=str(tmp_path / "missing"))
    run(ex, "twice", ["true"], gpus={})
    wait_for(lambda: (ex.rundir("twice", 1) / shim.PID_FILE).exists())
    with pytest.raises(FileExistsError):
        run(ex, "twice", ["true"], gpus={})


def test_shim_usage() -> None:
    assert shim.main([]) == 2
    assert shim.main(["/tmp", "true"]) == 2
