"""Metrics on a hand-made event log with known answers, and `corral sim report` end to end on a small trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app
from scheduler.sim import fragmentation, report
from scheduler.sim.inputs import load_cluster, load_trace
from scheduler.sim.metrics import compute, jain, percentile, usage_series
from scheduler.sim.runner import Simulation
from scheduler.sim.waste import HoldCounts, IdleWait, PreemptionWaste, Waste
from tests.conftest import SHARED
from tests.factories import sim_job

runner = CliRunner()


JOBS = [
    sim_job("a", 0, 10, "qa", "p", gpus=4),
    sim_job("b", 0, 5, "qa", "p", gpus=8),
    sim_job("c", 5, 10, "qb", "p", gpus=2),
    sim_job("d", 1, 1, "qb", "p", gpus=1),
]


def _started(t: float, job: str, gpus: list[int]) -> dict[str, Any]:
    return {"t": t, "event": "started", "job": job, "nodes": {"p-0": gpus}}


# One 8-GPU node. a runs 0-6, is preempted, runs again 10-20; c runs 5-15; b waits for the whole node, 20-25.
LOG: dict[str, Any] = {
    "policy": "corral",
    "fair_share": [],
    "events": [
        {"t": 0, "event": "submitted", "job": "a", "queue": "qa"},
        {"t": 0, "event": "submitted", "job": "b", "queue": "qa"},
        _started(0, "a", [0, 1, 2, 3]),
        {"t": 1, "event": "rejected", "job": "d", "queue": "qb", "reason": "test"},
        {"t": 5, "event": "submitted", "job": "c", "queue": "qb"},
        _started(5, "c", [4, 5]),
        {"t": 6, "event": "preempted", "job": "a", "reason": "priority"},
        _started(10, "a", [0, 1, 2, 3]),
        {"t": 15, "event": "completed", "job": "c"},
        {"t": 20, "event": "completed", "job": "a"},
        _started(20, "b", list(range(8))),
        {"t": 25, "event": "completed", "job": "b"},
    ],
}


def test_percentile_and_jain() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3, 1, 2], 50) == 2 and percentile([0, 0, 20], 95) == 20
    assert percentile(list(range(100)), 99) == 99 and percentile(list(range(100)), 50) == 50
    assert jain([]) == 1.0 and jain([0, 0]) == 1.0 and jain([5, 5, 5]) == 1.0
    assert jain([10, 0]) == pytest.approx(0.5)


def test_metrics_known_answers() -> None:
    m = compute(JOBS, LOG, capacity=8)
    o = m.overall
    assert (o.jobs, o.started, o.completed, o.rejected, o.unfinished, o.preemptions) == (4, 3, 3, 1, 0, 1)
    assert sorted(o.waits) == [0, 0, 20]
    assert o.mean_wait == pytest.approx(20 / 3)
    assert (o.p50_wait, o.p95_wait, o.p99_wait) == (0, 20, 20)
    assert o.mean_jct == pytest.approx(55 / 3) and (o.p50_jct, o.p95_jct) == (20, 25)
    assert o.makespan == 25 and m.span == 25
    # a: 4x6 + 4x10, c: 2x10, b: 8x5 = 124 GPU-seconds held, of 8 x 25.
    assert o.gpu_seconds == 124 and o.utilisation == pytest.approx(0.62)
    assert m.useful_utilisation == pytest.approx(100 / 200)
    qa, qb = m.queues["qa"], m.queues["qb"]
    assert (qa.mean_wait, qa.preemptions, qa.gpu_seconds) == (10, 1, 104)
    assert qa.utilisation == pytest.approx(0.52)
    assert (qb.started, qb.rejected, qb.mean_wait, qb.makespan, qb.gpu_seconds) == (1, 1, 0, 14, 20)
    assert m.jain_queue_mean_wait == pytest.approx(0.5)  # mean waits 10 and 0


def test_metrics_count_what_fractional_jobs_hold() -> None:
    # Two jobs share GPU 0 of one 8-GPU node, 0.25 and 0.5 of it, for 100 s: 75 GPU-seconds, not 200.
    jobs = [sim_job("x", 0, 100, "qa", "p", gpus=0.25), sim_job("y", 0, 100, "qa", "p", gpus=0.5)]
    log = {
        "policy": "corral",
        "fair_share": [],
        "events": [
            {**_started(0, "x", [0]), "fraction": 0.25},
            {**_started(0, "y", [0]), "fraction": 0.5},
            {"t": 100, "event": "completed", "job": "x"},
            {"t": 100, "event": "completed", "job": "y"},
        ],
    }
    m = compute(jobs, log, 8)
    assert m.overall.gpu_seconds == pytest.approx(75.0) and m.useful_utilisation == pytest.approx(75 / 800)
    _, per_q = usage_series(jobs, log, bins=2)
    assert per_q["qa"] == pytest.approx([0.75, 0.75])


def test_usage_series_bin_means() -> None:
    starts, per_q = usage_series(JOBS, LOG, bins=5)
    assert starts == [0, 5, 10, 15, 20]
    assert per_q["qa"] == pytest.approx([4, 0.8, 4, 4, 8])
    assert per_q["qb"] == pytest.approx([0, 2, 2, 0, 0])


@pytest.mark.integration
def test_metrics_match_check_trace(tmp_path: Path) -> None:
    tool = SHARED / "tools" / "check_trace.py"
    if not tool.exists():
        pytest.skip("check_trace.py not available")
    trace, cluster, events = tmp_path / "t.csv", tmp_path / "c.yaml", tmp_path / "e.json"
    trace.write_text(
        "id,submit,duration,queue,pool,workers,gpus\n"
        + "".join(f"{j.spec.id},{j.submit},{j.duration},{j.spec.queue},p,1,{j.spec.gpus}\n" for j in JOBS)
    )
    cluster.write_text(
        "cluster:\n  pools:\n    - {name: p, nodes: 1, gpus_per_node: 8}\nqueues:\n  - {name: qa}\n  - {name: qb}\n"
    )
    events.write_text(json.dumps(LOG))
    res = subprocess.run(
        [sys.executable, str(tool), str(trace), str(cluster), str(events), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    want = json.loads(res.stdout)["metrics"]
    m = compute(load_trace(trace), LOG, capacity=8)
    got = {
        "completed": m.overall.completed,
        "rejected": m.overall.rejected,
        "mean_wait": m.overall.mean_wait,
        "p50_wait": m.overall.p50_wait,
        "p95_wait": m.overall.p95_wait,
        "p99_wait": m.overall.p99_wait,
        "mean_jct": m.overall.mean_jct,
        "makespan": m.overall.makespan,
        "utilisation": m.overall.utilisation,
        "useful_utilisation": m.useful_utilisation,
        "jain_queue_mean_wait": m.jain_queue_mean_wait,
    }
    assert got == pytest.approx({k: want[k] for k in got})


CLUSTER = """\
cluster:
  pools:
    - {name: a100, nodes: 2, gpus_per_node: 8}
queues:
  - {name: team-a, quota: {a100: 10}}
  - {name: team-b, quota: {a100: 6}}
  - {name: scratch}
settings: {min_runtime: 0, starvation_timeout: 600}
"""


def _trace(n: int) -> str:
    """n jobs over three queues, sizes 1 to 16 GPUs (16: a 2x8 gang, too big for team-b's private node)."""
    rows = ["id,submit,duration,queue,pool,workers,gpus,priority,preemptible"]
    queues, sizes = ["team-a", "team-b", "scratch"], [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8)]
    for i in range(n):
        w, g = sizes[(i * 7) % len(sizes)]
        rows.append(f"j{i:02d},{i * 20},{100 + (i * 37) % 400},{queues[i % 3]},a100,{w},{g},0,true")
    return "\n".join(rows) + "\n"


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    trace, cluster = tmp_path / "trace.csv", tmp_path / "cluster.yaml"
    trace.write_text(_trace(30))
    cluster.write_text(CLUSTER)
    return trace, cluster


def test_private_world(small: tuple[Path, Path]) -> None:
    trace, cluster = small
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    assert report.private_world(world, "scratch") is None
    made = report.private_world(world, "team-b")
    assert made is not None
    alone, quota, gpus = made
    assert (quota, gpus, len(alone.nodes)) == (6, 8, 1)
    assert {j.spec.queue for j in alone.jobs} == {"team-b"}
    p = report.run_private(world, "team-b")
    assert p.rejected == sum(1 for j in alone.jobs if j.spec.request > 8) > 0


def test_report_end_to_end(small: tuple[Path, Path], tmp_path: Path) -> None:
    trace, cluster = small
    out = tmp_path / "out"
    args = ["sim", "report", str(trace), "--cluster", str(cluster), "-o", str(out)]
    res = runner.invoke(
        app,
        args + [a for p in ("corral", "fifo", "strict-quota", "las", "best-fit-fractions") for a in ("--policy", p)],
    )
    assert res.exit_code == 0, res.output
    for name in ("report.md", "wait_cdf.png", "gpus_in_use.png", "idle_wait.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "wait_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Per policy" in md and "## Sharing anomaly" in md and "| team-b | 6 | 8 |" in md
    assert "| scratch | 0 | 0 |" in md and "n/a" in md
    for p in ("corral", "fifo", "strict-quota", "las", "best-fit-fractions"):
        assert f"## Policy {p}, per queue" in md
        assert f"{p}: mean wait" in res.output
    assert "30 jobs on 16 GPUs" in md
    for section in (
        "## Idle waits, guard holds, preemptions",
        "## Idle-wait GPU-hours per queue",
        "## Guard holds per queue",
        "![idle-wait GPU-hours per queue](idle_wait.png)",
    ):
        assert section in md
    assert "| policy | idle-wait GPU-h | of which preemptible | jobs idle-waiting |" in md
    assert "same-instant" in res.output
    assert (
        "## Unallocated GPUs while jobs wait (fragmentation)" in md and "GPUs unallocated while jobs wait" in res.output
    )


def test_report_waste_sections(small: tuple[Path, Path]) -> None:
    trace, cluster = small
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    rep = report.build(world, ["corral", "fifo"])
    # Made-up numbers, so that the test reads the rendering only, not what the policies did.
    held = HoldCounts(
        {"held_nodes": 1, "queue_mate": 2, "guarantee": 0, "limit": 0},
        {"team-b": {"held_nodes": 1, "queue_mate": 2, "guarantee": 0, "limit": 0}},
        3,
        1,
        9,
    )
    rep.runs[0].waste = Waste(
        IdleWait(7200.0, 2, 3600.0, 3600.0),
        {"team-a": IdleWait(7200.0, 2, 3600.0)},
        PreemptionWaste(5, 3, 1, 36000.0, 7200.0),
        held,
    )
    rep.runs[1].waste = Waste(IdleWait(), {"team-a": IdleWait()}, PreemptionWaste(), None)
    md = report.markdown(rep, "t")
    assert "| corral | 2.0 | 1.0 | 2 | 0.04 | 1 | 2 | 0 | 0 | 5 | 3 | 1 | 10 | 2.0 |" in md
    assert "| fifo | 0 | 0 | 0 | 0.00 | n/a | n/a | n/a | n/a |" in md
    assert "| team-a | 2.0 (2) | 0 (0) |" in md
    assert "| team-b | 1 / 2 / 0 / 0 | n/a |" in md


def test_report_fragmentation_section(small: tuple[Path, Path]) -> None:
    trace, cluster = small
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    rep = report.build(world, ["corral", "fifo"])
    assert [r.fragmentation for r in rep.runs] == [
        fragmentation.compute(Simulation(world, p, log_fair_share=False).run(), world.nodes, world.jobs)
        for p in ("corral", "fifo")
    ]
    # Made-up numbers, so that the test reads the rendering only: 2 h with a job waiting, 3 GPUs unallocated on
    # average (6 GPU-h), of 16 GPUs, a third of it on shared GPUs, a quarter stranded.
    rep.runs[0].fragmentation = fragmentation.Fragmentation(7200.0, 21600.0, 7200.0, 115200.0, 5400.0)
    md = report.markdown(rep, "t")
    assert "## Unallocated GPUs while jobs wait (fragmentation)" in md
    mean_wait = report._s(rep.runs[0].metrics.overall.mean_wait)
    assert f"| corral | {mean_wait} | 2.0 | 3.00 | 18.8% | 33.3% | 25.0% | 6.0 |" in md
    assert "3.00 GPUs unallocated while jobs wait (33% partial)" in report.summary_lines(rep)[0]


def test_report_limit_and_bad_input(small: tuple[Path, Path], tmp_path: Path) -> None:
    trace, cluster = small
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        ["sim", "report", str(trace), "--cluster", str(cluster), "-o", str(out), "--policy", "corral", "--limit", "5"],
    )
    assert res.exit_code == 0, res.output
    assert "5 jobs on 16 GPUs" in (out / "report.md").read_text()
    res = runner.invoke(
        app, ["sim", "report", str(trace), "--cluster", str(cluster), "-o", str(out), "--policy", "sjf"]
    )
    assert res.exit_code == 2 and "unknown policy 'sjf'" in res.output
    res = runner.invoke(app, ["sim", "report", str(tmp_path / "none.csv"), "--cluster", str(cluster), "-o", str(out)])
    assert res.exit_code == 2 and "none.csv: cannot read the file" in res.output


def test_parallel_build_matches_serial(small: tuple[Path, Path]) -> None:
    trace, cluster = small
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    one = report.build(world, ["corral", "fifo"], workers=1)
    two = report.build(world, ["corral", "fifo"], workers=2)
    assert [r.metrics for r in one.runs] == [r.metrics for r in two.runs]
    assert one.private == two.private
