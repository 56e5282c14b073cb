"""Issue 21, item 1: a job (or notebook) of one user attacks the service and other users from its own uid.

Real services with the local executor running jobs as their owners' accounts (uids from a range kept for these
tests), real processes, real uid switching: this needs root, and CORRAL_REQUIRE_ISOLATION=1 (scripts/test as root)
turns the skip into a failure. Every attack is a line of the attacker's shell script; each must be denied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.backends.accounts import RangeAccounts, per_user
from scheduler.backends.local import LocalExecutor, group_leftovers
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import create_token, isolation, local_executor
from scheduler.service.core.settings import ADMIN_TOKEN_FILE, ServiceSettings
from tests import attack_kit
from tests.service_kit import Service, make_service

pytestmark = pytest.mark.integration  # real job processes under other uids

UID_MIN, UID_MAX = 2_900_000, 2_900_099  # these tests' own range: no real account, no other test's files
ITEM = "1 isolation"


def need_root() -> None:
    if os.geteuid() == 0:
        return
    why = "switching a job to its user's uid needs root (run the suite as root, as CI does)"
    if os.environ.get("CORRAL_REQUIRE_ISOLATION"):
        pytest.fail(f"{why}, and CORRAL_REQUIRE_ISOLATION asks for these tests")
    pytest.skip(why)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every uid may pass through (pytest's own tmp is closed to others): the jobs must reach their
    output directories by path, as on a real installation (data_dir such as /var/lib/corral)."""
    need_root()
    path = Path(tempfile.mkdtemp(prefix="corral-isolation-", dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        for pidfile in path.glob("data/runs/*/*/pid"):  # no job outlives its test, whatever happened
            shim = json.loads(pidfile.read_text())
            for member in group_leftovers(shim["pid"], shim["start"]):  # the shim too: it leads the group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def settings_of(base: Path) -> ServiceSettings:
    return ServiceSettings(
        data_dir=base / "data",
        database_url=f"sqlite:///{base / 'data' / 'corral.db'}",
        run_as="users",
        uid_min=UID_MIN,
        uid_max=UID_MAX,
        grace_s=2,
    )


def service(base: Path) -> Service:
    """A service as `corral serve` assembles it as root: jobs as their users, an admin token in data_dir."""
    s = settings_of(base)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    svc = make_service(s.url, base, local_executor(s), run_as="users", uid_min=UID_MIN, uid_max=UID_MAX)
    token = s.data_dir / ADMIN_TOKEN_FILE
    if not token.exists():  # as bootstrap_admin leaves it (make_service has made tokens already)
        fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, create_token(svc.core, "admin", Role.PLATFORM_ADMIN).encode() + b"\n")
        os.close(fd)
    return svc


def until(svc: Service, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail("condition not reached in time")
        svc.tick()
        time.sleep(0.02)


def submit(svc: Service, user: str, queue: str, command: Any, **kw: Any) -> int:
    r = svc.client(user, Role.MEMBER, queue).post(
        "/v1/jobs", json={"queue": queue, "gpus": 1, "command": command, **kw}
    )
    assert r.status_code == 201, r.text
    jid: int = r.json()["id"]
    return jid


def state(svc: Service, jid: int) -> str:
    s: str = svc.admin.get(f"/v1/jobs/{jid}").json()["state"]
    return s


def logs(svc: Service, jid: int) -> str:
    text: str = svc.admin.get(f"/v1/jobs/{jid}/logs").text
    return text


def uid_of(svc: Service, user: str) -> int:
    accounts = svc.executor.accounts
    assert isinstance(accounts, RangeAccounts)
    return accounts.uid_of(user)


VICTIM = 'echo bob-output-secret > "$CORRAL_OUTPUT_DIR/secret.txt"; echo bob-log-secret; echo "pid $$"; exec sleep 60'

# Each attack is one line `t NAME COMMAND...`: the job reports whether the command worked. From the output directory
# (its working directory), ../../../.. is data_dir.
ATTACKS = {
    "read the admin token by a relative path": "cat ../../../../admin-token",
    "read the admin token by a relative path from the run directory": "cd .. && cat ../../../admin-token",
    "read the admin token by its absolute path": 'cat "$DATA/admin-token"',
    "read the database": 'cat "$DATA/corral.db"',
    "read the database's WAL": 'cat "$DATA/corral.db-wal"',
    "read the uid table": 'cat "$DATA/accounts.json"',
    "list the data directory": 'ls "$DATA"',
    "list the run directories": 'ls "$DATA/runs"',
    "read another user's job log": 'cat "$VICTIM_RUN/stdout.log"',
    "list another user's output directory": 'ls "$VICTIM_RUN/output"',
    "read another user's output file": 'cat "$VICTIM_RUN/output/secret.txt"',
    "list another user's home": 'ls "$VICTIM_HOME"',
    "list the homes": 'ls "$DATA/home"',
    "read another user's job environment": "cat /proc/$VICTIM_PID/environ",
    "read the shim's environment": "cat /proc/$SHIM_PID/environ",
    "read the service's environment": "cat /proc/$SERVICE_PID/environ",
    "forge its own pid file": 'echo "{\\"pid\\": $SERVICE_PID, \\"start\\": 0}" > ../pid',
    "forge its own exit file": "echo 0 > ../exit",
    "plant a file in its run directory": ": > ../planted",
    "rewrite its own log file": ": > ../stdout.log",
    "signal another user's job": "kill -TERM $VICTIM_PID",
    "signal the shim": "kill -0 $SHIM_PID",
    "signal the service": "kill -0 $SERVICE_PID",
}
CONTROLS = (
    'echo mine > "$CORRAL_OUTPUT_DIR/mine.txt" && cat "$CORRAL_OUTPUT_DIR/mine.txt" && ls . >/dev/null '
    '&& echo "control ok"; echo "uid $(id -u)"'
)


def attacker_script() -> str:
    lines = [
        't() { name="$1"; shift; if sh -c "$*" >/dev/null 2>&1; then echo "LEAKED: $name"; '
        'else echo "denied: $name"; fi; }'
    ]
    for i, cmd in enumerate(ATTACKS.values()):
        assert "'" not in cmd, cmd  # each goes to the script in single quotes; its own shell expands it
        lines.append(f"t {i} '{cmd}'")
    return "\n".join([*lines, CONTROLS])


def shim_pid(svc: Service, jid: int) -> int:
    pid: int = json.loads(svc.executor.rundir(str(jid), 1).joinpath("pid").read_text())["pid"]
    return pid


def test_a_job_cannot_reach_the_service_or_other_users(base: Path) -> None:
    svc = service(base)
    data = base / "data"
    victim = submit(svc, "bob", "ranking", VICTIM, env={"BOB_SECRET": "bob-env-secret"})
    until(svc, lambda: "pid " in logs(svc, victim))
    victim_pid = int(logs(svc, victim).split("pid ")[1].split()[0])
    assert b"bob-env-secret" in Path(f"/proc/{victim_pid}/environ").read_bytes()  # the target is real
    for target in ("admin-token", "corral.db", "corral.db-wal", "accounts.json"):
        assert (data / target).exists(), target  # an attack on a missing file proves nothing
    env = {
        "DATA": str(data),
        "VICTIM_RUN": str(svc.executor.rundir(str(victim), 1)),
        "VICTIM_PID": str(victim_pid),
        "SHIM_PID": str(shim_pid(svc, victim)),
        "SERVICE_PID": str(os.getpid()),
        "VICTIM_HOME": str(data / "home" / str(uid_of(svc, "bob"))),
    }
    attacker = submit(svc, "alice", "nlp", attacker_script(), env=env)
    until(svc, lambda: state(svc, attacker) in ("completed", "failed"))
    out = logs(svc, attacker)
    attack_kit.attempt(
        f"{ITEM}: a job's uid against the service's files, other users and their processes", len(ATTACKS)
    )
    for i, name in enumerate(ATTACKS):
        assert f"denied: {i}\n" in out, f"{name}: {out}"
    assert "LEAKED" not in out, out
    # The controls: the attack script ran as alice's own uid, in its own output directory, which it could use.
    assert "control ok" in out and "mine\n" in out, out
    alice, bob = uid_of(svc, "alice"), uid_of(svc, "bob")
    assert f"uid {alice}\n" in out and alice != bob and min(alice, bob) >= UID_MIN
    sealed = (data / "runs" / str(attacker) / "1" / "output").stat()  # ended: the service's, alice may read it
    assert (sealed.st_uid, sealed.st_gid, sealed.st_mode & 0o777) == (os.geteuid(), alice, 0o750)
    assert Path(f"/proc/{victim_pid}").stat().st_uid == bob
    assert state(svc, victim) == "running"  # never signalled
    rundir = svc.executor.rundir(str(attacker), 1)
    assert not (rundir / "planted").exists() and rundir.stat().st_uid == os.geteuid()
    # Files the service wrote stay its own, whatever its umask.
    for private in (data / "admin-token", data / "corral.db", data / "accounts.json", rundir / "stdout.log"):
        assert private.stat().st_mode & 0o077 == 0, private
    svc.admin.post(f"/v1/jobs/{victim}/cancel")
    until(svc, lambda: state(svc, victim) == "cancelled")


def test_a_notebook_runs_as_its_user_in_their_home(base: Path) -> None:
    """Sandboxes go through the same executor: a notebook's server runs as its user, its files in a home that
    outlives the server and that nobody else may enter."""
    svc = service(base)
    box = svc.client("alice", Role.MEMBER, "nlp").post(
        "/v1/sandboxes",
        json={
            "queue": "nlp",
            "gpus": 1,
            "command": ["/bin/sh", "-c", 'id -u; pwd; echo "$HOME"; echo $USER; echo kept > "$HOME/notes"; sleep 30'],
        },
    )
    assert box.status_code == 201, box.text
    jid = box.json()["id"]
    until(svc, lambda: len(logs(svc, jid).splitlines()) >= 4)
    home = base / "data" / "home" / str(uid_of(svc, "alice"))
    attack_kit.attempt(f"{ITEM}: a notebook's uid and home")
    assert logs(svc, jid).splitlines() == [str(uid_of(svc, "alice")), str(home), str(home), "alice"]
    until(svc, lambda: (home / "notes").exists())  # written by path: the way to the home is open to its user
    st = home.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (uid_of(svc, "alice"), 0o700)
    assert svc.client("alice", Role.MEMBER, "nlp").delete(f"/v1/sandboxes/{jid}").status_code in (200, 202, 204)
    until(svc, lambda: state(svc, jid) in ("cancelled", "completed", "failed"))


def test_a_user_keeps_their_uid_across_a_restart(base: Path) -> None:
    first = service(base)
    before = submit(first, "alice", "nlp", "id -u")
    until(first, lambda: state(first, before) == "completed")
    uid = int(logs(first, before))
    first.core.db.dispose()  # the service goes away (never ticked again); a new one starts on the same data_dir
    again = service(base)
    submit(again, "bob", "ranking", "true")  # a newcomer takes a new uid, never alice's
    after = submit(again, "alice", "nlp", "id -u")
    until(again, lambda: state(again, after) == "completed")
    assert int(logs(again, after)) == uid == uid_of(again, "alice") != uid_of(again, "bob")


def test_a_service_that_cannot_switch_users_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without root there are no users to switch to: the service runs single-user, and says so (needs no root)."""
    assert per_user("auto", 0)[0] and per_user("users", 0)[0]
    assert not per_user("service", 0)[0]
    with pytest.raises(ValueError, match="needs the service to run as root"):
        per_user("users", 1000)
    users, why = per_user("auto", 1000)
    assert not users and "not running as root" in why and "every job runs as the service's own user" in why
    # As `corral serve` would start without root: a warning in the log, and no accounts.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    auto = ServiceSettings(data_dir=tmp_path / "data", run_as="auto")
    assert isolation(auto) == (False, why)
    with caplog.at_level(logging.WARNING, logger="corral.service"):
        ex = local_executor(auto)
    assert isinstance(ex, LocalExecutor) and ex.accounts is None and ex.isolation == "none"
    assert any("not running as root" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs the service to run as root"):
        local_executor(settings_of(tmp_path))


PRELOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void corral_attack(void) {
    const char *out = getenv("ATTACK_OUT");
    FILE *f = out ? fopen(out, "a") : NULL;
    if (f) { fprintf(f, "euid %d\\n", (int)geteuid()); fclose(f); }
}
"""


def test_a_jobs_loader_variables_never_reach_the_shim(base: Path) -> None:
    """The shim runs as the service's user (root): a job's LD_PRELOAD in its environment would run the job's code as
    root. The job's environment reaches the job only; the shim's is fixed."""
    svc = service(base)
    lib, out = base / "preload.so", base / "preload.out"
    gcc = shutil.which("gcc")
    if gcc is not None:  # the real thing: a library whose constructor reports the euid of whoever loads it
        (base / "preload.c").write_text(PRELOAD_C)
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(lib), str(base / "preload.c")], check=True)
        os.chmod(lib, 0o755)
    out.touch()
    os.chmod(out, 0o666)
    env = {"LD_PRELOAD": str(lib), "LD_LIBRARY_PATH": str(base), "ATTACK_OUT": str(out), "PYTHONPATH": str(base)}
    jid = submit(svc, "alice", "nlp", 'echo "pid $$"; exec sleep 30', env=env)
    until(svc, lambda: "pid " in logs(svc, jid))
    attack_kit.attempt(f"{ITEM}: a job's LD_PRELOAD, LD_LIBRARY_PATH and PYTHONPATH against the shim", 3)
    shim_env = Path(f"/proc/{shim_pid(svc, jid)}/environ").read_bytes()
    assert b"LD_PRELOAD" not in shim_env and b"LD_LIBRARY_PATH" not in shim_env and b"PYTHONPATH" not in shim_env
    job_pid = int(logs(svc, jid).split("pid ")[1].split()[0])
    assert b"LD_PRELOAD=" in Path(f"/proc/{job_pid}/environ").read_bytes()  # the job itself keeps what it asked for
    assert not (svc.executor.rundir(str(jid), 1) / "env.json").exists()  # read and gone: it held the job's env
    if gcc is not None:
        loaded = out.read_text().split()
        assert loaded and "0" not in loaded[1::2], loaded  # loaded by the job (alice's uid), never as root
    svc.admin.post(f"/v1/jobs/{jid}/cancel")
    until(svc, lambda: state(svc, jid) == "cancelled")


def test_a_finished_jobs_output_cannot_be_rewritten_by_the_users_later_jobs(base: Path) -> None:
    """Gates read what a job wrote (metrics.json): once the attempt ends its output is sealed, so a later job of the
    same user cannot make accuracy 0.053 read 0.999 before the version is registered."""
    svc = service(base)
    first = submit(
        svc,
        "alice",
        "nlp",
        'echo \'{"accuracy": 0.053}\' > "$CORRAL_OUTPUT_DIR/metrics.json"; '
        'mkdir "$CORRAL_OUTPUT_DIR/model"; echo w > "$CORRAL_OUTPUT_DIR/model/w"',
    )
    until(svc, lambda: state(svc, first) == "completed")
    output = svc.executor.output_dir(str(first), 1)
    rewrites = {
        "rewrite metrics.json": f"echo '{{\"accuracy\": 0.999}}' > {output}/metrics.json",
        "replace metrics.json": f"rm -f {output}/metrics.json && echo 1 > {output}/metrics.json",
        "swap the model": f"echo forged > {output}/model/w",
        "add a file": f": > {output}/model/extra",
        "make it writable again": f"chmod -R u+w {output}",
    }
    lines = [
        f'if sh -c "{cmd}" >/dev/null 2>&1; then echo "LEAKED: {name}"; else echo "denied: {name}"; fi'
        for name, cmd in rewrites.items()
    ]
    later = submit(svc, "alice", "nlp", "\n".join([*lines, f"cat {output}/metrics.json"]))
    until(svc, lambda: state(svc, later) == "completed")
    out = logs(svc, later)
    attack_kit.attempt(
        "5 typed-in metrics: a later job of the same user rewrites a finished job's output", len(rewrites)
    )
    assert "LEAKED" not in out and out.count("denied: ") == len(rewrites), out
    assert '{"accuracy": 0.053}' in out  # the user still reads what their job produced
    assert json.loads((output / "metrics.json").read_text()) == {"accuracy": 0.053}
    assert (output / "model" / "w").read_text() == "w\n"
    assert output.stat().st_uid == os.geteuid()


def test_a_workdir_is_checked_as_its_user_and_says_nothing_of_root_s_directories(base: Path) -> None:
    """The service is root: `isdir` as root would tell a member which closed directories exist. A workdir must be
    one the owner's account may enter, and every other answer is the same."""
    svc = service(base)
    first = submit(svc, "bob", "ranking", "true")  # bob gets his uid and home
    until(svc, lambda: state(svc, first) == "completed")
    closed = base / "closed"
    (closed / "inside").mkdir(parents=True)
    os.chmod(closed, 0o700)
    alice = svc.client("alice", Role.MEMBER, "nlp")
    bob_home = base / "data" / "home" / str(uid_of(svc, "bob"))
    answers = set()
    for workdir in ("/root", str(closed / "inside"), str(closed / "missing"), str(bob_home), "/nonexistent"):
        attack_kit.attempt(f"{ITEM}: a workdir that probes the service's or another user's directories")
        r = alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 0, "command": "true", "workdir": workdir})
        assert r.status_code == 422 and r.json()["error"]["where"] == "workdir", r.text
        answers.add(r.json()["error"]["message"].replace(workdir, "X"))
    assert len(answers) == 1, answers  # the same answer for missing and closed
    assert (
        alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 0, "command": "true", "workdir": "/tmp"}).status_code
        == 201
    )
    assert (
        svc.client("bob", Role.MEMBER, "ranking")
        .post("/v1/jobs", json={"queue": "ranking", "gpus": 0, "command": "true", "workdir": str(bob_home)})
        .status_code
        == 201
    )
