"""Service settings come from flags, then CORRAL_* in the environment, then the CORRAL_CONFIG file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from scheduler.service.core.settings import ServiceSettings


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "corral.yaml"
    config.write_text("port: 9000\ngrace_s: 5\ngpus: 2\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    monkeypatch.setenv("CORRAL_GRACE_S", "7")
    s = ServiceSettings(gpus=4)
    assert (s.port, s.grace_s, s.gpus) == (9000, 7.0, 4)


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    s = ServiceSettings()
    assert s.url == f"sqlite:///{tmp_path / 'corral' / 'corral.db'}"


def test_bad_settings_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "corral.yaml"
    config.write_text("prot: 9000\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    with pytest.raises(ValidationError, match="prot"):
        ServiceSettings()
    monkeypatch.delenv("CORRAL_CONFIG")
    monkeypatch.setenv("CORRAL_GPUS", "-1")
    with pytest.raises(ValidationError, match="gpus"):
        ServiceSettings()
