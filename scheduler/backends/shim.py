"""The few lines between the executor and a job: records the job's pid and exit code in its run directory.

    python -m scheduler.backends.shim RUNDIR [--as UID:GID] -- COMMAND [ARG...]

Jobs outlive a restart of the Corral server, and after a restart they are no longer its children, so it cannot
wait() for them. The shim waits instead and writes the exit code to RUNDIR/exit, where a new server finds it.

The executor starts the shim as the leader of a new process group; the job and anything it forks stay in that
group. SIGTERM to the shim is passed on to the whole group (the job, its dataloaders, torchrun's workers) while
the shim itself keeps running to record the exit code. When the job ends, leftovers in the group are killed so
that the GPUs the scheduler now calls free really are.

Only the standard library is used: the executor runs this file by path in isolated mode (`python -I shim.py`),
so a job's PYTHONPATH or working directory can never break it.

With --as, the shim (still the service's user, so the job can neither forge its pid and exit files nor signal it)
starts the job as that uid and gid, with no supplementary groups and umask 077.

The job's environment is not the shim's: the executor starts the shim with a fixed, minimal one (a job's
LD_PRELOAD in the shim's own environment would run the job's code as the service's user) and leaves the job's in
RUNDIR/env.json (mode 0600), which the shim reads and removes before it starts the job. Run by hand without that
file, the job inherits the shim's environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

PID_FILE = "pid"
EXIT_FILE = "exit"
ENV_FILE = "env.json"


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process from /proc; None if there is none.

    The start time tells a process apart from a later one that got the same pid.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])  # fields[0] is field 3 (state), fields[19] is field 22 (starttime)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the whole file or none of it, even if we die halfway."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _exit_status(code: int) -> int:
    # How a shell would report it: 128 + N for "killed by signal N".
    return code if 0 <= code < 256 else 128 - code if code < 0 else 255


def parse_as(text: str) -> tuple[int, int]:
    """UID:GID -> (uid, gid)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--as wants UID:GID, got {text!r}")
    return int(parts[0]), int(parts[1])


def take_env(rundir: Path) -> dict[str, str] | None:
    """The job's environment the executor left in RUNDIR, removed once read (it may hold the job's secrets);
    None when there is none (run by hand)."""
    path = rundir / ENV_FILE
    try:
        env = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    path.unlink()
    return {str(k): str(v) for k, v in env.items()}


def main(argv: list[str]) -> int:
    run_as: tuple[int, int] | None = None
    if len(argv) >= 3 and argv[1] == "--as":
        try:
            run_as = parse_as(argv[2])
        except ValueError as err:
            print(f"corral: {err}", file=sys.stderr)
            return 2
        argv = [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m scheduler.backends.shim RUNDIR [--as UID:GID] -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    rundir, command = Path(argv[0]), argv[2:]
    env = take_env(rundir)
    leader = os.getpgrp() == os.getpid()  # started by the executor with start_new_session=True
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if not leader:  # run by hand: never signal a group we do not own (it may be the user's shell job)
            if child is not None:
                child.send_signal(signum)
            return
        # Ignore our own copy while signalling the group: the kernel drops it at once instead of re-entering here.
        signal.signal(signum, signal.SIG_IGN)
        try:
            os.killpg(os.getpgrp(), signum)
        finally:
            signal.signal(signum, forward)

    signal.signal(signal.SIGTERM, forward)
    pid = os.getpid()
    stat = read_stat(pid)
    write_atomic(rundir / PID_FILE, json.dumps({"pid": pid, "start": stat[1] if stat else None}) + "\n")

    if stopping:  # terminated before the job even started
        code = -signal.SIGTERM
    else:
        try:
            if run_as is None:
                child = subprocess.Popen(command, env=env)
            else:  # no group of the service's user, and files nobody else may read unless the job says so
                uid, gid = run_as
                child = subprocess.Popen(command, env=env, user=uid, group=gid, extra_groups=[], umask=0o077)
        except OSError as err:  # as a shell reports it: 126 found but not runnable, 127 not found
            print(f"corral: cannot run {command[0]!r}: {err}", file=sys.stderr, flush=True)
            code = 127 if isinstance(err, FileNotFoundError) else 126
        else:
            code = child.wait()  # PEP 475: retried after each forwarded SIGTERM

    write_atomic(rundir / EXIT_FILE, f"{code}\n")
    if leader:
        # Whatever the job left behind in its group may still hold GPU memory. This kills the shim too,
        # which is fine: the exit code is already on disk.
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return _exit_status(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
