"""Shared test paths."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def corral_cmd() -> list[str]:
    """The installed `corral` console script, falling back to the module."""
    exe = Path(sys.executable).parent / "corral"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("corral")
    return [found] if found else [sys.executable, "-m", "scheduler.cli"]
