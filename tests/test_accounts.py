"""Which account runs a user's jobs (scheduler/backends/accounts.py), and the modes the service gives its files.

No uid switching here, so nothing needs root: the jobs themselves are attacked in tests/test_attack_isolation.py.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import tempfile
from pathlib import Path

import pytest

from scheduler.backends.accounts import RangeAccounts, SystemAccounts, unreachable_ancestor
from tests import attack_kit
from tests.service_kit import make_service


def test_range_uids_are_stable_private_and_never_an_existing_accounts(tmp_path: Path) -> None:
    taken = pwd.getpwnam("nobody").pw_uid  # an account the system has: its uid is never handed out
    accounts = RangeAccounts(tmp_path / "accounts.json", tmp_path / "home", taken, taken + 2)
    alice, bob = accounts.uid_of("alice"), accounts.uid_of("bob")
    assert taken not in (alice, bob) and alice != bob
    assert accounts.uid_of("alice") == alice
    # A new service (a restart) reads the same table.
    assert RangeAccounts(tmp_path / "accounts.json", tmp_path / "home", taken, taken + 2).uid_of("alice") == alice
    assert json.loads((tmp_path / "accounts.json").read_text()) == {"alice": alice, "bob": bob}
    assert (tmp_path / "accounts.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(RuntimeError, match="no free uid"):
        accounts.uid_of("carol")
    with pytest.raises(ValueError, match="without an owner"):
        accounts.uid_of("")


def test_range_refuses_root_and_empty_ranges(tmp_path: Path) -> None:
    for low, high in ((0, 10), (20, 10)):
        with pytest.raises(ValueError, match="uid range"):
            RangeAccounts(tmp_path / "a.json", tmp_path / "home", low, high)


def test_system_accounts_map_people_never_root_or_service_accounts() -> None:
    """A name a team admin may mint (`postgres`, `www-data`, `daemon`) must not become that service's uid, and no
    account brings its supplementary groups (docker, sudo, disk)."""
    nobody = pwd.getpwnam("nobody")
    got = SystemAccounts().account("nobody")
    assert (got.uid, got.gid, got.home) == (nobody.pw_uid, nobody.pw_gid, Path(nobody.pw_dir))
    for system in ("root", "daemon", "bin", "postgres"):
        if system in {p.pw_name for p in pwd.getpwall()}:
            attack_kit.attempt("1 isolation: a system account's name")
            with pytest.raises(ValueError, match="below 1000"):
                SystemAccounts().account(system)
    with pytest.raises(ValueError, match="no system account"):
        SystemAccounts().account("no-such-user-here")


def test_unreachable_ancestor() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # pytest's own tmp sits in a directory closed to others
        closed = Path(top) / "closed"
        (closed / "data").mkdir(parents=True)
        os.chmod(top, 0o755)
        os.chmod(closed, 0o700)
        assert unreachable_ancestor(closed / "data") == closed
        os.chmod(closed, 0o711)
        assert unreachable_ancestor(closed / "data") is None


def test_the_service_fixes_the_modes_of_its_files(tmp_path: Path) -> None:
    """A database an older version left readable (0644) is the service's alone after a start; data_dir is passed
    through, never listed."""
    data = tmp_path / "data"
    data.mkdir()
    sqlite3.connect(data / "corral.db").close()
    os.chmod(data / "corral.db", 0o644)
    os.chmod(data, 0o755)
    make_service(f"sqlite:///{data / 'corral.db'}", tmp_path)
    assert (data / "corral.db").stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o711
