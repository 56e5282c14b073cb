"""Runs attempts as processes on this machine, each in its own process group, each behind the shim.

Layout: ROOT/<job_id>/<attempt>/ holds stdout.log, stderr.log, and the shim's `pid` and `exit` files; those
files, not this object's memory, are the record a restarted server adopts attempts from.

Nothing here sleeps or waits: the service's loop calls poll(now) with its own clock, which also decides when a
termination's grace period is over. Linux only (/proc gives process start times).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scheduler.backends import shim
from scheduler.backends.base import Exit, Handle, Launch

STDOUT, STDERR = "stdout.log", "stderr.log"
OUTPUT = "output"  # the job's own directory in its run directory: what it produces (KeepsOutputs)
VANISHED = "vanished"
VANISHED_WHILE_DOWN = "vanished while Corral was down"
KILLED_AFTER_GRACE = "killed after grace period"


@dataclass
class _Attempt:
    """One attempt this executor watches."""

    job_id: str
    attempt: int
    rundir: Path
    pid: int  # the shim's pid, which is also the process group id
    start: float  # the shim's start time in clock ticks (/proc/<pid>/stat field 22)
    proc: subprocess.Popen[bytes] | None  # set when the shim is our child, so we reap it; None once adopted
    kill_at: float | None = None  # when terminate()'s grace ends
    killed: bool = False


class LocalExecutor:
    """The Executor for a single machine: jobs are process groups; GPUs are chosen with CUDA_VISIBLE_DEVICES."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = Path(root)
        self.python = python
        self._attempts: dict[tuple[str, int], _Attempt] = {}

    def rundir(self, job_id: str, attempt: int) -> Path:
        # The id becomes a directory name: refuse anything that could climb out of the root.
        if not job_id or job_id in (".", "..") or "/" in job_id or "\0" in job_id:
            raise ValueError(f"job id {job_id!r} cannot name a run directory")
        return self.root / job_id / str(attempt)

    def output_dir(self, job_id: str, attempt: int) -> Path:
        return self.rundir(job_id, attempt) / OUTPUT

    def launch(self, launch: Launch) -> Handle:
        rundir = self.rundir(launch.job_id, launch.attempt)
        if (rundir / shim.PID_FILE).exists():
            raise FileExistsError(f"{rundir} was already launched: adopt it, or launch a new attempt number")
        command = self._argv(launch)
        workdir = Path(launch.workdir) if launch.workdir else rundir
        rundir.mkdir(parents=True, exist_ok=True)
        if not workdir.is_dir():
            raise ValueError(f"workdir {workdir} is not a directory")
        env = {**os.environ, **launch.env}
        # Set last so a job's own env cannot claim GPUs the scheduler did not give it.
        env.update(
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in self._gpus(launch)),  # "" hides every GPU
            CUDA_DEVICE_ORDER="PCI_BUS_ID",  # CUDA's default order (fastest first) need not match NVML's indices
            CORRAL_JOB_ID=launch.job_id,
            CORRAL_ATTEMPT=str(launch.attempt),
        )
        with open(rundir / STDOUT, "ab") as out, open(rundir / STDERR, "ab") as err:
            proc = subprocess.Popen(
                [self.python, "-I", shim.__file__, str(rundir), "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,  # its own process group: signals reach the job and all it forks
            )
        stat = shim.read_stat(proc.pid)  # our unreaped child: /proc/<pid> exists even if it already exited
        start = float(stat[1]) if stat else 0.0
        self._attempts[(launch.job_id, launch.attempt)] = _Attempt(
            launch.job_id, launch.attempt, rundir, proc.pid, start, proc
        )
        return Handle(launch.job_id, launch.attempt, proc.pid, start)

    @staticmethod
    def _argv(launch: Launch) -> list[str]:
        command = launch.command
        if isinstance(command, str) or len(command) == 1:  # one string is a shell command line
            line = command if isinstance(command, str) else command[0]
            if not line.strip():
                raise ValueError(f"job {launch.job_id}: empty command")
            return ["/bin/sh", "-c", line]
        if not command:
            raise ValueError(f"job {launch.job_id}: empty command")
        return list(command)

    @staticmethod
    def _gpus(launch: Launch) -> list[int]:
        nodes = [node for node, gpus in launch.gpus.items() if gpus]
        if len(nodes) > 1:
            raise ValueError(f"job {launch.job_id}: the local executor runs on one node, got GPUs on {nodes}")
        return [int(i) for i in launch.gpus[nodes[0]]] if nodes else []

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        a = self._attempts.get((job_id, attempt))
        if a is None or self._gone(a):
            return  # already over; poll reports it
        deadline = now + max(grace_s, 0.0)
        a.kill_at = deadline if a.kill_at is None else min(a.kill_at, deadline)
        # To the shim, which passes it on to its group and stays alive to record the exit code.
        self._signal(a, signal.SIGTERM, group=False)
        if now >= a.kill_at:
            self._kill(a)

    def poll(self, now: float) -> list[Exit]:
        ended: list[Exit] = []
        for key, a in list(self._attempts.items()):
            if a.kill_at is not None and now >= a.kill_at and not a.killed:
                self._kill(a)
            if not self._gone(a):
                continue
            code = _read_exit(a.rundir)
            if code is not None:
                ended.append(Exit(a.job_id, a.attempt, code))
            elif a.killed:
                ended.append(Exit(a.job_id, a.attempt, -signal.SIGKILL, KILLED_AFTER_GRACE))
            elif a.kill_at is not None and a.proc is not None and a.proc.returncode == -signal.SIGTERM:
                # SIGTERM reached the shim before Python had installed its handler: the job never started.
                ended.append(Exit(a.job_id, a.attempt, -signal.SIGTERM, "terminated before it started"))
            else:  # the shim died without recording (OOM killer, kill -9 by hand); its job may live on
                self._signal(a, signal.SIGKILL, group=True)
                ended.append(Exit(a.job_id, a.attempt, None, VANISHED))
            del self._attempts[key]
        return ended

    def adopt(self, handle: Handle) -> Exit | None:
        rundir = self.rundir(handle.job_id, handle.attempt)
        code = _read_exit(rundir)
        if code is not None:
            return Exit(handle.job_id, handle.attempt, code, "ended while Corral was down")
        pid, start = handle.pid, handle.started_at
        if pid is None:  # the server died between launch and recording the pid: the shim wrote it down
            pid, start = _read_pid(rundir)
        stat = shim.read_stat(pid) if pid is not None else None
        if pid is None or stat is None or stat[0] == "Z" or float(stat[1]) != start:
            return Exit(handle.job_id, handle.attempt, None, VANISHED_WHILE_DOWN)
        self._attempts[(handle.job_id, handle.attempt)] = _Attempt(
            handle.job_id, handle.attempt, rundir, pid, start, None
        )
        return None

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        rundir = self.rundir(job_id, attempt)
        return str(rundir / STDOUT), str(rundir / STDERR)

    def alive(self, job_id: str, attempt: int) -> bool:
        a = self._attempts.get((job_id, attempt))
        return a is not None and not self._gone(a)

    def _gone(self, a: _Attempt) -> bool:
        """The shim has exited (and, if it is our child, been reaped so it leaves no zombie)."""
        if a.proc is not None:
            return a.proc.poll() is not None
        stat = shim.read_stat(a.pid)
        return stat is None or stat[0] == "Z" or float(stat[1]) != a.start

    def _kill(self, a: _Attempt) -> None:
        a.killed = True
        self._signal(a, signal.SIGKILL, group=True)

    def _signal(self, a: _Attempt, sig: int, group: bool) -> None:
        # The pid is ours to signal only while it is still the shim we started: an unreaped child cannot be
        # replaced, and otherwise the start time must match. Once no process has the pid, the kernel still will
        # not hand it out while it names a live process group, so killpg then only reaches the job's leftovers.
        if a.proc is None or a.proc.returncode is not None:
            stat = shim.read_stat(a.pid)
            if stat is not None and float(stat[1]) != a.start:
                return
        try:
            if group:
                os.killpg(a.pid, sig)
            else:
                os.kill(a.pid, sig)
        except ProcessLookupError:
            pass  # already gone


def _read_exit(rundir: Path) -> int | None:
    try:
        return int((rundir / shim.EXIT_FILE).read_text())
    except (OSError, ValueError):  # not there yet; the shim writes it atomically, so never half-written
        return None


def _read_pid(rundir: Path) -> tuple[int | None, float]:
    try:
        data = json.loads((rundir / shim.PID_FILE).read_text())
        return int(data["pid"]), float(data["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0.0
