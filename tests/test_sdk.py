"""The notebook SDK (notebooks/) against a live `corral serve` on 2 virtual GPUs: submit, follow, wait, explain,
cancel, idempotency, display, Ctrl+C, and use from inside a running event loop."""

from __future__ import annotations

import asyncio
import html
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.lib.pretty import pretty

from notebooks import config
from notebooks.client import Client, Job
from notebooks.errors import CorralError, JobFailed
from notebooks.magic import parse, run_cell
from tests.marks import starts_processes

QUICK = 0.2  # poll interval for waits in tests: jobs here last well under a second


@dataclass(frozen=True)
class LiveCorral:
    url: str
    token: str
    env: dict[str, str]  # the environment that finds it (CORRAL_URL, CORRAL_TOKEN) and runs this Python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_corral(tmp: Path) -> Iterator[LiveCorral]:
    """`corral serve --gpus 2` in a subprocess until the generator is closed. Jobs run `python`: this
    interpreter's directory goes first on PATH, so function jobs find cloudpickle."""
    port, data = free_port(), tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "JUPYTERHUB_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        XDG_DATA_HOME=str(tmp / "xdg"),
        # Jobs run this checkout's interpreter, which other accounts may not reach (under /root): one user.
        CORRAL_RUN_AS="service",
    )
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.cli.main",
            "serve",
            "--gpus",
            "2",
            "--gpu-model",
            "virtual",
            "--port",
            str(port),
            "--data-dir",
            str(data),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"corral serve did not come up: {(tmp / 'serve.log').read_text()}")
            time.sleep(0.1)
        token = (data / "admin-token").read_text().strip()
        yield LiveCorral(url, token, {**env, "CORRAL_URL": url, "CORRAL_TOKEN": token})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
@starts_processes
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCorral]:
    yield from start_corral(tmp_path_factory.mktemp("corral"))


@pytest.fixture(scope="module")
def corral(live: LiveCorral) -> Iterator[Client]:
    with Client(live.url, live.token) as c:
        yield c


@pytest.fixture
def gpus_held(corral: Client) -> Iterator[Job]:
    """Both GPUs taken by a sleeping job, cancelled afterwards."""
    hog = corral.submit("sleep 60", queue="default", gpus=2, name="hog")
    deadline = time.monotonic() + 10
    while hog.status() != "running":
        assert time.monotonic() < deadline, hog.state
        time.sleep(0.05)
    yield hog
    hog.cancel()


def test_the_queue_defaults_to_corral_queue_else_the_one_queue_seen(
    corral: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORRAL_QUEUE", raising=False)
    assert corral.default_queue() == "default"  # a fresh `corral serve` has one queue
    assert corral.submit("true", gpus=0).queue == "default"
    monkeypatch.setenv("CORRAL_QUEUE", "elsewhere")
    assert corral.default_queue() == "elsewhere"
    with pytest.raises(CorralError):  # the service names the unknown queue
        corral.submit("true", gpus=0)


def test_command_job_runs_and_its_logs_read_back(corral: Client) -> None:
    job = corral.submit("echo one; echo two >&2", queue="default", name="cmd")
    assert isinstance(job.id, int) and job.state == "pending"  # submit returns at once, before the job runs
    assert job.wait(poll=QUICK) == "completed"
    assert job.logs() == "one\n"
    assert job.logs(stream="stderr") == "two\n"
    assert corral.job(job.id).state == "completed"
    assert job.id in [j.id for j in corral.jobs(queue="default", state="completed")]


def test_follow_prints_lines_as_they_come(corral: Client, capsys: pytest.CaptureFixture[str]) -> None:
    job = corral.submit(
        ["python", "-u", "-c", "import time\nfor i in range(3):\n print('step', i)\n time.sleep(0.2)"], queue="default"
    )
    text = job.logs(follow=True)  # from pending: waits for the start, then streams until the job ends
    assert text == "step 0\nstep 1\nstep 2\n"
    assert capsys.readouterr().out == text
    assert job.status() == "completed"
    assert pretty(text) == "<3 lines of output, shown above>"  # type: ignore[no-untyped-call]  # not shown a second time as the cell's value
    assert pretty(job.logs()) == text  # type: ignore[no-untyped-call]  # as text, not a quoted repr


def test_script_job_runs_python_in_the_submitting_directory(
    corral: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "train.py").write_text("import sys\nprint('epochs', sys.argv[1])\n")
    monkeypatch.chdir(tmp_path)
    job = corral.submit(script="train.py", args=[3], queue="default")
    assert job.name == "train.py"
    job.wait(poll=QUICK)
    assert job.logs() == "epochs 3\n"


def test_function_job_prints_and_returns_its_value(corral: Client) -> None:
    def scale(x: int, factor: int = 1) -> dict[str, int]:
        print("scaling", x)
        return {"x": x * factor}

    job = corral.submit(function=scale, args=(4,), kwargs={"factor": 3}, queue="default")
    assert job.name == "scale"
    assert job.result() == {"x": 12}
    assert job.logs() == "scaling 4\n{'x': 12}\n"


def test_a_failing_job_raises_jobfailed_with_its_stderr(corral: Client) -> None:
    job = corral.submit("echo 'it broke' >&2; exit 3", queue="default")
    with pytest.raises(JobFailed) as e:
        job.wait(poll=QUICK)
    assert e.value.code == "failed" and e.value.exit_code == 3
    assert "exited with code 3" in str(e.value) and "it broke" in str(e.value)


def test_pending_job_is_explained_shown_and_cancelled(corral: Client, gpus_held: Job) -> None:
    job = corral.submit("echo never", queue="default", name="<script>alert('x')</script>")
    assert job.status() == "pending"
    why = job.explain()
    assert why["state"] == "pending" and why["reason"]["rule"] and "GPUs" in why["reason"]["message"]
    card = job._repr_html_()
    assert "<script>" not in card and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in card
    assert "pending" in card and html.escape(why["reason"]["message"]) in card
    assert "granted localhost: 0, 1" in gpus_held._repr_html_()  # the latest attempt's placement
    assert job.cancel() == "cancelled"
    with pytest.raises(JobFailed) as e:
        job.wait(poll=QUICK)
    assert e.value.code == "cancelled"
    with pytest.raises(TimeoutError):
        gpus_held.wait(timeout=0.3, poll=QUICK)


def test_ctrl_c_detaches_without_cancelling(corral: Client, gpus_held: Job, capsys: pytest.CaptureFixture[str]) -> None:
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    calls: list[Callable[[], object]] = [lambda: gpus_held.wait(poll=QUICK), lambda: gpus_held.logs(follow=True)]
    for call in calls:
        threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()  # a real Ctrl+C
        started = time.monotonic()
        call()  # returns instead of raising KeyboardInterrupt
        assert time.monotonic() - started < 5
        assert f"job {gpus_held.id}; it keeps running" in capsys.readouterr().err
        assert gpus_held.status() == "running"  # detached, not cancelled


def test_idempotency_key_returns_the_same_job(corral: Client, capsys: pytest.CaptureFixture[str]) -> None:
    first = corral.submit("echo once", queue="default", idempotency_key="cell-7")
    again = corral.submit("echo once", queue="default", idempotency_key="cell-7")
    assert again.id == first.id and again == first and again.reused and not first.reused
    assert capsys.readouterr().err == ""
    with pytest.raises(CorralError) as e:  # an edited cell is told why it cannot reuse the key
        corral.submit("echo twice", queue="default", idempotency_key="cell-7")
    assert (e.value.code, e.value.where) == ("conflict", "idempotency_key")
    assert "other values of: command" in e.value.message


def test_client_works_inside_a_running_event_loop(corral: Client) -> None:
    async def notebook_cell() -> str:
        asyncio.get_running_loop()  # as in Jupyter: a loop runs in this thread
        job = corral.submit("echo from-async", queue="default")
        job.wait(poll=QUICK)
        return str(job.logs())

    assert asyncio.run(notebook_cell()) == "from-async\n"


def test_errors_carry_code_message_and_where(corral: Client, live: LiveCorral) -> None:
    with pytest.raises(CorralError) as e:
        corral.submit("true", queue="no-such-queue")
    assert e.value.code == "invalid" and e.value.where == "queue" and "no-such-queue" in str(e.value)
    with pytest.raises(CorralError) as e:
        corral.job(999_999)
    assert e.value.code == "not_found" and e.value.status == 404
    with Client(live.url, "corral_wrong") as bad, pytest.raises(CorralError) as e:
        bad.jobs()
    assert e.value.code == "unauthorized" and "Client(token=...)" in str(e.value)
    with Client(f"http://127.0.0.1:{free_port()}", "x") as nowhere, pytest.raises(CorralError) as e:
        nowhere.jobs()
    assert e.value.code == "unreachable" and "corral serve" in str(e.value)
    with pytest.raises(TypeError):
        corral.submit("true", script="x.py", queue="default")


def test_cell_magic_runs_the_cell_and_streams_it(corral: Client, capsys: pytest.CaptureFixture[str]) -> None:
    job = run_cell("--queue default --gpus 1 --name 'my cell'", "x = 6 * 7\nprint('answer', x)\n", corral)
    assert job.name == "my cell" and job.state == "completed"
    assert capsys.readouterr().out == "answer 42\n"
    with pytest.raises(JobFailed, match="ZeroDivisionError"):
        run_cell("--idempotency-key div", "1 / 0", corral)
    assert parse("--no-follow").no_follow
    with pytest.raises(UsageError, match="unknown option"):
        parse("--gpu 2")


# ----- finding the API: no server needed -----


def test_url_and_token_precedence(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("corral_admin\n")
    local = config.resolve(environ={"CORRAL_DATA_DIR": str(tmp_path)})
    assert (local.url, local.token) == (config.DEFAULT_URL, "corral_admin")
    env = {"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_URL": "http://c:1/", "CORRAL_TOKEN": "corral_env"}
    assert config.resolve(environ=env) == config.Connection("http://c:1", "corral_env", "CORRAL_TOKEN")
    given = config.resolve("http://given", "corral_given", environ=env)
    assert (given.url, given.token) == ("http://given", "corral_given")
    assert config.resolve(environ={"CORRAL_DATA_DIR": str(tmp_path / "none")}).token is None


def test_inside_jupyterhub_the_hub_token_and_corral_service_are_used() -> None:
    hub = {
        "JUPYTERHUB_API_TOKEN": "hubtok",
        "JUPYTERHUB_SERVICE_PREFIX": "/jhub/user/alice/gpu/",
        "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/jhub/user/alice/gpu/",
    }
    conn = config.resolve(environ=hub)
    assert conn == config.Connection("https://hub.example.org/jhub/services/corral", "hubtok", "JUPYTERHUB_API_TOKEN")
    assert config.resolve(environ={**hub, "CORRAL_URL": "http://corral:8265"}).url == "http://corral:8265"
    assert config.resolve(environ={**hub, "CORRAL_TOKEN": "mine"}).token == "mine"
    with pytest.raises(CorralError, match="set CORRAL_URL"):
        config.resolve(environ={"JUPYTERHUB_API_TOKEN": "hubtok", "JUPYTERHUB_SERVICE_PREFIX": "/user/bob/"})
