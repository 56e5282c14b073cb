"""GPU shares and MIG on this machine: the environment each job gets (real processes), MIG layouts from NVML and
nvidia-smi (recorded fixtures and a stand-in NVML that must never be asked to change anything)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler.backends import gpus, mig, sharing
from scheduler.backends import ray as ray_backend
from scheduler.backends.base import GPUInfo, Handle, Launch, MigDevice, NodeInfo
from scheduler.backends.local import LocalExecutor
from tests.conftest import SHARED
from tests.test_gpus import FakeNVML, two_gpus
from tests.test_local_executor import stdout, wait_for

FIXTURES = SHARED / "fixtures" / "gpu"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared GPU fixtures not present")
PY = sys.executable
SHOW_ENV = (
    "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if 'CUDA' in k or 'MEM' in k "
    "or k.startswith(('CORRAL_GPU', 'XLA', 'TF_'))}))"
)
H100_MB = 81559
A100 = "NVIDIA A100-SXM4-80GB"
MIG_A = (
    MigDevice("MIG-aaaa", "1g.10gb", 9728),
    MigDevice("MIG-bbbb", "1g.10gb", 9728),
    MigDevice("MIG-cccc", "3g.40gb"),
)


def machine() -> list[GPUInfo]:
    """GPU 0 and 2 whole H100s, GPU 1 an A100 in MIG mode with two 1g.10gb and one 3g.40gb instance."""
    return [
        GPUInfo(0, "NVIDIA H100 80GB HBM3", H100_MB, "GPU-0"),
        GPUInfo(1, A100, 81920, "GPU-1", mig_mode=True, mig=MIG_A),
        GPUInfo(2, "NVIDIA H100 80GB HBM3", H100_MB, "GPU-2"),
    ]


def envs_of(executor: LocalExecutor, jobs: list[str]) -> dict[str, dict[str, str]]:
    """The environment each job printed, once all have exited (with 0)."""
    assert set(wait_exits(executor, jobs).values()) == {0}
    return {job: dict(json.loads(stdout(executor, job))) for job in jobs}


def wait_exits(executor: LocalExecutor, jobs: list[str]) -> dict[str, int | None]:
    codes: dict[str, int | None] = {}

    def done() -> bool:
        codes.update({e.job_id: e.code for e in executor.poll(0.0)})
        return set(jobs) <= set(codes)

    wait_for(done)
    return codes


# ----- pure: profiles, layouts, the share environment -----


@pytest.mark.parametrize("name", ["1g.10gb", "1g.10gb+me", "3g.40gb", "7g.80gb", "1g.5gb", "2g.35gb", "7g.141gb"])
def test_profile_names(name: str) -> None:
    assert mig.check_profile(name) == name
    assert mig.slices(name) == int(name[0])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "not a profile"),
        ("1g", "not a profile"),
        ("10gb", "not a profile"),
        ("5g.50gb", "5-slice"),
        ("1g.10GB", "not a profile"),
        ("1g.10gb; rm -rf /", "not a profile"),
        ("0g.10gb", "not a profile"),
    ],
)
def test_bad_profile_names_say_why(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        mig.check_profile(name)


def test_share_env_soft_and_mps(tmp_path: Path) -> None:
    soft = sharing.share_env(0.25, H100_MB, None)
    assert soft[sharing.CAP_ENV] == "soft" and soft[sharing.MEMORY_MB_ENV] == str(H100_MB // 4)
    assert soft[sharing.MEMORY_FRACTION_ENV] == "0.25" and soft["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.25"
    assert not any(k.startswith("CUDA_MPS") for k in soft)
    hard = sharing.share_env(0.3, H100_MB, tmp_path)
    assert hard["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={int(0.3 * H100_MB)}M"
    assert hard["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30" and hard[sharing.CAP_ENV] == "mps"
    assert hard[sharing.MPS_PIPE_ENV] == str(tmp_path)
    unknown = sharing.share_env(0.5, 0, tmp_path)  # declared GPUs: no size, so no MiB cap, the fraction still
    assert sharing.MEMORY_MB_ENV not in unknown and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in unknown
    for bad in (0, 1, 1.5, -0.25, float("nan"), True):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            sharing.share_env(bad, H100_MB, None)


def test_overfull_sums_shares_per_gpu() -> None:
    assert sharing.overfull([("a", 0.1), ("a", 0.2), ("a", 0.7), ("b", 1.0)]) == {}
    assert sharing.overfull([("a", 0.5), ("a", 0.75), ("b", 0.5)]) == {"a": 1.25}


@needs_fixtures
def test_lgip_fixture_agrees_with_the_inventory() -> None:
    """The H100's profiles as nvidia-smi mig -lgip printed them and as NVML's inventory has them (by id)."""
    table = mig.parse_lgip((FIXTURES / "h100" / "topo-mig.txt").read_text())
    assert list(table) == [0]
    names = {p.name: p for p in table[0]}
    assert sorted(names) == ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]
    assert names["1g.10gb"].instances == 7 and names["7g.80gb"].instances == 1
    device = json.loads((FIXTURES / "h100" / "nvml_inventory.json").read_text())["devices"][0]
    by_id = {p["id"]: p for p in device["gpu_instance_profiles"] if "id" in p}
    for p in table[0]:
        nvml = by_id[p.id]
        assert nvml["slices"] == mig.slices(p.name) and nvml["instances"] == p.instances
        assert abs(nvml["memory_mb"] / 1024 - p.memory_gib) < 0.01
    # MIG is off on the recorded GPU: it is a whole GPU, offered whole, with no instances.
    [gpu] = gpus.from_inventory(FIXTURES / "h100" / "nvml_inventory.json")
    assert not gpu.mig_mode and gpu.mig == ()
    assert NodeInfo("n", "h100", [gpu]).mig_counts() == {} and NodeInfo("n", "h100", [gpu]).spec().gpus == 1


def test_nvidia_smi_list() -> None:
    text = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aeca4581-8a51-b29d-f1ec-2aeddba7362b)\n"
        "GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)\n"
        "  MIG 1g.10gb     Device  1: (UUID: MIG-0e1b6c5a-3c0a-5b5f-9b4e-3c0d1f9a2b11)\n"
    )
    assert mig.parse_smi_list(text) == {
        0: [],
        1: [
            MigDevice("MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "3g.40gb"),
            MigDevice("MIG-0e1b6c5a-3c0a-5b5f-9b4e-3c0d1f9a2b11", "1g.10gb"),
        ],
    }
    with pytest.raises(ValueError, match="before any GPU"):
        mig.parse_smi_list("  MIG 1g.10gb     Device  0: (UUID: MIG-0e1b6c5a)\n")


class MigNVML(FakeNVML):
    """FakeNVML with MIG instances on GPU 1; any call that would change a GPU fails the test."""

    def __init__(self, inventory: dict[str, Any]) -> None:
        super().__init__(inventory)
        self.instances = {1: [("MIG 1g.10gb", "MIG-aaaa", 10 << 30), None, ("MIG 3g.40gb", "MIG-cccc", 40 << 30)]}

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvmlDeviceSet") or "Create" in name or "Destroy" in name:
            raise AssertionError(f"{name}: Corral must never change a GPU's MIG mode or layout")
        return super().__getattribute__(name)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict[str, Any]) -> int:  # noqa: N802
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict[str, Any], i: int) -> dict[str, Any]:  # noqa: N802
        slots = self.instances.get(h["index"], [])
        slot = slots[i] if i < len(slots) else None
        if slot is None:
            raise self.NVMLError("Not Found")
        name, uuid, memory = slot
        return {"name": f"{h['name']} {name}", "uuid": uuid, "memory_total": memory, "mig_mode": "n/a"}


def test_nvml_reads_the_mig_layout_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "pynvml", MigNVML(two_gpus()))
    found = gpus.discover_nvml() or []
    assert [g.mig for g in found] == [
        (),
        (MigDevice("MIG-aaaa", "1g.10gb", 10240), MigDevice("MIG-cccc", "3g.40gb", 40960)),
    ]
    node = NodeInfo("local", "h100", found)
    assert node.spec().gpus == 1 and node.mig_counts() == {"1g.10gb": 1, "3g.40gb": 1}


def test_inventory_with_mig_instances(tmp_path: Path) -> None:
    inv = {
        "devices": [
            {
                "index": 0,
                "name": A100,
                "uuid": "GPU-1",
                "memory_total": 80 << 30,
                "mig_mode": [1, 1],
                "mig_devices": [{"uuid": "MIG-a", "name": f"{A100} MIG 2g.20gb", "memory_total": 20 << 30}],
            }
        ]
    }
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(inv))
    assert gpus.from_inventory(path)[0].mig == (MigDevice("MIG-a", "2g.20gb", 20480),)
    inv["devices"][0]["mig_devices"] = [{"uuid": "MIG-a", "profile": "9g.1gb"}]
    path.write_text(json.dumps(inv))
    with pytest.raises(ValueError, match="9-slice"):
        gpus.from_inventory(path)


# ----- real processes -----


def launch(executor: LocalExecutor, job: str, **kw: Any) -> None:
    executor.launch(Launch(job_id=job, attempt=1, command=[PY, "-c", SHOW_ENV], **kw))


@pytest.mark.integration
def test_shares_of_one_gpu_see_it_and_their_caps(tmp_path: Path) -> None:
    """Three jobs share engine GPU 1 (physical GPU 2: GPU 1 is in MIG mode), a fourth holds GPU 0 whole. The
    environments they actually got: per physical GPU the shares sum to at most 1, each capped at its share."""
    executor = LocalExecutor(tmp_path / "runs", gpus=machine(), mps_pipe=tmp_path / "no-mps")
    asks = {"a": 0.5, "b": 0.25, "c": 0.25}
    for job, f in asks.items():
        launch(executor, job, gpus={"local": [1]}, gpu_fraction=f, env={"CORRAL_GPU_FRACTION": "1"})
    launch(executor, "w", gpus={"local": [0]})
    envs = envs_of(executor, [*asks, "w"])
    held = [(e["CUDA_VISIBLE_DEVICES"], float(e.get(sharing.FRACTION_ENV, "1"))) for e in envs.values()]
    assert sharing.per_gpu(held) == {"2": 1.0, "0": 1.0} and sharing.overfull(held) == {}
    for job, f in asks.items():
        assert envs[job][sharing.FRACTION_ENV] == f"{f:g}"  # the job's own env cannot claim a larger share
        assert envs[job][sharing.MEMORY_MB_ENV] == str(int(f * H100_MB)) and envs[job][sharing.CAP_ENV] == "soft"
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in envs[job]
    assert sharing.FRACTION_ENV not in envs["w"]


@pytest.mark.integration
def test_under_mps_the_cap_is_the_drivers(tmp_path: Path) -> None:
    pipe = tmp_path / "mps"
    pipe.mkdir()
    (pipe / "control").touch()  # what nvidia-cuda-mps-control -d makes
    executor = LocalExecutor(tmp_path / "runs", gpus=machine(), mps_pipe=pipe)
    launch(executor, "m", gpus={"local": [0]}, gpu_fraction=0.5)
    env = envs_of(executor, ["m"])["m"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env[sharing.CAP_ENV] == "mps"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={H100_MB // 2}M"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50" and env[sharing.MPS_PIPE_ENV] == str(pipe)


@pytest.mark.integration
def test_mig_jobs_get_distinct_instances_by_uuid(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "runs", gpus=machine())
    sleeper = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"
    for job in ("m1", "m2"):
        executor.launch(Launch(job, 1, [PY, "-c", sleeper], {"local": []}, mig="1g.10gb"))
    with pytest.raises(ValueError, match="no free MIG 1g.10gb"):
        executor.launch(Launch("m3", 1, [PY, "-c", sleeper], {"local": []}, mig="1g.10gb"))
    wait_for(lambda: all(stdout(executor, j).strip() for j in ("m1", "m2")))
    assert sorted(stdout(executor, j).strip() for j in ("m1", "m2")) == ["MIG-aaaa", "MIG-bbbb"]
    # A restarted service knows which instances its adopted attempts hold.
    again = LocalExecutor(tmp_path / "runs", gpus=machine())
    for job in ("m1", "m2"):
        assert again.adopt(executor_handle(executor, job)) is None
    with pytest.raises(ValueError, match="no free MIG"):
        again.launch(Launch("m4", 1, [PY, "-c", sleeper], {"local": []}, mig="1g.10gb"))
    for job in ("m1", "m2"):
        executor.terminate(job, 1, 0.0, 0.0)
    wait_exits(executor, ["m1", "m2"])


def executor_handle(executor: LocalExecutor, job: str) -> Handle:
    a = executor._attempts[(job, 1)]  # noqa: SLF001
    return Handle(job, 1, a.pid, a.start)


@pytest.mark.integration
def test_pids_of_an_attempt(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "runs")
    child = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print('up', flush=True); time.sleep(30)"
    )
    executor.launch(Launch("p", 1, [PY, "-c", child], {}))
    wait_for(lambda: stdout(executor, "p").strip() == "up")
    pids = executor.pids("p", 1) or set()
    assert len(pids) >= 3  # the shim, the job, its child
    executor.terminate("p", 1, 0.0, 0.0)
    wait_exits(executor, ["p"])
    assert executor.pids("p", 1) is None


def test_ray_nodes_offer_mig_slices_they_declare() -> None:
    """Ray knows no MIG: a node's custom resources "mig-<profile>" are its slices (docs/ray.md)."""
    res = {"GPU": 1.0, "CPU": 8.0, "mig-1g.10gb": 7.0, "mig-3g.40gb": 0.5, "mig-team": 1.0, "node:10.0.0.1": 1.0}
    assert ray_backend._mig_resources(res) == {"1g.10gb": 7}  # noqa: SLF001
