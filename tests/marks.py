"""Marks that follow the fixtures: a fixture that starts a real service or process tree says so here once, and every
test that uses it (directly, or through another fixture) is marked `integration` by tests/conftest.py.

`integration`: anything that starts a real service or process tree (PostgreSQL, JupyterHub and its proxy, Ray,
Chromium, the Kubernetes control plane, Kueue, the podman image, real job processes, the `corral` CLI as a
subprocess). `slow`: heavy property tests and long simulations. The fast suite deselects both:

    .venv/bin/pytest -m "not slow and not integration"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

MARK_ATTR = "corral_marks"

integration = pytest.mark.integration
slow = pytest.mark.slow


def starts_processes(fixture: F) -> F:
    """Put under `@pytest.fixture`: the tests that use this fixture are `integration`."""
    marks: tuple[str, ...] = getattr(fixture, MARK_ATTR, ())
    setattr(fixture, MARK_ATTR, (*marks, "integration"))
    return fixture


def fixture_marks(fixturedefs: Any) -> set[str]:
    """The marks the fixtures of one test's closure carry (`item._fixtureinfo.name2fixturedefs.values()`)."""
    out: set[str] = set()
    for defs in fixturedefs:
        for d in defs:
            out.update(getattr(d.func, MARK_ATTR, ()))
    return out
