"""`corral --version` prints the installed package's version (the image and the chart are tagged with it)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from scheduler.cli.main import app


def test_version_is_the_packages() -> None:
    want = re.search(r'^version\s*=\s*"([^"]+)"', (Path(__file__).parent.parent / "pyproject.toml").read_text(), re.M)
    assert want is not None
    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"corral {want.group(1)}"
