"""`corral sim import philly`: rows to trace CSV, gangs cut to 8-GPU nodes, bad input names file/line/column."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app
from scheduler.sim.importers import FORMATS, ImportOptions, RowError, gang, philly
from scheduler.sim.inputs import load_trace

PHILLY = """\
timestamp,duration,num_gpus,gpu_time,cluster
2017-10-09 07:01:55,66.0,1,66.0,11cb48
2017-10-09 06:13:03,2951.0,16,47216.0,6214e9
2017-10-09 06:13:03,10.5,12,126.0,6214e9
2017-10-09 08:00:00,100,8,800,ee9e8c
"""

runner = CliRunner()


def _write(tmp_path: Path, text: str, name: str = "philly.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("n", "shape"),
    [(1, (1, 1)), (8, (1, 8)), (16, (2, 8)), (12, (2, 6)), (24, (3, 8)), (128, (16, 8)), (11, (11, 1)), (18, (3, 6))],
)
def test_gang_keeps_the_gpu_count_and_fits_a_node(n: int, shape: tuple[int, int]) -> None:
    assert gang(n) == shape
    workers, gpus = gang(n)
    assert workers * gpus == n and gpus <= 8


def test_import_writes_sorted_trace(tmp_path: Path) -> None:
    src, dest = _write(tmp_path, PHILLY), tmp_path / "trace.csv"
    res = runner.invoke(app, ["sim", "import", "philly", str(src), "-o", str(dest)])
    assert res.exit_code == 0, res.output
    assert "wrote 4 jobs" in res.output
    rows = list(csv.DictReader(dest.open()))
    assert [r["id"] for r in rows] == ["p000001", "p000002", "p000003", "p000004"]
    # Two jobs at 06:13:03 keep their file order; submit counts from the earliest timestamp.
    assert [(r["submit"], r["queue"], r["workers"], r["gpus"], r["duration"]) for r in rows] == [
        ("0", "vc-6214e9", "2", "8", "2951"),
        ("0", "vc-6214e9", "2", "6", "10.5"),
        ("2932", "vc-11cb48", "1", "1", "66"),
        ("6417", "vc-ee9e8c", "1", "8", "100"),
    ]
    assert {r["pool"] for r in rows} == {"philly"} and {r["preemptible"] for r in rows} == {"true"}
    jobs = load_trace(dest)  # the simulator reads what the importer writes
    assert [j.spec.request for j in jobs] == [16, 12, 1, 8]


def test_pool_option(tmp_path: Path) -> None:
    src, dest = _write(tmp_path, PHILLY), tmp_path / "trace.csv"
    res = runner.invoke(app, ["sim", "import", "philly", str(src), "-o", str(dest), "--pool", "p100"])
    assert res.exit_code == 0, res.output
    assert {r["pool"] for r in csv.DictReader(dest.open())} == {"p100"}


def test_pure_function_over_rows() -> None:
    rows = [
        (2, {"timestamp": "100", "duration": "5", "num_gpus": "4.0", "cluster": "a"}),
        (3, {"timestamp": "40", "duration": "1", "num_gpus": "32", "cluster": "b"}),
    ]
    out = philly(rows, ImportOptions(pool="x", gpus_per_node=4))
    assert [(j.id, j.submit, j.queue, j.workers, j.gpus) for j in out] == [
        ("p000001", 0.0, "vc-b", 8, 4),
        ("p000002", 60.0, "vc-a", 1, 4),
    ]
    with pytest.raises(RowError) as e:
        philly([(7, {"timestamp": "1", "duration": "1", "num_gpus": "1.5", "cluster": "a"})], ImportOptions())
    assert (e.value.line, e.value.column) == (7, "num_gpus")
    assert "philly" in FORMATS


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (PHILLY.replace("2951.0,16", "long,16"), "line 3, column duration: 'long' is not a number"),
        (PHILLY.replace("10.5,12", "-3,12"), "line 4, column duration"),
        (PHILLY.replace("100,8,800", "100,0,800"), "line 5, column num_gpus"),
        (PHILLY.replace("66.0,1,66.0", "66.0,two,66.0"), "line 2, column num_gpus"),
        (PHILLY.replace("2017-10-09 08:00:00", "yesterday"), "line 5, column timestamp"),
        (PHILLY.replace(",ee9e8c", ","), "line 5, column cluster"),
        (PHILLY.replace("num_gpus", "gpus"), "line 1: the header lacks column(s) num_gpus"),
    ],
)
def test_bad_rows_exit_2_naming_file_line_column(tmp_path: Path, text: str, where: str) -> None:
    src = _write(tmp_path, text)
    res = runner.invoke(app, ["sim", "import", "philly", str(src), "-o", str(tmp_path / "out.csv")])
    assert res.exit_code == 2
    assert f"{src}: {where}" in res.output


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    res = runner.invoke(app, ["sim", "import", "philly", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nope.csv: cannot read the file" in res.output
    res = runner.invoke(app, ["sim", "import", "helios", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown format 'helios'" in res.output


def test_unwritable_output_exits_2(tmp_path: Path) -> None:
    src = _write(tmp_path, PHILLY)
    res = runner.invoke(app, ["sim", "import", "philly", str(src), "-o", str(tmp_path / "no" / "dir.csv")])
    assert res.exit_code == 2 and "cannot write the file" in res.output


# Rows in the columns of Alibaba's cluster-trace-gpu-v2023 (made up for the test, not the trace's).
ALIBABA = """\
name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
t-0,8000,16384,1,1000,,LS,Running,100,700,100
t-1,4000,8192,1,250,,BE,Running,50,400,60
t-2,32000,65536,0,0,,BE,Running,10,20,10
t-3,88000,327680,8,1000,,Burstable,Succeeded,200,1200,300
t-4,4000,8192,1,500,,BE,Pending,210,260,
t-5,88000,327680,16,1000,,LS,Running,220,320,220
"""


def test_alibaba_gpu_sharing_trace(tmp_path: Path) -> None:
    src, dest = _write(tmp_path, ALIBABA, "pods.csv"), tmp_path / "trace.csv"
    res = runner.invoke(app, ["sim", "import", "alibaba-gpu", str(src), "-o", str(dest), "--pool", "v100"])
    assert res.exit_code == 0, res.output
    assert "wrote 4 jobs" in res.output  # no CPU-only task (t-2), no task never scheduled (t-4)
    rows = list(csv.DictReader(dest.open()))
    # By creation time; submit from the first; duration from scheduled to deleted; 16 GPUs a gang of 2 x 8.
    assert [(r["id"], r["submit"], r["duration"], r["queue"], r["workers"], r["gpus"]) for r in rows] == [
        ("a000001", "0", "340", "qos-be", "1", "0.25"),
        ("a000002", "50", "600", "qos-ls", "1", "1"),
        ("a000003", "150", "900", "qos-burstable", "1", "8"),
        ("a000004", "170", "100", "qos-ls", "2", "8"),
    ]
    assert {r["pool"] for r in rows} == {"v100"}
    assert [j.spec.gpus for j in load_trace(dest)] == [0.25, 1, 8, 8]


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ("t-9,1,1,1,0,,LS,Running,5,9,5", "line 8, column gpu_milli"),
        ("t-9,1,1,1,1500,,LS,Running,5,9,5", "line 8, column gpu_milli"),
        ("t-9,1,1,0.5,500,,LS,Running,5,9,5", "line 8, column num_gpu"),
        ("t-9,1,1,1,500,,LS,Running,5,3,5", "line 8, column deletion_time"),
    ],
)
def test_alibaba_bad_rows_name_the_line(tmp_path: Path, bad: str, where: str) -> None:
    src = _write(tmp_path, ALIBABA + bad + "\n", "pods.csv")
    res = runner.invoke(app, ["sim", "import", "alibaba-gpu", str(src), "-o", str(tmp_path / "t.csv")])
    assert res.exit_code == 2 and f"pods.csv: {where}" in res.output, res.output
