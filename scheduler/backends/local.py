"""Runs attempts as processes on this machine, each in its own process group, each behind the shim.

Layout: ROOT/<job_id>/<attempt>/ holds stdout.log, stderr.log, and the shim's `pid` and `exit` files; those
files, not this object's memory, are the record a restarted server adopts attempts from. Its `output/` is the job's
own directory ($CORRAL_OUTPUT_DIR, and the default working directory).

With `accounts`, each attempt runs as its owner's own account (scheduler/backends/accounts.py): the run directory
and its files stay the service's (a job that could write its pid file could make a restarted service kill another
process group), only `output/` is the job's, and the job gets a scrubbed environment, never the service's own.

GPU shares (Launch.gpu_fraction): jobs sharing a GPU get the same CUDA_VISIBLE_DEVICES and a memory cap, hard under
CUDA MPS where its daemon runs, else the frameworks' soft limits (scheduler/backends/sharing.py). MIG (Launch.mig):
the job gets a free instance of its profile, by UUID (CUDA_VISIBLE_DEVICES=MIG-<uuid>).

Nothing here sleeps or waits: the service's loop calls poll(now) with its own clock, which also decides when a
termination's grace period is over. Linux only (/proc gives process start times).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import IO
from urllib.parse import quote

from scheduler.backends import sharing, shim
from scheduler.backends.accounts import Account, Accounts, may_enter
from scheduler.backends.base import OUTPUT_ENV, Exit, GPUInfo, Handle, Launch

STDOUT, STDERR = "stdout.log", "stderr.log"
DEVICES = "devices"  # the attempt's CUDA_VISIBLE_DEVICES, so a restarted service knows which MIG instances it holds
OUTPUT = "output"  # the job's own directory in its run directory: what it produces (KeepsOutputs)
VANISHED = "vanished"
VANISHED_WHILE_DOWN = "vanished while Corral was down"
KILLED_AFTER_GRACE = "killed after grace period"
# What a job inherits from the service's environment: nothing secret (the service's may hold database passwords and
# tokens), only what programs need to behave (locale, time zone, where programs are).
INHERITED = ("PATH", "LANG", "LANGUAGE", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHIM_ENV = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}  # the shim's own environment, whatever the job asks for
TRAVERSE_ONLY = 0o711  # the service's directories on a job's way to its output: enter, never list or write


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
    devices: tuple[str, ...] = ()  # its CUDA_VISIBLE_DEVICES: which MIG instances it holds


class LocalExecutor:
    """The Executor for a single machine: jobs are process groups; GPUs are chosen with CUDA_VISIBLE_DEVICES."""

    def __init__(
        self,
        root: Path,
        python: str = sys.executable,
        accounts: Accounts | None = None,
        homes: Path | None = None,
        gpus: Sequence[GPUInfo] | None = None,
        mps_pipe: Path | None = None,
    ) -> None:
        self.root = Path(root)
        # This machine's GPUs (NVML's, or declared): their memory sizes a share's cap, their MIG instances are
        # handed out by profile, and engine GPU k is the k-th GPU not in MIG mode. None: indices are NVML's as is.
        self.gpus = list(gpus) if gpus is not None else None
        self.mps_pipe = mps_pipe  # where to look for the MPS daemon at each launch; None: sharing.mps_pipe()
        self.python = python
        self.accounts = accounts  # None: every job runs as this process's own user (single-user)
        # Single-user: a notebook opens in homes/<user> (its files outlive its server); None: in its output dir.
        self.homes = Path(homes) if homes is not None else None
        self._attempts: dict[tuple[str, int], _Attempt] = {}

    @property
    def isolation(self) -> str:
        """How users' jobs are kept apart: `users (range)`, `users (system)`, or `none` (single-user)."""
        return f"users ({self.accounts.kind})" if self.accounts is not None else "none"

    def rundir(self, job_id: str, attempt: int) -> Path:
        # The id becomes a directory name: refuse anything that could climb out of the root.
        if not job_id or job_id in (".", "..") or "/" in job_id or "\0" in job_id:
            raise ValueError(f"job id {job_id!r} cannot name a run directory")
        return self.root / job_id / str(attempt)

    def may_use_workdir(self, owner: str, workdir: str) -> bool:
        """Whether `owner`'s job could start in `workdir` (ChecksWorkdirs): a directory its account may enter."""
        if self.accounts is None:
            return os.path.isdir(workdir)
        return may_enter(workdir, self.accounts.ids(owner))

    def home_of(self, owner: str) -> Path:
        """Single-user: the notebook directory of `owner` (homes/<user>, made on first use), the same for every
        attempt of every sandbox of theirs. The name is escaped so no user name climbs out of `homes`."""
        assert self.homes is not None
        name = quote(owner or "_", safe="")
        if name in (".", ".."):
            name = name.replace(".", "%2E")
        home = self.homes / name
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return home

    def output_dir(self, job_id: str, attempt: int) -> Path:
        return self.rundir(job_id, attempt) / OUTPUT

    def launch(self, launch: Launch) -> Handle:
        rundir = self.rundir(launch.job_id, launch.attempt)
        if (rundir / shim.PID_FILE).exists():
            raise FileExistsError(f"{rundir} was already launched: adopt it, or launch a new attempt number")
        command = self._argv(launch)
        account = self.accounts.account(launch.owner) if self.accounts is not None else None
        output = self._make_dirs(launch, account)
        workdir = Path(launch.workdir) if launch.workdir else output
        if not launch.workdir and launch.env.get("CORRAL_KIND") == "sandbox":
            # A notebook's files outlive its server (a new attempt, a new run directory): they are the user's, in
            # their home; the server opens there (its root directory is its working directory).
            if account is not None:
                workdir = account.home
            elif self.homes is not None:
                workdir = self.home_of(launch.owner)
        if not workdir.is_dir():
            raise ValueError(f"workdir {workdir} is not a directory")
        devices, share = self._devices(launch)
        env = _base_env(account)
        env.update(launch.env)
        # Set last so a job's own env cannot claim GPUs (or a larger share) the scheduler did not give it.
        env.update(share)
        env.update(
            CUDA_VISIBLE_DEVICES=",".join(devices),  # "" hides every GPU
            CUDA_DEVICE_ORDER="PCI_BUS_ID",  # CUDA's default order (fastest first) need not match NVML's indices
            CORRAL_JOB_ID=launch.job_id,
            CORRAL_ATTEMPT=str(launch.attempt),
        )
        env[OUTPUT_ENV] = str(output)
        # The shim gets the job's environment through a file only it may read, never as its own: a job's
        # LD_PRELOAD or LD_LIBRARY_PATH in the shim's environment would run the job's code as the service's user.
        with os.fdopen(os.open(rundir / shim.ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(env, f)
        (rundir / DEVICES).write_text(env["CUDA_VISIBLE_DEVICES"])
        run_as = [] if account is None else ["--as", f"{account.uid}:{account.gid}"]
        with _private_log(rundir / STDOUT) as out, _private_log(rundir / STDERR) as err:
            proc = subprocess.Popen(
                [self.python, "-I", shim.__file__, str(rundir), *run_as, "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=SHIM_ENV,
                start_new_session=True,  # its own process group: signals reach the job and all it forks
            )
        stat = shim.read_stat(proc.pid)  # our unreaped child: /proc/<pid> exists even if it already exited
        start = float(stat[1]) if stat else 0.0
        self._attempts[(launch.job_id, launch.attempt)] = _Attempt(
            launch.job_id, launch.attempt, rundir, proc.pid, start, proc, devices=tuple(devices)
        )
        return Handle(launch.job_id, launch.attempt, proc.pid, start)

    def _devices(self, launch: Launch) -> tuple[list[str], dict[str, str]]:
        """CUDA_VISIBLE_DEVICES entries for the attempt, and the environment that caps its share of a GPU."""
        if launch.mig is not None:
            return [self._free_instance(launch)], {}
        indices = self._gpus(launch)
        whole = [g for g in self.gpus if not g.mig_mode] if self.gpus is not None else None
        if whole is not None and any(i >= len(whole) for i in indices):
            raise ValueError(f"job {launch.job_id}: GPU {max(indices)} asked, this machine has {len(whole)}")
        physical = [whole[i] for i in indices] if whole is not None else None
        devices = [str(g.index) for g in physical] if physical is not None else [str(i) for i in indices]
        if launch.gpu_fraction is None:
            return devices, {}
        if len(devices) != 1:
            raise ValueError(f"job {launch.job_id}: a share of a GPU is of one GPU, got {len(devices)}")
        pipe = self.mps_pipe or sharing.mps_pipe()
        memory = physical[0].memory_mb if physical is not None else 0
        return devices, sharing.share_env(launch.gpu_fraction, memory, pipe if sharing.mps_running(pipe) else None)

    def _free_instance(self, launch: Launch) -> str:
        """A MIG instance of the attempt's profile that no live attempt holds (the engine counted one free)."""
        held = {d for a in self._attempts.values() if not self._gone(a) for d in a.devices}
        for g in self.gpus or []:
            for m in g.mig if g.mig_mode else ():
                if m.profile == launch.mig and m.uuid not in held:
                    return m.uuid
        raise ValueError(f"job {launch.job_id}: no free MIG {launch.mig} instance on this machine")

    def pids(self, job_id: str, attempt: int) -> set[int] | None:
        """The host pids of the attempt's process group now (None: not running here), for the culler's
        per-process readings of a shared GPU. A process that left the group (setsid) is not counted."""
        a = self._attempts.get((job_id, attempt))
        if a is None or self._gone(a):
            return None
        return set(group_leftovers(a.pid, a.start))

    def _make_dirs(self, launch: Launch, account: Account | None) -> Path:
        """The run directory (the service's; others may only pass through it) and in it the job's output
        directory (the job's own, 0700), returned."""
        rundir = self.rundir(launch.job_id, launch.attempt)
        rundir.mkdir(parents=True, exist_ok=True)
        if account is not None:
            for d in (self.root, rundir.parent, rundir):
                os.chmod(d, TRAVERSE_ONLY)
        output = rundir / OUTPUT
        output.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(output, account.uid, account.gid)
        os.chmod(output, 0o700)
        return output

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
            self._seal(a.job_id, a.attempt)
            del self._attempts[key]
        return ended

    def adopt(self, handle: Handle) -> Exit | None:
        rundir = self.rundir(handle.job_id, handle.attempt)
        code = _read_exit(rundir)
        if code is not None:
            self._seal(handle.job_id, handle.attempt)
            return Exit(handle.job_id, handle.attempt, code, "ended while Corral was down")
        pid, start = handle.pid, handle.started_at
        if pid is None:  # the server died between launch and recording the pid: the shim wrote it down
            pid, start = _read_pid(rundir)
        stat = shim.read_stat(pid) if pid is not None else None
        if pid is None or stat is None or stat[0] == "Z" or float(stat[1]) != start:
            if pid is not None:  # the shim died unrecorded (kill -9): its job may live on, holding its GPUs
                kill_leftovers(pid, start)
            self._seal(handle.job_id, handle.attempt)
            return Exit(handle.job_id, handle.attempt, None, VANISHED_WHILE_DOWN)
        self._attempts[(handle.job_id, handle.attempt)] = _Attempt(
            handle.job_id, handle.attempt, rundir, pid, start, None, devices=_read_devices(rundir)
        )
        return None

    def _seal(self, job_id: str, attempt: int) -> None:
        """Once an attempt has ended, its output is what it produced: the user's later jobs (or, for a notebook,
        the user) may read it but no longer change it, so a model registered from it later is what this attempt
        wrote (issue 21: a metrics file rewritten after the job). Single-user: nothing to take from anyone."""
        if self.accounts is not None:
            seal(self.output_dir(job_id, attempt))

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


def _base_env(account: Account | None) -> dict[str, str]:
    """The environment every job starts from: the locale, time zone and PATH of the service, and who it is."""
    env = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    env["SHELL"] = "/bin/sh"
    if account is not None:
        env.update(HOME=str(account.home), USER=account.user, LOGNAME=account.user)
    else:  # the service's own user: its own home
        env.update({k: os.environ[k] for k in ("HOME", "USER", "LOGNAME") if k in os.environ})
    return env


def seal(output: Path) -> None:
    """Give the service every file and directory of `output` that its job's user owns, leaving that user (by its
    group) read access only.

    The walk and every change go through file descriptors opened without following links, so a directory swapped
    for a symlink by another process of the same user leads nowhere; only entries owned by the output's user and
    with a single link are touched (a hard link to someone else's file is never chowned)."""
    try:
        top = os.lstat(output)
    except FileNotFoundError:
        return
    me = os.geteuid()
    if top.st_uid == me:
        return  # already sealed, or a job of the service's own user
    for _, dirnames, filenames, dirfd in os.fwalk(output, topdown=False, follow_symlinks=False):
        for name in (*filenames, *dirnames):
            _seal_one(name, dirfd, top.st_uid, me)
    _seal_one(str(output), None, top.st_uid, me)


def _seal_one(name: str, dirfd: int | None, user: int, me: int) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dirfd)
    except OSError:
        return  # a symlink (left as it is: the registry hashes its text), a socket, or gone
    try:
        st = os.fstat(fd)
        if st.st_uid != user or (st.st_nlink > 1 and not S_ISDIR(st.st_mode)):
            return
        os.fchown(fd, me, st.st_gid)
        os.fchmod(fd, 0o750 if S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o640)
    finally:
        os.close(fd)


def _private_log(path: Path) -> IO[bytes]:
    # Only the service reads a job's logs (the API serves them to whoever may see the job), whatever the umask.
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def _group_and_start(pid: int) -> tuple[int, int] | None:
    """(process group id, start time in clock ticks) of a process; None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[2]), int(fields[19])  # fields 5 (pgrp) and 22 (starttime)


def group_leftovers(pgid: int, since: float) -> list[int]:
    """Processes still in the process group a shim of pid `pgid`, started at `since` (clock ticks), led.

    While any of its members lives, the kernel hands the pid out to no one, so a live process with that pid but
    another start time means the group is empty and the number reused: nothing of ours is left. Members start
    after their leader, which keeps out any group formed later under the same number."""
    lead = _group_and_start(pgid)
    if lead is not None and lead[1] != since:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            got = _group_and_start(int(entry.name))
            if got is not None and got[0] == pgid and got[1] >= since:
                found.append(int(entry.name))
    return found


def kill_leftovers(pgid: int, since: float) -> list[int]:
    """SIGKILL what remains of a vanished shim's process group (see group_leftovers); the pids signalled."""
    killed = []
    for pid in group_leftovers(pgid, since):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass  # ended meanwhile
    return killed


def _read_exit(rundir: Path) -> int | None:
    try:
        return int((rundir / shim.EXIT_FILE).read_text())
    except (OSError, ValueError):  # not there yet; the shim writes it atomically, so never half-written
        return None


def _read_devices(rundir: Path) -> tuple[str, ...]:
    """The CUDA_VISIBLE_DEVICES an adopted attempt was started with (its DEVICES file, the service's own)."""
    try:
        value = (rundir / DEVICES).read_text()
    except OSError:
        return ()
    return tuple(d for d in value.strip().split(",") if d)


def _read_pid(rundir: Path) -> tuple[int | None, float]:
    try:
        data = json.loads((rundir / shim.PID_FILE).read_text())
        return int(data["pid"]), float(data["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0.0
