"""The Ray backend on a real local Ray cluster (`ray start --head`, 4 logical GPUs, token authentication on).

One cluster for the module: it takes 5 to 30 s to start. Skipped when Ray cannot start here, unless
CORRAL_REQUIRE_RAY=1, which makes that a failure. Only one node: a second one on the same small machine costs more
than it proves (the node pinning it would test is the same label selector the single-node tests use).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from ray.job_submission import JobStatus

from scheduler.backends.base import Exit, Handle, Launch, NodeInfo
from scheduler.backends.ray import RayExecutor, auth_headers, discover_ray, submission_id
from scheduler.backends.sharing import overfull, per_gpu
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Role
from scheduler.service.core.assemble import RAY_TRUST, build_core, create_token
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.store.db import connect, jobs, migrate
from tests.restart_kit import Backend, issue_case, scripted_twin
from tests.service_kit import ScriptedExecutor

pytestmark = pytest.mark.integration  # a local Ray cluster

START_TIMEOUT_S = 180.0  # a loaded two-core machine can take half a minute before the dashboard answers
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Cluster:
    url: str
    token: str
    nodes: list[NodeInfo]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _unavailable(why: str) -> None:
    if os.environ.get("CORRAL_REQUIRE_RAY") == "1":
        pytest.fail(f"CORRAL_REQUIRE_RAY=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not Path(RAY).exists():
        _unavailable(f"no ray CLI next to {sys.executable}")
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="crl-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port, dash = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # The gang entrypoint runs `python`: the cluster's python must be this one, with Ray.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 (closed at teardown)
    # --block keeps `ray start` in the foreground as the parent of this cluster's processes: stopping its process
    # group stops exactly this cluster, where `ray stop` would stop every Ray on the machine.
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--num-gpus=4",
            "--num-cpus=4",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline, nodes = time.monotonic() + START_TIMEOUT_S, list[NodeInfo]()
        while not nodes:
            if proc.poll() is not None:
                _unavailable(
                    f"ray start exited with {proc.returncode}: {(Path(temp) / 'ray-start.log').read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                _unavailable(f"Ray's dashboard did not answer within {START_TIMEOUT_S:g} s")
            try:
                nodes = discover_ray(url, token, timeout_s=5)
            except (httpx.HTTPError, KeyError):
                time.sleep(1)
        yield Cluster(url, token, nodes)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.terminate()  # `ray start --block` then stops the processes it started
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    # Stragglers in the group (workers the raylet left, or all of it if Ray was slow): they were ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _executor(c: Cluster, tmp: Path) -> RayExecutor:
    return RayExecutor(c.url, tmp / "ray", c.token, c.nodes, ready_timeout_s=60)


def _wait(ex: RayExecutor, keys: set[tuple[str, int]], timeout: float = 120.0) -> dict[str, Exit]:
    """Poll until every (job, attempt) in `keys` has ended."""
    got: dict[str, Exit] = {}
    deadline = time.monotonic() + timeout
    while {(e.job_id, e.attempt) for e in got.values()} < keys:
        assert time.monotonic() < deadline, f"still running: {keys - {(e.job_id, e.attempt) for e in got.values()}}"
        got.update((e.job_id, e) for e in ex.poll(time.time()))
        time.sleep(0.5)
    return got


def _until(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def _log(ex: RayExecutor, job: str, attempt: int = 1) -> str:
    return Path(ex.logs(job, attempt)[0]).read_text()


def _tag() -> str:
    return secrets.token_hex(3)  # job ids unique per run: Ray keeps every submission id it has seen


def test_discovery_and_token(cluster: Cluster) -> None:
    [node] = cluster.nodes
    assert node.pool == "ray" and len(node.gpus) == 4 and node.cpus == 4
    assert node.address and len(node.name) == 56  # the Ray node id, which the executor pins jobs with
    with pytest.raises(PermissionError):
        discover_ray(cluster.url, "not-the-token")
    assert httpx.get(f"{cluster.url}/api/v0/nodes").status_code == 401  # auth is really on
    assert auth_headers(cluster.token) == {"Authorization": f"Bearer {cluster.token}"}


def test_a_job_sees_its_own_gpus_and_carries_metadata(cluster: Cluster, tmp_path: Path) -> None:
    ex, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    show = "echo gpus=$CUDA_VISIBLE_DEVICES queue=$CORRAL_QUEUE"
    ex.launch(Launch(f"one{t}", 1, show, {node: [3]}, {"CORRAL_QUEUE": "nlp", "CORRAL_OWNER": "ada"}))
    ex.launch(Launch(f"two{t}", 1, show, {node: [0, 1]}, {"CORRAL_QUEUE": "nlp"}))
    ex.launch(Launch(f"bad{t}", 1, ["sh", "-c", "exit 7"], {node: [2]}))
    got = _wait(ex, {(f"one{t}", 1), (f"two{t}", 1), (f"bad{t}", 1)})
    assert got[f"one{t}"].code == got[f"two{t}"].code == 0 and got[f"bad{t}"].code == 7
    one = [ln for ln in _log(ex, f"one{t}").splitlines() if ln.startswith("gpus=")]
    two = [ln for ln in _log(ex, f"two{t}").splitlines() if ln.startswith("gpus=")]
    # Ray picks the devices: one id, then two distinct ids, whichever they are.
    assert len(one) == 1 and len(one[0].split()[0].removeprefix("gpus=").split(",")) == 1, one
    ids = two[0].split()[0].removeprefix("gpus=").split(",")
    assert len(ids) == 2 and len(set(ids)) == 2 and two[0].endswith("queue=nlp"), two
    meta = ex.client.get_job_info(submission_id(f"one{t}", 1)).metadata
    assert meta == {"corral_job": f"one{t}", "corral_attempt": "1", "queue": "nlp", "owner": "ada"}


def test_a_gang_starts_whole_and_fails_whole(cluster: Cluster, tmp_path: Path) -> None:
    ex, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    marks = tmp_path / "marks"
    marks.mkdir()
    # Each worker leaves a mark and waits for the other's: only a gang running whole ends with peers=2.
    cmd = (
        f"touch {marks}/$RANK; for i in $(seq 100); do [ $(ls {marks} | wc -l) = 2 ] && break; sleep 0.2; done; "
        f"echo rank=$RANK of $WORLD_SIZE gpus=$CUDA_VISIBLE_DEVICES peers=$(ls {marks} | wc -l)"
    )
    ex.launch(Launch(f"gang{t}", 1, cmd, {node: [0, 1]}, {"CORRAL_WORKERS": "2"}))
    # Rank 1 fails at once: rank 0's long sleep must not keep the job alive.
    ex.launch(Launch(f"gf{t}", 1, "[ $RANK = 1 ] && exit 4; sleep 300", {node: [2, 3]}, {"CORRAL_WORKERS": "2"}))
    got = _wait(ex, {(f"gang{t}", 1), (f"gf{t}", 1)})
    log = _log(ex, f"gang{t}")
    assert got[f"gang{t}"].code == 0, log
    lines = sorted(ln[ln.index("rank=") :] for ln in log.splitlines() if "rank=" in ln and "peers=" in ln)
    assert [ln.split()[0] for ln in lines] == ["rank=0", "rank=1"], log
    assert all(ln.endswith("peers=2") and "of 2" in ln for ln in lines), log
    gpus = {ln.split("gpus=")[1].split()[0] for ln in lines}
    assert len(gpus) == 2, log  # one GPU each, not the same one
    assert got[f"gf{t}"].code == 4, _log(ex, f"gf{t}")  # the failed worker's code is the gang's


def test_shares_of_gpus_run_together_and_fit_each_gpu(cluster: Cluster, tmp_path: Path) -> None:
    """Fractional jobs at once (each waits for all the others before it reports): Ray's actual assignment, the
    CUDA_VISIBLE_DEVICES each job got, puts at most 1 GPU's worth of shares on each device."""
    ex, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    marks = tmp_path / "share-marks"
    marks.mkdir()
    shares = {f"s{t}{i}": f for i, f in enumerate([0.5, 0.5, 0.75, 0.25, 0.5])}
    cmd = (
        f"touch {marks}/$CORRAL_JOB_ID; for i in $(seq 300); do [ $(ls {marks} | wc -l) = {len(shares)} ] && break; "
        f"sleep 0.2; done; echo gpus=$CUDA_VISIBLE_DEVICES peers=$(ls {marks} | wc -l)"
    )
    for job, f in shares.items():
        ex.launch(Launch(job, 1, cmd, {node: [0]}, gpu_fraction=f))
    got = _wait(ex, {(job, 1) for job in shares})
    held: list[tuple[str, float]] = []
    for job, f in shares.items():
        [line] = [ln for ln in _log(ex, job).splitlines() if ln.startswith("gpus=")]
        assert got[job].code == 0 and line.endswith(f"peers={len(shares)}"), line  # all ran at the same time
        [device] = line.split()[0].removeprefix("gpus=").split(",")  # one device, shared
        held.append((device, f))
    assert overfull(held) == {} and len(per_gpu(held)) >= 3, held  # 2.5 GPUs of shares over at least 3 devices


def _running(marker: str) -> bool:
    """Some process on this machine has `marker` in its command line."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue  # gone meanwhile
    return False


def test_terminate_stops_a_ray_job_and_a_gang(cluster: Cluster, tmp_path: Path) -> None:
    ex, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    # A unique sleep length marks each job's command, to see that none is left holding GPUs.
    solo, gang = f"300.{int(t, 16)}1", f"300.{int(t, 16)}2"
    ex.launch(Launch(f"sleep{t}", 1, f"echo up; sleep {solo}", {node: [0]}))
    ex.launch(Launch(f"gsleep{t}", 1, f"echo rank$RANK; sleep {gang}", {node: [1, 2]}, {"CORRAL_WORKERS": "2"}))
    _until(lambda: "up" in _log(ex, f"sleep{t}") and {"rank0", "rank1"} <= set(_log(ex, f"gsleep{t}").split()))
    assert ex.alive(f"sleep{t}", 1) and ex.alive(f"gsleep{t}", 1)
    ex.terminate(f"sleep{t}", 1, 30.0, time.time())
    ex.terminate(f"gsleep{t}", 1, 30.0, time.time())
    got = _wait(ex, {(f"sleep{t}", 1), (f"gsleep{t}", 1)}, timeout=60)
    assert got[f"sleep{t}"].code == got[f"gsleep{t}"].code == -15
    assert not ex.alive(f"sleep{t}", 1)
    _until(lambda: not _running(solo) and not _running(gang), timeout=30)


def test_a_new_executor_adopts_running_and_finished_jobs(cluster: Cluster, tmp_path: Path) -> None:
    first, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    first.launch(Launch(f"long{t}", 1, "echo up; sleep 300", {node: [1]}))
    first.launch(Launch(f"short{t}", 1, "exit 0", {node: [2]}))
    _until(lambda: "up" in _log(first, f"long{t}"))
    _wait(first, {(f"short{t}", 1)})
    again = _executor(cluster, tmp_path)  # Corral restarted: nothing in memory, only what Ray knows
    assert again.adopt(Handle(f"long{t}", 1, None, 0.0)) is None
    assert again.adopt(Handle(f"short{t}", 1, None, 0.0)) == Exit(f"short{t}", 1, 0, "ended while Corral was down")
    gone = again.adopt(Handle(f"never{t}", 1, None, 0.0))
    assert gone is not None and gone.code is None
    assert again.alive(f"long{t}", 1)
    again.terminate(f"long{t}", 1, 30.0, time.time())
    assert _wait(again, {(f"long{t}", 1)}, timeout=60)[f"long{t}"].code == -15


def _service(cluster: Cluster, tmp: Path) -> tuple[Core, TestClient]:
    settings = ServiceSettings(
        data_dir=tmp / "data", backend="ray", ray_address=cluster.url, ray_token=cluster.token, grace_s=30
    )
    core = build_core(settings)  # discovers the cluster's nodes and makes the RayExecutor itself
    admin = TestClient(create_app(core, run_loop=False))
    admin.headers["Authorization"] = f"Bearer {create_token(core, 'root', Role.PLATFORM_ADMIN)}"
    return core, admin


def test_the_service_runs_jobs_on_ray_and_finds_them_after_a_restart(cluster: Cluster, tmp_path: Path) -> None:
    core, admin = _service(cluster, tmp_path)
    assert isinstance(core.executor, RayExecutor) and core.capacity == {"ray": 4}

    def state(c: TestClient, jid: int) -> str:
        s: str = c.get(f"/v1/jobs/{jid}").json()["state"]
        return s

    def submit(command: str, gpus: int) -> int:
        r = admin.post("/v1/jobs", json={"queue": "default", "gpus": gpus, "command": command})
        assert r.status_code == 201, r.text
        jid: int = r.json()["id"]
        return jid

    def tick_until(c: Core, cond: Callable[[], bool]) -> None:
        _until(lambda: bool(c.tick() or True) and cond())

    done = submit("echo gpus=$CUDA_VISIBLE_DEVICES queue=$CORRAL_QUEUE", 2)
    long = submit("echo training; sleep 300", 1)
    tick_until(core, lambda: state(admin, done) == "completed" and state(admin, long) == "running")
    assert "queue=default" in admin.get(f"/v1/jobs/{done}/logs").text

    # Restart: a new core on the same database finds the running Ray job and takes it back.
    core2, admin2 = _service(cluster, tmp_path)
    ray2 = core2.executor
    assert isinstance(ray2, RayExecutor)
    kinds = [e["kind"] for e in admin2.get(f"/v1/jobs/{long}/events").json()["events"]]
    assert "adopted" in kinds and state(admin2, long) == "running", kinds
    tick_until(core2, lambda: "training" in admin2.get(f"/v1/jobs/{long}/logs").text)
    # Cancelling (as preemption does) stops the Ray job; the next cycles see it end.
    assert admin2.post(f"/v1/jobs/{long}/cancel").status_code == 200
    sid = submission_id(str(long), 1)
    _until(lambda: ray2.client.get_job_status(sid) == JobStatus.STOPPED, timeout=60)
    tick_until(core2, lambda: not ray2.alive(str(long), 1))
    assert state(admin2, long) == "cancelled"
    assert (ray2.client.get_job_info(sid).metadata or {}).get("queue") == "default"


def test_a_restart_over_running_ray_jobs_decides_as_without_one(cluster: Cluster, tmp_path: Path) -> None:
    """Issue 20 on Ray: the service is dropped without a stop while its Ray jobs run and started again (a new
    RayExecutor adopts them); demand and fair shares are those an engine built from scratch finds, and the team's
    job takes back the borrower's GPU as a service never restarted decides (a scripted twin fed the same events)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url)
    # Ray keeps every submission id it has seen (corral-<job>-<attempt>): ids of this database start past the
    # other tests' on this cluster.
    db = connect(url)
    with db.begin() as conn:
        conn.execute(
            jobs.insert().values(
                id=100_000 + secrets.randbelow(800_000),
                name="placeholder",
                owner="test",
                queue="none",
                pool="ray",
                state="completed",
                spec={},
                gpus=0,
                priority=0,
                submitted_at=0.0,
                attempt=0,
            )
        )
    db.dispose()
    settings = ServiceSettings(
        data_dir=tmp_path / "data",
        database_url=url,
        backend="ray",
        ray_address=cluster.url,
        ray_token=cluster.token,
        grace_s=5,
    )
    real = Backend(
        lambda: build_core(settings),
        "ray",
        1,
        command=lambda name: f"while [ ! -e {marks / name} ]; do sleep 0.1; done",
        finish=lambda core, name: (marks / name).touch(),
        timeout_s=120,
    )
    restarted = issue_case(real, restart_it=True)
    assert restarted == issue_case(scripted_twin(tmp_path, cluster.nodes, "ray", 1), restart_it=False)
    assert ("Preempted", "b2") in restarted["decided"], restarted


def test_serve_on_ray_warns_that_jobs_share_the_clusters_user(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No cluster needed: the warning comes before anything is asked of Ray (docs/ray.md, Trust model)."""
    settings = ServiceSettings(data_dir=tmp_path / "data", backend="ray", ray_address="http://127.0.0.1:9", grace_s=30)
    with caplog.at_level("WARNING", logger="corral.service"):
        core = build_core(settings, executor=ScriptedExecutor(), nodes=[NodeInfo("n1", "gpu", [])])
    core.db.dispose()
    assert RAY_TRUST in caplog.messages
    assert "one Ray cluster per trust domain" in RAY_TRUST


def test_a_gangs_log_keeps_every_line(cluster: Cluster, tmp_path: Path) -> None:
    """Issue 22, item 6: Ray's log de-duplication folded the ranks' identical lines into "[repeated Nx across
    cluster]", so a job's log lost them. Every line of every rank stays."""
    ex, node, t = _executor(cluster, tmp_path), cluster.nodes[0].name, _tag()
    ex.launch(
        Launch(
            f"dup{t}",
            1,
            "for i in 1 2 3 4 5; do echo same-line-every-rank; sleep 0.1; done",
            {node: [0, 1]},
            {"CORRAL_WORKERS": "2"},
        )
    )
    got = _wait(ex, {(f"dup{t}", 1)})
    log = _log(ex, f"dup{t}")
    assert got[f"dup{t}"].code == 0, log
    assert log.count("same-line-every-rank") == 10 and "repeated" not in log, log


def test_every_rank_of_a_stopped_gang_gets_sigterm_and_its_grace(cluster: Cluster, tmp_path: Path) -> None:
    """Issue 22, item 6: stopping a gang, rank 0 never got SIGTERM and rank 1 got it late; neither saved its
    checkpoint. Each rank traps SIGTERM and takes 4 s to save (longer than Ray's default 3 s before SIGKILL)."""
    ex = RayExecutor(cluster.url, tmp_path / "ray", cluster.token, cluster.nodes, ready_timeout_s=60, grace_s=20)
    node, t = cluster.nodes[0].name, _tag()
    saved = tmp_path / "saved"
    saved.mkdir()
    cmd = f"trap 'sleep 4; touch {saved}/rank$RANK; exit 0' TERM; echo up$RANK; while true; do sleep 0.1; done"
    ex.launch(Launch(f"ckpt{t}", 1, cmd, {node: [0, 1]}, {"CORRAL_WORKERS": "2"}))
    ex.launch(Launch(f"one{t}", 1, cmd.replace("$RANK", "-solo"), {node: [2]}))
    _until(lambda: {"up0", "up1"} <= set(_log(ex, f"ckpt{t}").split()) and "up-solo" in _log(ex, f"one{t}"))
    ex.terminate(f"ckpt{t}", 1, 20.0, time.time())
    ex.terminate(f"one{t}", 1, 20.0, time.time())
    got = _wait(ex, {(f"ckpt{t}", 1), (f"one{t}", 1)}, timeout=60)
    assert got[f"ckpt{t}"].code == -15, _log(ex, f"ckpt{t}")
    assert sorted(p.name for p in saved.iterdir()) == ["rank-solo", "rank0", "rank1"], _log(ex, f"ckpt{t}")
