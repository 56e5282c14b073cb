"""The layer contracts in pyproject.toml ([tool.importlinter]): the tree keeps them, and a planted violation fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # lint-imports, a subprocess over the whole tree

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quotas", "scheduler", "sandbox", "notebooks")
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the packages under `where`, with the pyproject.toml there; nothing cached."""
    env = {**os.environ, "PYTHONPATH": str(where)}  # the copy's packages, not the installed (editable) tree
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=where, env=env, capture_output=True, text=True, timeout=300)


def python_only(folder: str, names: list[str]) -> set[str]:
    """copytree's ignore: keep folders and Python files (the import graph is all the contracts read)."""
    return {n for n in names if n == "__pycache__" or (not n.endswith(".py") and not (Path(folder) / n).is_dir())}


def test_the_tree_keeps_its_layers() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "broken" not in run.stdout.lower().replace("0 broken", "")


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages' Python files and pyproject.toml, copied once; the copy keeps the contracts as the tree does."""
    where = tmp_path_factory.mktemp("layers")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, where / package, ignore=python_only)
    shutil.copy(ROOT / "pyproject.toml", where / "pyproject.toml")
    run = lint_imports(where)
    assert run.returncode == 0, run.stdout + run.stderr  # so the plant alone breaks it
    return where


@pytest.mark.parametrize(
    ("planted", "line", "contract"),
    [
        ("scheduler/engine/planted.py", "from scheduler.service.store import db", "the engine imports only quotas"),
        ("scheduler/engine/planted.py", "import sandbox.culling", "the engine imports only quotas"),
        (
            "scheduler/backends/planted.py",
            "from scheduler.service.core.loop import Core",
            "backends never import the service",
        ),
        (
            "scheduler/service/api/routes_admission.py",
            "from scheduler.service.store.db import jobs",
            "routes never import the database layer",
        ),
        (
            "scheduler/service/api/app.py",
            "from scheduler.service import store",
            "routes never import the database layer",
        ),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    clean_copy: Path, tmp_path: Path, planted: str, line: str, contract: str
) -> None:
    where = tmp_path / "tree"
    shutil.copytree(clean_copy, where)
    target = where / planted
    before = target.read_text() if target.exists() else '"""Planted by tests/test_layers.py."""\n'
    target.write_text(f"{before}\n{line}\n")
    run = lint_imports(where)
    assert run.returncode == 1, run.stdout + run.stderr
    broken = run.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and planted.removesuffix(".py").replace("/", ".") in broken, run.stdout
