"""Idle-GPU culling in the running service, fed by a real NVML trace (H100: idle, busy, allocated-idle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.culling import GpuSample
from sandbox.nvml_samples import load_trace
from tests.service_kit import Service, make_service

TRACE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpu" / "h100" / "nvml_util_trace.json"


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/fixtures (the real NVML traces)")
def test_an_allocated_but_idle_sandbox_is_warned_then_stopped(tmp_path: Path) -> None:
    svc: Service = make_service(f"sqlite:///{tmp_path / 'c.db'}", tmp_path, idle_timeout_s=4, cull_interval_s=0.2)
    trace = load_trace(TRACE)
    now: dict[int, GpuSample] = {}
    object.__setattr__(svc.core.cluster.nodes["localhost"], "sample", lambda: dict(now))
    first_busy = next(i for i, (_, phase, _) in enumerate(trace) if phase == "busy")
    sid = svc.admin.post("/v1/sandboxes", json={"queue": "nlp", "gpus": 1, "command": ["lab"]}).json()["id"]
    start = svc.clock.t
    phase_at_warning = phase_at_stop = None
    for t, phase, sample in trace[first_busy:]:
        svc.clock.t = start + t
        now[0] = sample
        svc.tick()
        kinds = [e["kind"] for e in svc.admin.get(f"/v1/jobs/{sid}/events").json()["events"]]
        if phase_at_warning is None and "idle_warning" in kinds:
            phase_at_warning = phase
            (warned,) = [
                e for e in svc.admin.get(f"/v1/jobs/{sid}/events").json()["events"] if e["kind"] == "idle_warning"
            ]
            idle = svc.admin.get(f"/v1/sandboxes/{sid}").json()["idle"]  # what the notebook's page shows
            assert idle["warning"] == warned["message"] and "UTC" in idle["warning"]
            assert "will be stopped in under a minute, at " in idle["warning"]  # not epoch seconds
            assert idle["stop_at"] - svc.clock.t == pytest.approx(idle["seconds_left"])
        if svc.admin.get(f"/v1/jobs/{sid}").json()["state"] == "cancelled":
            phase_at_stop = phase
            break
    assert (phase_at_warning, phase_at_stop) == ("allocated-idle", "allocated-idle")
    job = svc.admin.get(f"/v1/jobs/{sid}").json()
    assert job["reason"]["rule"] == "idle"
    assert job["reason"]["numbers"]["idle_gpu_minutes"] == pytest.approx(4 / 60, abs=0.01)
    assert svc.core.engine.pools["local"].pool.free_gpus == 8  # its GPU is free again
