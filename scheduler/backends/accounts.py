"""Which system account runs a user's jobs on this machine: created (a uid from a dedicated range) or mapped (an
existing account of the same name), as JupyterHub's local spawners do.

Jobs and notebook servers of different users must not share an OS user: a job running as the service's own user
could read the database, the admin token, other teams' logs and secrets, and /proc/<pid>/environ of every other
job. The shim (running as the service's user) starts the job under the account chosen here.

`range`: uids from [uid_min, uid_max], each with a private gid equal to the uid and no /etc/passwd entry. The
user name -> uid table is kept in one JSON file (mode 0600, replaced atomically) so a user keeps their uid, and
with it their files, across restarts. `system`: the user name must be an existing account (pwd.getpwnam) with a
uid of at least `SYSTEM_UID_MIN`, its gid and home as the system says. No account gets supplementary groups: a group
such as docker, sudo or disk would hand a job root's power, and whoever may mint a user name could pick one.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger("corral.service")

RunAs = Literal["auto", "users", "service"]
AccountKind = Literal["range", "system"]
SYSTEM_UID_MIN = 1000  # below: system and service accounts (postgres, www-data), never a person's


@dataclass(frozen=True)
class Account:
    """The OS identity one user's processes run as."""

    user: str  # the Corral user name (USER and LOGNAME in the job's environment)
    uid: int
    gid: int
    home: Path


class Accounts(Protocol):
    """Maps a Corral user to the account their processes run as (creating it where the kind allows)."""

    kind: str

    def account(self, user: str) -> Account: ...

    def ids(self, user: str) -> tuple[int, int] | None:
        """The user's (uid, gid) if they have an account already; None if not (nothing is created)."""


class RangeAccounts:
    """Accounts allocated from a uid range nobody else uses; homes under `home_root`, one per user, mode 0700."""

    kind = "range"

    def __init__(self, table: Path, home_root: Path, uid_min: int, uid_max: int) -> None:
        if not 0 < uid_min <= uid_max:
            raise ValueError(f"uid range {uid_min}-{uid_max} is empty or includes root")
        self.table, self.home_root = Path(table), Path(home_root)
        self.uid_min, self.uid_max = uid_min, uid_max
        self._lock = threading.Lock()  # launches may come from several threads; the table is read-modify-write

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.table.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): int(v) for k, v in data.items()}

    def _save(self, table: dict[str, int]) -> None:
        # Atomic and private: a torn or readable table could hand one user's uid, and files, to another.
        tmp = self.table.with_name(self.table.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.table)

    def uid_of(self, user: str) -> int:
        """The user's uid, allocated (and stored) on first use."""
        if not user:
            raise ValueError("a job without an owner cannot run as a user's account")
        with self._lock:
            table = self._load()
            if user in table:
                return table[user]
            taken = set(table.values())
            for uid in range(self.uid_min, self.uid_max + 1):
                if uid not in taken and not _uid_exists(uid):
                    table[user] = uid
                    self._save(table)
                    log.info("user %s gets uid %d", user, uid)
                    return uid
        raise RuntimeError(f"no free uid left in {self.uid_min}-{self.uid_max} for user {user!r}")

    def ids(self, user: str) -> tuple[int, int] | None:
        uid = self._load().get(user)
        return None if uid is None else (uid, uid)

    def account(self, user: str) -> Account:
        uid = self.uid_of(user)
        # Named by uid, never by user name: two names can never meet in one directory (a name such as "uid-7"
        # or one with characters a path cannot hold), and a user keeps it as long as they keep their uid.
        home = self.home_root / str(uid)
        # The homes' parent: anyone may pass through to their own home, nobody may list who has one.
        self.home_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home_root, 0o711)
        ensure_private_dir(home, uid, uid)
        return Account(user, uid, uid, home)


class SystemAccounts:
    """Existing accounts of the same name (JupyterHub's LocalProcessSpawner): nothing is created."""

    kind = "system"

    def ids(self, user: str) -> tuple[int, int] | None:
        try:
            got = self.account(user)
        except ValueError:
            return None
        return got.uid, got.gid

    def account(self, user: str) -> Account:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"user {user!r} has no system account on this machine (accounts: system)") from None
        if pw.pw_uid < SYSTEM_UID_MIN:
            raise ValueError(
                f"user {user!r} maps to system account uid {pw.pw_uid} (below {SYSTEM_UID_MIN}): "
                "jobs run only as people's accounts"
            )
        return Account(user, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def ensure_private_dir(path: Path, uid: int, gid: int) -> None:
    """`path` exists, belongs to uid:gid and only they may enter it (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    if st.st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def per_user(run_as: RunAs, euid: int) -> tuple[bool, str]:
    """Whether jobs run as their users' own accounts, and why, in words for the start-up log.

    Switching users needs root; `auto` uses it when it has it. `users` without root is an error: the operator
    asked for isolation this process cannot give."""
    if run_as == "service":
        return False, "run_as=service: every job runs as the service's own user (no isolation between users)"
    if euid == 0:
        return True, "jobs and notebooks run as their users' own accounts"
    if run_as == "users":
        raise ValueError("run_as=users needs the service to run as root (it switches to each user's uid)")
    return False, (
        "not running as root: every job runs as the service's own user, so users' jobs can read each "
        "other's files and the service's database; run as root (run_as=users) or use another backend "
        "when several teams share this machine"
    )


def open_accounts(kind: AccountKind, data_dir: Path, uid_min: int, uid_max: int) -> Accounts:
    """The configured account mapping, its state and homes under data_dir."""
    if kind == "system":
        return SystemAccounts()
    return RangeAccounts(data_dir / "accounts.json", data_dir / "home", uid_min, uid_max)


def may_enter(path: str, ids: tuple[int, int] | None) -> bool:
    """Whether an account (uid, gid; no supplementary groups; None: one that owns nothing yet) may enter the
    directory `path`: every directory on its way, symlinks resolved, lets it search. Read from the modes, as the
    kernel would decide, so the service (root) never answers "exists" for a place the user could not see."""
    try:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            return False
        for d in [*reversed(Path(real).parents), Path(real)]:
            st = d.stat()
            bit = (
                0o100
                if ids is not None and st.st_uid == ids[0]
                else 0o010
                if ids is not None and st.st_gid == ids[1]
                else 0o001
            )
            if not st.st_mode & bit:
                return False
    except (OSError, ValueError):
        return False
    return True


def unreachable_ancestor(path: Path) -> Path | None:
    """The first directory above `path` that other users cannot traverse (no o+x), if any: a job running as its
    own user then cannot reach its output directory by its absolute path."""
    for parent in reversed(Path(path).resolve().parents):
        try:
            if not parent.stat().st_mode & 0o001:
                return parent
        except OSError:
            return parent
    return None
