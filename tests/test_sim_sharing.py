"""GPU sharing in the simulator's inputs: fractional `gpus` in trace files, and `corral sim generate sharing`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app
from scheduler.sim import fragmentation
from scheduler.sim.importers import TraceJob, write_trace
from scheduler.sim.inputs import InputError, load_cluster, load_scenario, load_trace
from scheduler.sim.metrics import RELEASES
from scheduler.sim.runner import Simulation
from scheduler.sim.sharing import FRACTIONS, WHOLE, SharingConfig, sharing

runner = CliRunner()
HEADER = "id,submit,duration,queue,pool,workers,gpus,priority,preemptible\n"


def _trace(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_a_trace_row_may_ask_for_a_fraction_of_one_gpu(tmp_path: Path) -> None:
    jobs = load_trace(
        _trace(tmp_path, "nb,0,60,team-a,a100,1,0.25,,", "half,0,60,team-a,a100,,.5,,", "two,0,60,team-a,a100,2,8,,")
    )
    assert [j.spec.gpus for j in jobs] == [0.25, 0.5, 8]
    assert [j.spec.shared for j in jobs] == [True, True, False]
    assert type(jobs[2].spec.gpus) is int  # a whole request stays an int: the log and reasons read as before


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ("x,0,60,team-a,a100,2,0.5,,", "0.5 with 2 workers"),
        ("x,0,60,team-a,a100,1,1.5,,", "above 1 it must be a whole number"),
        ("x,0,60,team-a,a100,1,-0.5,,", "must be at least 0"),
        ("x,0,60,team-a,a100,1,half,,", "'half' is not"),
    ],
)
def test_a_bad_fraction_names_the_line_and_the_column(tmp_path: Path, row: str, what: str) -> None:
    path = _trace(tmp_path, "ok,0,60,team-a,a100,1,0.25,,", row)
    with pytest.raises(InputError) as err:
        load_trace(path)
    assert err.value.where == "line 3, column gpus" and what in err.value.what, err.value


def test_sim_trace_refuses_a_fraction_for_a_gang_with_exit_2(tmp_path: Path) -> None:
    made = sharing(SharingConfig(jobs=5, nodes=1))
    cluster = tmp_path / "c.yaml"
    made.write(tmp_path / "ignored.csv", cluster)
    trace = _trace(tmp_path, "x,0,60,team-0,h100,2,0.5,,")
    res = runner.invoke(app, ["sim", "trace", str(trace), "--cluster", str(cluster)])
    assert res.exit_code == 2 and "line 2, column gpus" in res.output and "2 workers" in res.output


def test_write_trace_keeps_fractions(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_trace([TraceJob("a", 0, 60, "q", "p", 1, 0.25), TraceJob("b", 1.5, 60, "q", "p", 2, 8)], path)
    assert path.read_text().splitlines()[1:] == ["a,0,60,q,p,1,0.25,0,true", "b,1.5,60,q,p,2,8,0,true"]
    assert [j.spec.gpus for j in load_trace(path)] == [0.25, 8]


def _files(tmp_path: Path, config: SharingConfig, name: str) -> tuple[Path, Path]:
    trace, cluster = tmp_path / f"{name}.csv", tmp_path / f"{name}.yaml"
    sharing(config).write(trace, cluster)
    return trace, cluster


def test_generate_sharing_same_seed_same_files(tmp_path: Path) -> None:
    small = SharingConfig(seed=5, jobs=200, nodes=2)
    a, b = _files(tmp_path, small, "a"), _files(tmp_path, small, "b")
    c = _files(tmp_path, SharingConfig(seed=6, jobs=200, nodes=2), "c")
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_generate_sharing_models_the_mix(tmp_path: Path) -> None:
    trace, cluster = _files(tmp_path, SharingConfig(seed=2), "t")
    world = load_cluster(cluster)
    jobs = load_trace(trace)
    assert len(jobs) == 4000 and [j.submit for j in jobs] == sorted(j.submit for j in jobs)
    assert {n.pool for n in world.nodes} == {"h100"} and sum(n.gpus for n in world.nodes) == 128
    assert {j.spec.queue for j in jobs} == {f"team-{i}" for i in range(4)}
    assert all(world.tree[f"team-{i}"].quota_of("h100") == 32 for i in range(4))
    fractional = [j for j in jobs if j.spec.shared]
    assert 0.55 < len(fractional) / len(jobs) < 0.65  # 60 % asked
    assert {j.spec.gpus for j in fractional} == set(FRACTIONS)
    assert {j.spec.gpus for j in jobs if not j.spec.shared} == set(WHOLE)
    assert all(j.spec.workers == 1 and 60 <= j.duration <= 86400 for j in jobs)
    # Mean demand: the GPU-time of all jobs over the arrival span is about `load` of the pool.
    span = max(j.submit for j in jobs)
    demand = sum(j.spec.request * j.duration for j in jobs) / span
    assert 0.85 < demand / 128 < 0.95


def test_generate_sharing_cli(tmp_path: Path) -> None:
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    args = ["sim", "generate", "sharing", "-o", str(trace), "--cluster", str(cluster), "--jobs", "100"]
    res = runner.invoke(app, [*args, "--nodes", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "wrote 100 jobs" in res.output and "16 GPUs" in res.output
    assert "--seed 3 --jobs 100 --nodes 2" in cluster.read_text()
    assert len(load_trace(trace)) == 100 and load_cluster(cluster).nodes
    res = runner.invoke(app, [*args, "--fraction-share", "1.5"])
    assert res.exit_code == 2


def _check_shares(log: dict[str, Any]) -> None:
    """From the log alone: per physical GPU the fractions held sum to at most 1, and a GPU a whole-GPU job holds
    is held by nobody else."""
    whole: dict[tuple[str, int], str] = {}
    parts: dict[tuple[str, int], dict[str, float]] = {}
    holding: dict[str, list[tuple[str, int]]] = {}
    for e in log["events"]:
        job = e["job"]
        if e["event"] == "started":
            gpus = [(n, g) for n, gs in e["nodes"].items() for g in gs]
            holding[job] = gpus
            for gpu in gpus:
                assert gpu not in whole, (e, whole[gpu])
                if "fraction" in e:
                    parts.setdefault(gpu, {})[job] = e["fraction"]
                    assert sum(parts[gpu].values()) <= 1 + 1e-9, (e, parts[gpu])
                else:
                    assert not parts.get(gpu), (e, parts[gpu])
                    whole[gpu] = job
        elif e["event"] in RELEASES:
            for gpu in holding.pop(job, []):
                whole.pop(gpu, None)
                parts.get(gpu, {}).pop(job, None)


@pytest.mark.parametrize("policy", ["corral", "best-fit-fractions"])
def test_the_sharing_trace_replays_under_both_placements(tmp_path: Path, policy: str) -> None:
    trace, cluster = _files(tmp_path, SharingConfig(seed=4, jobs=400, nodes=2), "t")
    res = runner.invoke(app, ["sim", "trace", str(trace), "--cluster", str(cluster), "--policy", policy, "--json"])
    assert res.exit_code == 0, res.output
    log = json.loads(res.output)
    assert log["policy"] == policy
    done = {e["job"] for e in log["events"] if e["event"] == "completed"}
    assert len(done) == 400
    shared = [e for e in log["events"] if e["event"] == "started" and "fraction" in e]
    assert shared and all(len(e["nodes"]) == 1 and len(next(iter(e["nodes"].values()))) == 1 for e in shared)
    _check_shares(log)
    world = load_cluster(cluster)
    world.jobs = load_trace(trace)
    m = fragmentation.compute(log, world.nodes, world.jobs)
    assert m.wait_seconds > 0 and 0 < m.partial_share < 1


def test_the_measure_tells_the_placements_apart_on_the_fragmentation_scenario() -> None:
    # tests/scenarios/42: best fit puts f (0.25) beside b on a100-0, so p2 (0.5) waits 10-100 with two pieces of
    # 0.25 free, one per GPU: 0.5 x 90 GPU-seconds, all partial, all stranded (0.5 asked, 0.5 free in all).
    # Corral's rule puts f where the 0.25 left is of no use to anyone waiting: nothing waits.
    world = load_scenario(Path(__file__).parent / "scenarios" / "42-fractions-fragmentation.yaml")
    best = fragmentation.compute(Simulation(world, "best-fit-fractions").run(), world.nodes, world.jobs)
    assert (best.wait_seconds, best.unallocated_gpu_seconds, best.capacity_gpu_seconds) == (90, 45, 180)
    assert best.mean_unallocated == 0.5 and best.partial_share == 1 and best.stranded_share == 1
    corral = fragmentation.compute(Simulation(world, "corral").run(), world.nodes, world.jobs)
    assert corral.wait_seconds == 0 and corral.unallocated_gpu_seconds == 0
