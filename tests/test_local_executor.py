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
from scheduler.backends.local import KILLED_AFTER_GRACE, VANISHED_WHILE_DOWN, LocalExecutor, group_leftovers
from tests import attack_kit

pytestmark = pytest.mark.integration  # real job processes

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


def test_default_workdir_is_the_output_directory(ex: LocalExecutor) -> None:
    run(ex, "d", ['pwd; echo "$CORRAL_OUTPUT_DIR"'], gpus={})  # a one-element argv goes through the shell too
    wait_exit(ex)
    out = ex.output_dir("d", 1)
    assert stdout(ex, "d").splitlines() == [str(out), str(out)]
    assert out.parent == ex.rundir("d", 1) == Path(ex.logs("d", 1)[1]).parent
    assert out.stat().st_mode & 0o777 == 0o700
    assert Path(ex.logs("d", 1)[0]).stat().st_mode & 0o777 == 0o600  # logs are the service's to serve


def test_a_notebooks_files_outlive_its_server_in_the_users_home(tmp_path: Path) -> None:
    """Single-user: a sandbox opens in homes/<user>, not its run directory, so what the user saved in one attempt
    is there in the next (a stop and start of the server); a batch job still starts in its output directory."""
    ex = LocalExecutor(tmp_path / "runs", homes=tmp_path / "home")
    sandbox = {"CORRAL_KIND": "sandbox"}
    write = "import os; open('analysis.ipynb', 'w').write('{}'); print(os.getcwd())"
    ex.launch(Launch("7", 1, [PY, "-c", write], {}, env=sandbox, owner="alice"))
    assert wait_exit(ex).code == 0
    home = tmp_path / "home" / "alice"
    assert stdout(ex, "7", 1).strip() == str(home)
    ex.launch(Launch("7", 2, [PY, "-c", "import os; print(sorted(os.listdir('.')))"], {}, env=sandbox, owner="alice"))
    assert wait_exit(ex).code == 0
    assert stdout(ex, "7", 2).strip() == "['analysis.ipynb']"  # not pid, stdout.log, stderr.log
    ex.launch(Launch("8", 1, [PY, "-c", "import os; print(os.getcwd())"], {}, env=sandbox, owner="../bob"))
    assert wait_exit(ex).code == 0
    assert Path(stdout(ex, "8", 1).strip()).parent == tmp_path / "home"  # escaped: never outside the homes
    ex.launch(Launch("9", 1, [PY, "-c", "import os; print(os.getcwd())"], {}, owner="alice"))
    assert wait_exit(ex).code == 0
    assert stdout(ex, "9", 1).strip() == str(ex.output_dir("9", 1))


def test_the_service_environment_is_not_passed_on(ex: LocalExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job sees its own env, the CORRAL_* of its attempt, PATH and locale: never the service's secrets."""
    monkeypatch.setenv("CORRAL_DATABASE_URL", "postgresql://corral:hunter2@db/corral")
    monkeypatch.setenv("SOME_TOKEN", "s3cret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    run(ex, "env", [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"], env={"MINE": "1"}, gpus={})
    assert wait_exit(ex).code == 0
    seen = json.loads(stdout(ex, "env"))
    assert "SOME_TOKEN" not in seen and "CORRAL_DATABASE_URL" not in seen
    assert (seen["MINE"], seen["LC_ALL"], seen["PATH"]) == ("1", "C.UTF-8", os.environ["PATH"])
    assert seen["CORRAL_OUTPUT_DIR"] == str(ex.output_dir("env", 1))


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


def test_adopt_kills_what_a_vanished_shim_left(ex: LocalExecutor) -> None:
    """Issue 21 item 8: the shim is killed (kill -9) while the service is down; the restarted service marks the job
    failed and must not leave its process on the GPUs the next job is given."""
    handle = run(
        ex,
        "orphan",
        [
            PY,
            "-c",
            f"import subprocess; subprocess.Popen([{PY!r}, '-c', {SLEEPER!r}]); "
            "print('ready', flush=True); import time; time.sleep(60)",
        ],
        gpus={},
    )
    wait_for(lambda: "ready" in stdout(ex, "orphan"))
    assert handle.pid is not None
    old = set(_group_of(handle.pid))
    assert len(old) == 3, old  # the shim, the job, its child
    attack_kit.attempt("8 a job whose shim was killed while Corral was down keeps its GPUs")
    os.kill(handle.pid, signal.SIGKILL)  # the service is down: nobody records this
    wait_for(lambda: (shim.read_stat(handle.pid) or ("Z", 0))[0] == "Z")
    again = LocalExecutor(ex.root)  # the restarted service
    assert again.adopt(handle) == Exit("orphan", 1, None, VANISHED_WHILE_DOWN)
    # What was left of the group (the job and its child) is gone; the dead shim may linger unreaped.
    wait_for(lambda: all((shim.read_stat(p) or ("Z", 0))[0] == "Z" for p in old))


def test_leftovers_never_include_a_later_group_under_a_reused_number() -> None:
    me = shim.read_stat(os.getpid())
    assert me is not None
    # A live process with the number but another start time: the old group is empty and the number reused.
    assert group_leftovers(os.getpid(), me[1] + 10**9) == []


def _group_of(pgid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_shim_usage() -> None:
    assert shim.main([]) == 2
    assert shim.main(["/tmp", "--as", "1:2:x", "--", "true"]) == 2
    assert shim.parse_as("5:6") == (5, 6)
    with pytest.raises(ValueError):
        shim.parse_as("5:6:7,8")  # no supplementary groups, ever
    assert shim.main(["/tmp", "true"]) == 2
