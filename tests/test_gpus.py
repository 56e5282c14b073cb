"""GPU discovery: parsing real NVML readings (H100, H200), declared GPUs, and NVML calls through a stand-in."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandbox.nvml_samples import read_samples
from scheduler.backends import gpus
from scheduler.backends.base import GPUInfo
from tests.conftest import SHARED

FIXTURES = SHARED / "fixtures" / "gpu"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared GPU fixtures not present")


def smi_query(model: str) -> dict[str, str]:
    """nvidia-smi's own reading of the same GPU (query-gpu.csv), to check our parse against."""
    with open(FIXTURES / model / "query-gpu.csv") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    assert len(rows) == 1
    return rows[0]


@needs_fixtures
@pytest.mark.parametrize(
    ("model", "name", "memory_mb"),
    [("h100", "NVIDIA H100 80GB HBM3", 81559), ("h200", "NVIDIA H200", 143771)],
)
def test_from_inventory_matches_nvidia_smi(model: str, name: str, memory_mb: int) -> None:
    [gpu] = gpus.from_inventory(FIXTURES / model / "nvml_inventory.json")
    smi = smi_query(model)
    assert gpu == GPUInfo(index=0, model=name, memory_mb=memory_mb, uuid=smi["uuid"], mig_mode=False)
    assert smi["name"] == name
    assert smi["memory.total [MiB]"] == f"{memory_mb} MiB"
    assert smi["mig.mode.current"] == "Disabled"
    assert gpu.uuid is not None and gpu.uuid.startswith("GPU-")


def test_from_inventory_reads_refusals_as_unknown(tmp_path: Path) -> None:
    inventory = {
        "devices": [
            {"index": 0, "name": "NVIDIA A100", "uuid": "GPU-a", "memory_total": 2 << 30, "mig_mode": [1, 1]},
            # MIG switched on but not yet active: pending does not count. Refused calls are "error: ..." strings.
            {
                "index": 1,
                "name": "NVIDIA A100",
                "uuid": "error: Unknown",
                "memory_total": "error: x",
                "mig_mode": [0, 1],
            },
            {"index": 2, "name": "NVIDIA T4", "mig_mode": "error: Not Supported"},
        ]
    }
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(inventory))
    assert gpus.from_inventory(path) == [
        GPUInfo(0, "NVIDIA A100", 2048, "GPU-a", True),
        GPUInfo(1, "NVIDIA A100", 0, None, False),
        GPUInfo(2, "NVIDIA T4", 0, None, False),
    ]


@pytest.mark.parametrize("text", ["not json", "[]", '{"devices": 3}', '{"devices": [{"index": 0}]}'])
def test_from_inventory_rejects_other_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        gpus.from_inventory(path)


def test_declared() -> None:
    assert gpus.declared(2, "virtual", 1024) == [GPUInfo(0, "virtual", 1024), GPUInfo(1, "virtual", 1024)]
    assert gpus.declared(0, "virtual") == []


@pytest.mark.parametrize(
    ("count", "model", "memory", "message"),
    [(-1, "virtual", 0, "count"), (1, "", 0, "model"), (1, "  ", 0, "model"), (1, "v", -5, "memory")],
)
def test_declared_errors(count: int, model: str, memory: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpus.declared(count, model, memory)


def test_detect_prefers_declared_gpus() -> None:
    assert gpus.detect(4, "virtual") == gpus.GpuSource("declared", gpus.declared(4, "virtual"))
    with pytest.raises(ValueError, match="count"):
        gpus.detect(model="virtual")


class FakeNVML:
    """Just enough of pynvml, answering from an inventory file, to exercise discovery without a driver."""

    class NVMLError(Exception):
        pass

    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, inventory: dict[str, Any], fail_init: bool = False, lost: int | None = None) -> None:
        self.devices = inventory["devices"]
        self.fail_init, self.lost, self.open = fail_init, lost, 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:  # noqa: N802
        if i == self.lost:
            raise self.NVMLError("GPU is lost")
        return dict(self.devices[i])

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:  # noqa: N802 - old pynvml returned bytes
        return str(h["name"]).encode()

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:  # noqa: N802
        return str(h["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=h["memory_total"], used=503316480)

    def nvmlDeviceGetMigMode(self, h: dict[str, Any]) -> list[int]:  # noqa: N802
        if not isinstance(h["mig_mode"], list):
            raise self.NVMLError("Not Supported")
        return list(h["mig_mode"])

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> SimpleNamespace:  # noqa: N802
        if h["mig_mode"] == [1, 1]:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=94, memory=40)


def two_gpus() -> dict[str, Any]:
    h100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-x", "memory_total": 85520809984, "mig_mode": [0, 0]}
    return {"devices": [{**h100, "index": 0}, {**h100, "index": 1, "uuid": "GPU-y", "mig_mode": [1, 1]}]}


@pytest.mark.parametrize("fake", [None, FakeNVML(two_gpus(), fail_init=True)])
def test_without_nvml_there_is_nothing_to_discover(monkeypatch: pytest.MonkeyPatch, fake: FakeNVML | None) -> None:
    monkeypatch.setattr(gpus, "pynvml", fake)
    assert gpus.discover_nvml() is None
    assert gpus.detect() == gpus.GpuSource("none", [])


def test_discover_and_sample_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML(two_gpus())
    monkeypatch.setattr(gpus, "pynvml", fake)
    found = gpus.discover_nvml()
    assert found == [
        GPUInfo(0, "NVIDIA H100 80GB HBM3", 81559, "GPU-x", False),
        GPUInfo(1, "NVIDIA H100 80GB HBM3", 81559, "GPU-y", True),
    ]
    assert gpus.detect() == gpus.GpuSource("nvml", found)
    assert fake.open == 0  # every init was shut down


def test_a_lost_gpu_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "pynvml", FakeNVML(two_gpus(), lost=0))
    assert [g.uuid for g in gpus.discover_nvml() or []] == ["GPU-y"]


@needs_fixtures
def test_fake_nvml_agrees_with_the_inventory_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    path = FIXTURES / "h200" / "nvml_inventory.json"
    monkeypatch.setattr(gpus, "pynvml", FakeNVML(json.loads(path.read_text())))
    assert gpus.discover_nvml() == gpus.from_inventory(path)


def test_live_nvml() -> None:
    found = gpus.discover_nvml()
    if found is None:
        pytest.skip("NVML does not initialise here (no driver or no nvidia-ml-py)")
    assert all(g.model and g.memory_mb > 0 and g.uuid for g in found)
    samples = read_samples()
    assert samples is not None
    assert all(0.0 <= s.util_pct <= 100.0 and s.mem_used_bytes >= 0 for s in samples.values())
