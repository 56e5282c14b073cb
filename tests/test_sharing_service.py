"""GPU sharing through the service: requests with a share of a GPU or a MIG profile (and their 422s), where they
launch (shares of one GPU together, summing to at most 1), GPU-hours counted by the share, the pools answer, and
idle culling of sandboxes sharing one GPU, each judged on its own processes (the real two-process H200 trace)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandbox.culling import GpuSample
from sandbox.nvml_samples import load_trace
from scheduler.backends.base import GPUInfo, GpuSharing, MigDevice, NodeInfo
from scheduler.backends.sharing import overfull
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import build_core, create_token
from scheduler.service.core.cluster_state import ClusterState
from tests.factories import service_settings
from tests.service_kit import DEMO_TREE, Clock, ScriptedExecutor, Service, make_service
from tests.test_api_bad_input import error_of, job, snapshot, where_of, without

TRACE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpu" / "h200" / "nvml_two_process_trace.json"
MIG_A100 = tuple(MigDevice(f"MIG-{i}", "1g.10gb", 9728) for i in range(2)) + (MigDevice("MIG-3g", "3g.40gb"),)


class PidsExecutor(ScriptedExecutor):
    """A scripted executor that also says which host pids each attempt has (ReportsPids)."""

    def __init__(self) -> None:
        super().__init__()
        self.pid_of: dict[str, set[int]] = {}

    def pids(self, job_id: str, attempt: int) -> set[int] | None:
        return self.pid_of.get(job_id) if (job_id, attempt) in self.live else None


def service(tmp: Path, gpus: list[GPUInfo], executor: Any = None, **settings: Any) -> Service:
    """make_service on these GPUs (one node, "localhost", pool "local")."""
    clock, executor = Clock(), executor if executor is not None else ScriptedExecutor()
    executor.outputs = tmp / "outputs"
    core = build_core(service_settings(tmp, f"sqlite:///{tmp / 'c.db'}", grace_s=30, **settings), executor, gpus, clock)
    admin = TestClient(create_app(core, run_loop=False))
    admin.headers["Authorization"] = f"Bearer {create_token(core, 'root', Role.PLATFORM_ADMIN)}"
    assert admin.post("/v1/queues/apply", json={"document": DEMO_TREE, "comment": "t"}).status_code == 200
    return Service(core, clock, executor, admin, {})


def h100s(n: int) -> list[GPUInfo]:
    return [GPUInfo(i, "NVIDIA H100 80GB HBM3", 81559, f"GPU-{i}") for i in range(n)]


@pytest.fixture
def api(svc: Service) -> TestClient:
    c = TestClient(svc.admin.app, raise_server_exceptions=False)
    c.headers.update(svc.admin.headers)
    return c


@pytest.mark.parametrize(
    ("body", "where", "words"),
    [
        (job(gpus=0.3, workers=2), "body", ["0.3 with 2 workers", "one worker"]),
        (job(gpus=1.5), "body", ["1.5", "whole number"]),
        (job(gpus=-0.25), "body.gpus", ["greater than or equal to 0"]),
        (job(gpus=0.0000001), "body", ["at least 0.000001"]),
        (without(job(mig="5g.1tb"), "gpus"), "body", ["not a MIG profile"]),
        (without(job(mig="1g.10gb", workers=2), "gpus"), "body", ["1g.10gb with 2 workers"]),
        (job(mig="1g.10gb", gpus=1), "body", ["leave gpus out"]),
        (without(job(mig="1g.10gb"), "gpus"), "mig", ["1g.10gb"]),  # a profile no node of the pool offers
    ],
    ids=[
        "fraction x 2 workers",
        "1.5",
        "negative",
        "below a millionth",
        "bad profile",
        "mig x 2",
        "mig+gpus",
        "no such slice",
    ],
)
def test_bad_shares_are_422_and_change_nothing(
    svc: Service, api: TestClient, body: dict[str, Any], where: str, words: list[str]
) -> None:
    before = snapshot(svc)
    err = error_of(api.post("/v1/jobs", json=body), 422)
    assert where_of(err) == where, err
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert snapshot(svc) == before


def test_nan_gpus_is_refused_at_the_edge(svc: Service, api: TestClient) -> None:
    before = snapshot(svc)
    r = api.post(
        "/v1/jobs",
        content=b'{"queue": "nlp", "gpus": NaN, "command": ["x"]}',
        headers={"content-type": "application/json"},
    )
    err = error_of(r, 422)
    assert "NaN" in err["message"] and snapshot(svc) == before


def test_shares_launch_together_and_count_their_share(tmp_path: Path) -> None:
    svc = service(tmp_path, h100s(8))
    ids = [
        svc.admin.post("/v1/jobs", json=job(gpus=f, name=f"s{i}")).json()["id"]
        for i, f in enumerate([0.5, 0.25, 0.25, 0.5])
    ]
    whole = svc.admin.post("/v1/jobs", json=job(gpus=1, name="whole", queue="ranking")).json()["id"]
    svc.tick()
    launched = {launch.job_id: launch for launch in svc.executor.launched}
    assert set(launched) == {str(i) for i in [*ids, whole]}, "every share started"
    held = [
        ((n, g), launch.gpu_fraction or 1.0)
        for launch in launched.values()
        for n, gs in launch.gpus.items()
        for g in gs
    ]
    assert overfull(held) == {}
    assert [launched[str(i)].gpu_fraction for i in ids] == [0.5, 0.25, 0.25, 0.5]
    attempts = {i: svc.admin.get(f"/v1/jobs/{i}").json() for i in ids}
    assert [a["gpus"] for a in attempts.values()] == [0.5, 0.25, 0.25, 0.5]
    assert svc.admin.get(f"/v1/jobs/{whole}").json()["gpus"] == 1  # whole amounts stay ints
    # The pools answer: a shared GPU lists every job's share.
    [pool] = svc.admin.get("/v1/pools").json()["pools"]
    shared = [g for n in pool["nodes"] for g in n["gpus"] if g["shares"]]
    assert sorted(s["fraction"] for g in shared for s in g["shares"]) == [0.25, 0.25, 0.5, 0.5]
    assert all(sum(s["fraction"] for s in g["shares"]) <= 1 for g in shared)
    # An hour later: GPU-hours count the shares exactly.
    svc.clock.advance(3600)
    for i in [*ids, whole]:
        svc.executor.exit(i, 0)
    svc.tick()
    usage = svc.admin.get("/v1/usage").json()
    hours = {q["queue"]: q["gpu_hours"] for q in usage["queues"]}
    assert hours["nlp"] == pytest.approx(1.5) and hours["ranking"] == pytest.approx(1.0)


def test_mig_jobs_and_sandboxes_take_slices(tmp_path: Path) -> None:
    gpus = [*h100s(8), GPUInfo(8, "NVIDIA A100-SXM4-80GB", 81920, "GPU-8", mig_mode=True, mig=MIG_A100)]
    svc = service(tmp_path, gpus)
    assert svc.core.cluster.nodes["localhost"].spec().mig == {"1g.10gb": 2, "3g.40gb": 1}
    a = svc.admin.post("/v1/jobs", json=without(job(mig="1g.10gb", name="m1"), "gpus")).json()
    assert a["gpus"] == 0.142857 and a["spec"]["mig"] == "1g.10gb"
    nb = svc.admin.post("/v1/sandboxes", json={"queue": "nlp", "mig": "1g.10gb", "command": ["lab"]})
    assert nb.status_code in (200, 201), nb.text
    svc.tick()
    third = svc.admin.post("/v1/jobs", json=without(job(mig="1g.10gb", name="m3"), "gpus")).json()["id"]
    svc.tick()
    launches = {launch.job_id: launch for launch in svc.executor.launched}
    assert launches[str(a["id"])].mig == "1g.10gb" and launches[str(a["id"])].gpus == {"localhost": []}
    assert launches[str(a["id"])].gpu_fraction is None
    assert str(third) not in launches  # two 1g.10gb slices, both held
    [pool] = svc.admin.get("/v1/pools").json()["pools"]
    [node] = pool["nodes"]
    assert {m["profile"]: (m["slices"], m["free"], len(m["jobs"])) for m in node["mig"]} == {
        "1g.10gb": (2, 0, 2),
        "3g.40gb": (1, 1, 0),
    }
    bad = svc.admin.post("/v1/sandboxes", json={"queue": "nlp", "mig": "1g.10gbx", "command": ["lab"]})
    assert bad.status_code == 422 and "not a MIG profile" in bad.text


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/fixtures (the real NVML traces)")
def test_two_sandboxes_on_one_gpu_are_culled_on_their_own_processes(tmp_path: Path) -> None:
    """Two half-GPU notebooks share GPU 0; the H200 trace has a busy process (98 %) and one that holds memory and
    idles. The idle one's sandbox is stopped while the GPU is busy; the busy one's runs on."""
    executor = PidsExecutor()
    svc = service(tmp_path, h100s(8), executor, idle_timeout_s=4, cull_interval_s=0.2)
    roles = {v: int(k) for k, v in json.loads(TRACE.read_text())["roles"].items()}
    now: dict[int, GpuSample] = {}
    object.__setattr__(svc.core.cluster.nodes["localhost"], "sample", lambda: dict(now))
    sb = {}
    for role in ("idle", "busy"):
        r = svc.admin.post("/v1/sandboxes", json={"queue": "nlp", "gpus": 0.5, "command": ["lab"], "name": role})
        assert r.status_code in (200, 201), r.text
        sb[role] = r.json()["id"]
        executor.pid_of[str(sb[role])] = {roles[role], 99_000 + sb[role]}  # its shell too, which holds nothing
    placements = [svc.admin.get(f"/v1/jobs/{i}").json()["attempts"][-1]["placement"] for i in sb.values()]
    assert placements[0] == placements[1] and len(placements[0][0][1]) == 1  # one GPU, shared (the engine packs)
    gpu = placements[0][0][1][0]
    start, stopped_at = svc.clock.t, None
    for t, _, sample in load_trace(TRACE):
        svc.clock.t = start + t
        now[gpu] = sample
        svc.tick()
        if stopped_at is None and svc.admin.get(f"/v1/jobs/{sb['idle']}").json()["state"] == "cancelled":
            stopped_at = (t, sample.util_pct)
        assert svc.admin.get(f"/v1/jobs/{sb['busy']}").json()["state"] == "running", f"busy notebook stopped at {t}"
    assert stopped_at is not None and stopped_at[1] >= 90, stopped_at  # stopped while the GPU was busy
    assert svc.admin.get(f"/v1/jobs/{sb['idle']}").json()["reason"]["rule"] == "idle"


def test_make_service_still_whole(tmp_path: Path) -> None:
    """The default service has no MIG and no shares: its pools answer carries empty lists."""
    svc = make_service(f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
    [pool] = svc.admin.get("/v1/pools").json()["pools"]
    assert all(n["mig"] == [] and all(g["shares"] == [] for g in n["gpus"]) for n in pool["nodes"])


def test_capacity_counts_mig_slices_by_their_fraction() -> None:
    """Quotas are whole GPUs: a pool's capacity is its whole GPUs and its MIG slices' fractions, rounded down."""
    seven = tuple(MigDevice(f"MIG-{i}", "1g.10gb") for i in range(7))
    local = NodeInfo("a", "mig", [GPUInfo(0, "A100", mig_mode=True, mig=seven), *h100s(2)])
    k8s_single = NodeInfo("b", "mig", [], sharing=GpuSharing("nvidia.com/gpu", 1, {"1g.10gb": 14}, mig_single=True))
    partial = NodeInfo("c", "part", [GPUInfo(0, "A100", mig_mode=True, mig=MIG_A100)])  # 2/7 + 3/7 of a GPU
    assert ClusterState({n.name: n for n in (local, k8s_single, partial)}).capacity == {"mig": 5, "part": 0}
