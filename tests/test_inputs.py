"""Bad scenario, cluster and trace files: one clear error naming file, line or field; exit status 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

GOOD_CLUSTER = """\
cluster:
  pools:
    - {name: a100, nodes: 2, gpus_per_node: 8}
queues:
  - {name: team-a, quota: {a100: 8}}
  - {name: team-b, quota: {a100: 8}}
"""
GOOD_JOBS = """\
jobs:
  - {id: j1, queue: team-a, pool: a100, gpus: 8, submit: 0, duration: 10}
"""

BAD_SCENARIOS = {
    "not-yaml": ("cluster: [unclosed\n", "not valid YAML"),
    "not-mapping": ("- just\n- a list\n", "expected a mapping"),
    "missing-cluster": (GOOD_JOBS, "cluster"),
    "bad-gpus": (GOOD_CLUSTER + GOOD_JOBS.replace("gpus: 8", "gpus: many"), "line 8, jobs[0].gpus"),
    "negative-duration": (GOOD_CLUSTER + GOOD_JOBS.replace("duration: 10", "duration: -1"), "jobs[0].duration"),
    "zero-workers": (GOOD_CLUSTER + GOOD_JOBS.replace("gpus: 8", "gpus: 8, workers: 0"), "jobs[0].workers"),
    "duplicate-id": (GOOD_CLUSTER + GOOD_JOBS + GOOD_JOBS.replace("jobs:\n", ""), "job id 'j1' is used twice"),
    "quota-over-capacity": (
        GOOD_CLUSTER.replace("quota: {a100: 8}}\n  - {name: team-b", "quota: {a100: 12}}\n  - {name: team-b")
        + GOOD_JOBS,
        "top-level quotas add up to 20 GPUs",
    ),
    "children-over-parent": (
        GOOD_CLUSTER + "  - {name: sub, parent: team-a, quota: {a100: 9}}\n" + GOOD_JOBS,
        "children's quotas add up to 9 GPUs",
    ),
    "unknown-parent": (
        GOOD_CLUSTER + "  - {name: sub, parent: nobody}\n" + GOOD_JOBS,
        "parent queue 'nobody' does not exist",
    ),
    "queue-unknown-pool": (
        GOOD_CLUSTER.replace("{a100: 8}}\n  - {name: team-b", "{h100: 8}}\n  - {name: team-b") + GOOD_JOBS,
        "pool 'h100' does not exist",
    ),
    "limit-below-quota": (
        GOOD_CLUSTER.replace(
            "quota: {a100: 8}}\n  - {name: team-b", "quota: {a100: 8}, limit: {a100: 4}}\n  - {name: team-b"
        )
        + GOOD_JOBS,
        "limit 4 is below the queue's quota 8",
    ),
    "cycle": (
        GOOD_CLUSTER.replace("{name: team-a,", "{name: team-a, parent: team-b,").replace(
            "{name: team-b,", "{name: team-b, parent: team-a,"
        )
        + GOOD_JOBS,
        "cycle",
    ),
    "event-unknown-job": (
        GOOD_CLUSTER + GOOD_JOBS + "events:\n  - {at: 5, cancel: j9}\n",
        "events[0].cancel: job 'j9' is not in jobs",
    ),
    "event-unknown-node": (
        GOOD_CLUSTER + GOOD_JOBS + "events:\n  - {at: 5, node_down: a100-7}\n",
        "node 'a100-7' does not exist",
    ),
    "event-two-actions": (
        GOOD_CLUSTER + GOOD_JOBS + "events:\n  - {at: 5, node_down: a100-1, cancel: j1}\n",
        "exactly one of cancel, node_down, node_up",
    ),
    "domain-unknown-node": (
        GOOD_CLUSTER.replace("gpus_per_node: 8}", "gpus_per_node: 8, domains: {d0: [x-1]}}") + GOOD_JOBS,
        "cluster.pools[0].domains.d0: node 'x-1' is not a node of pool a100",
    ),
    "expect-without-time": (GOOD_CLUSTER + GOOD_JOBS + "expect:\n  - {running: [j1]}\n", "expect[0]"),
}


@pytest.mark.parametrize("name", sorted(BAD_SCENARIOS))
def test_bad_scenario_exits_2_with_where_and_what(name: str, tmp_path: Path, corral_cmd: list[str]) -> None:
    text, needle = BAD_SCENARIOS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = subprocess.run([*corral_cmd, "sim", "scenario", str(path), "--json"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert str(path) in proc.stderr
    assert needle in proc.stderr


def test_missing_file(tmp_path: Path, corral_cmd: list[str]) -> None:
    proc = subprocess.run([*corral_cmd, "sim", "scenario", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope.yaml: cannot read the file" in proc.stderr


def test_unknown_field_is_reported_but_runs(tmp_path: Path, corral_cmd: list[str]) -> None:
    path = tmp_path / "extra.yaml"
    path.write_text(GOOD_CLUSTER + GOOD_JOBS.replace("gpus: 8", "gpus: 8, gpu: 4"))
    proc = subprocess.run([*corral_cmd, "sim", "scenario", str(path), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "jobs[0].gpu: unknown field, ignored" in proc.stderr


TRACE_HEADER = "id,submit,duration,queue,pool,workers,gpus,priority,preemptible\n"
BAD_TRACES = {
    "no-header-column": ("id,submit,queue,pool\nj1,0,team-a,a100\n", "line 1", "lacks column(s) duration"),
    "bad-number": (
        TRACE_HEADER + "j1,0,10,team-a,a100,1,8,0,true\nj2,zero,10,team-a,a100,1,8,0,true\n",
        "line 3, column submit",
        "'zero' is not a number",
    ),
    "bad-bool": (TRACE_HEADER + "j1,0,10,team-a,a100,1,8,0,maybe\n", "line 2, column preemptible", "not true or false"),
    "negative-gpus": (TRACE_HEADER + "j1,0,10,team-a,a100,1,-2,0,\n", "line 2, column gpus", "at least 0"),
    "empty-queue": (TRACE_HEADER + "j1,0,10,,a100,1,1,0,\n", "line 2, column queue", "is empty"),
    "duplicate": (
        TRACE_HEADER + "j1,0,10,team-a,a100,,,,\nj1,0,10,team-a,a100,,,,\n",
        "line 3, column id",
        "used twice",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TRACES))
def test_bad_trace_exits_2(name: str, tmp_path: Path, corral_cmd: list[str]) -> None:
    text, where, what = BAD_TRACES[name]
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    trace.write_text(text)
    cluster.write_text(GOOD_CLUSTER)
    proc = subprocess.run(
        [*corral_cmd, "sim", "trace", str(trace), "--cluster", str(cluster), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{trace}: {where}: " in proc.stderr and what in proc.stderr


def test_bad_cluster_file_for_trace(tmp_path: Path, corral_cmd: list[str]) -> None:
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    trace.write_text(TRACE_HEADER + "j1,0,10,team-a,a100,,,,\n")
    cluster.write_text(GOOD_CLUSTER.replace("nodes: 2", "nodes: two"))
    proc = subprocess.run(
        [*corral_cmd, "sim", "trace", str(trace), "--cluster", str(cluster)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{cluster}: line 3, cluster.pools[0].nodes" in proc.stderr


def test_trace_defaults_and_replay(tmp_path: Path, corral_cmd: list[str]) -> None:
    trace, cluster = tmp_path / "t.csv", tmp_path / "c.yaml"
    trace.write_text(TRACE_HEADER + "j1,0,10,team-a,a100,,,,\nj2,5,10,team-b,a100,2,8,,false\n")
    cluster.write_text(GOOD_CLUSTER)
    proc = subprocess.run(
        [*corral_cmd, "sim", "trace", str(trace), "--cluster", str(cluster), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"job":"j2","queue":"team-b","reason":"the job asks 16 GPUs' not in proc.stdout
    assert '"event":"completed","job":"j1"' in proc.stdout
