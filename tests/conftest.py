"""Shared test paths."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import attack_kit
from tests.marks import fixture_marks, starts_processes
from tests.service_kit import Service, database_url, make_service

# Services the tests start as processes run their jobs as the service's own user: their jobs run this checkout's
# interpreter, which (under /root here) other accounts cannot reach. tests/test_attack_isolation.py asks for users.
os.environ.setdefault("CORRAL_RUN_AS", "service")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
@starts_processes
def corral_cmd() -> list[str]:
    """The installed `corral` console script, falling back to the module: tests that run it are `integration`."""
    exe = Path(sys.executable).parent / "corral"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("corral")
    return [found] if found else [sys.executable, "-m", "scheduler.cli.main"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each kind (PostgreSQL when CORRAL_TEST_POSTGRES_URL names a server)."""
    yield from database_url(request.param, tmp_path)


@pytest.fixture
def svc(db_url: str, tmp_path: Path) -> Service:
    """A service with the demo tree on 8 GPUs, a scripted executor and a clock the test moves."""
    return make_service(db_url, tmp_path)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`integration` for the tests that use a fixture marked with tests.marks.starts_processes (directly or through
    another fixture), and for every PostgreSQL case of a test parametrized over the databases (`db_url`); `slow`
    for every property test (hypothesis's @given: hundreds of generated worlds each)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        marks = fixture_marks(info.name2fixturedefs.values()) if info is not None else set()
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            marks.add("slow")
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(isinstance(v, str) and v == "postgresql" for v in callspec.params.values()):
            marks.add("integration")
        for name in sorted(marks):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The attack suite's tally (tests/attack_kit.py): attacks tried per item of the tenant-isolation issue."""
    text = attack_kit.report()
    if text:
        terminalreporter.section("attack suite: attacks tried (each failed, or its test failed)")
        terminalreporter.write_line(text)


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """A service built in this process sets umask 077 (its files are its own): later tests must not inherit it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)
