"""`corral sim generate services`: deterministic, loads through the trace and cluster readers, replays cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app
from scheduler.sim.generate import GPUS_PER_NODE, ServicesConfig, services
from scheduler.sim.inputs import load_cluster, load_trace
from scheduler.sim.runner import Simulation
from tests.conftest import SHARED

runner = CliRunner()
SMALL = ServicesConfig(seed=7, days=3, batch_per_day=12)


def _files(tmp_path: Path, config: ServicesConfig, name: str) -> tuple[Path, Path]:
    trace, cluster = tmp_path / f"{name}.csv", tmp_path / f"{name}.yaml"
    services(config).write(trace, cluster)
    return trace, cluster


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a, b = _files(tmp_path, SMALL, "a"), _files(tmp_path, SMALL, "b")
    c = _files(tmp_path, ServicesConfig(8, days=3, batch_per_day=12), "c")
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_what_the_trace_models(tmp_path: Path) -> None:
    trace, cluster = _files(tmp_path, ServicesConfig(seed=3), "t")
    world = load_cluster(cluster)
    jobs = load_trace(trace)
    assert len({j.spec.id for j in jobs}) == len(jobs) > 1000
    assert [j.submit for j in jobs] == sorted(j.submit for j in jobs)
    svc = [j for j in jobs if not j.spec.preemptible]
    batch = [j for j in jobs if j.spec.preemptible]
    assert {j.spec.queue for j in svc} == {f"team-{i}" for i in range(6)}
    assert all(14 * 86400 <= j.duration <= 90 * 86400 and 1 <= j.spec.gpus <= 8 for j in svc)
    assert all(300 <= j.duration <= 3 * 86400 and j.spec.priority == 0 for j in batch)
    assert any(j.spec.workers > 1 for j in batch)
    assert {n.pool for n in world.nodes} == {"h100", "a100", "l40s"}
    # Tight teams (0, 2, 4): the home quota is exactly their early services' GPUs; the late one waits on it.
    for i in (0, 2, 4):
        team = world.tree[f"team-{i}"]
        pool = ("h100", "a100", "l40s")[i % 3]
        early = [j for j in svc if j.spec.queue == team.name and j.submit < ServicesConfig.late_service]
        assert team.quota_of(pool) == sum(j.spec.request for j in early)
        assert any(j.spec.queue == team.name and j.submit == ServicesConfig.late_service for j in svc)
    # Mostly idle: mean demand (services' GPUs, batch GPU-time over its span) under half the capacity.
    span = 30 * 86400
    demand = sum(j.spec.request for j in svc) + sum(j.spec.request * j.duration for j in batch) / span
    assert demand / sum(n.gpus for n in world.nodes) < 0.5
    assert all(n.gpus == GPUS_PER_NODE for n in world.nodes)


@pytest.mark.integration
def test_cli_writes_loadable_files_and_the_replay_checks(tmp_path: Path) -> None:
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    res = runner.invoke(
        app,
        [
            "sim",
            "generate",
            "services",
            "-o",
            str(trace),
            "--cluster",
            str(cluster),
            "--seed",
            "7",
            "--days",
            "3",
            "--batch-per-day",
            "12",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and trace.read_bytes() == _files(tmp_path, SMALL, "same")[0].read_bytes()
    res = runner.invoke(app, ["sim", "trace", str(trace), "--cluster", str(cluster), "--json"])
    assert res.exit_code == 0, res.output
    tool = SHARED / "tools" / "check_trace.py"
    if not tool.exists():
        pytest.skip("check_trace.py not available")
    events = tmp_path / "e.json"
    events.write_text(res.stdout)
    done = subprocess.run(
        [sys.executable, str(tool), str(trace), str(cluster), str(events), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["metrics"]["completed"] == len(load_trace(trace))


def test_cli_bad_arguments(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "sim",
            "generate",
            "services",
            "-o",
            str(tmp_path / "t.csv"),
            "--cluster",
            str(tmp_path / "c.yaml"),
            "--pools",
            "4",
        ],
    )
    assert res.exit_code == 2
    res = runner.invoke(
        app,
        ["sim", "generate", "services", "-o", str(tmp_path / "none" / "t.csv"), "--cluster", str(tmp_path / "c.yaml")],
    )
    assert res.exit_code == 2 and "cannot write the file" in res.output


@pytest.mark.slow  # a generated world replayed under every policy
def test_small_world_replays_under_every_policy(tmp_path: Path) -> None:
    trace, cluster = _files(tmp_path, SMALL, "p")
    for policy in ("corral", "fifo", "strict-quota", "las"):
        world = load_cluster(cluster)
        world.jobs = load_trace(trace)
        log = Simulation(world, policy, log_fair_share=False).run()
        assert log["events"], policy
