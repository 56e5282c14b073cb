"""The service commands of `corral` end to end: CliRunner against an in-process service (SQLite, scripted
executor), and one real `corral serve` in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from scheduler.cli import client as cli_client
from scheduler.cli.main import app
from scheduler.service.core.assemble import ADMIN_TOKEN_FILE
from tests.service_kit import DEMO_TREE, Service, make_service

Corral = Callable[..., Result]


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path}/c.db", tmp_path)


@pytest.fixture
def corral(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Corral:
    """Run `corral ARGS...` against `service` as its platform admin; asserts the exit status (code=)."""
    for var in ("CORRAL_URL", "CORRAL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "cli-data"))  # no admin-token file there

    def client(url: str, token: str | None) -> TestClient:
        # A fresh client per command (the CLI closes it), carrying the admin's header.
        c = TestClient(service.admin.app)
        c.headers.update(service.admin.headers)
        return c

    monkeypatch.setattr(cli_client, "make_http_client", client)
    runner = CliRunner()

    def run(*args: str, code: int = 0, input: str | None = None) -> Result:
        r = runner.invoke(app, list(args), input=input, env={"COLUMNS": "200"})
        assert r.exit_code == code, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{r.exception!r}"
        return r

    return run


def submit(corral: Corral, queue: str = "nlp", gpus: int = 1, *extra: str) -> int:
    return int(
        corral("submit", "--queue", queue, "--gpus", str(gpus), *extra, "--", "python", "train.py").stdout.strip()
    )


def job(service: Service, job_id: int) -> dict[str, Any]:
    got: dict[str, Any] = service.admin.get(f"/v1/jobs/{job_id}").json()
    return got


# ----- submit -----


def test_submit_a_spec_file(corral: Corral, service: Service, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"name": "bert", "queue": "nlp", "gpus": 2, "command": ["python", "t.py"], "labels": {"team": "nlp"}}
        )
    )
    jid = int(corral("submit", str(spec)).stdout.strip())
    got = job(service, jid)
    assert (got["name"], got["queue"], got["gpus"], got["labels"]) == ("bert", "nlp", 2, {"team": "nlp"})
    # Options override the file's fields; -o json prints the whole job.
    spec_json = tmp_path / "job.json"
    spec_json.write_text(json.dumps({"queue": "nlp", "command": "echo hi"}))
    out = json.loads(corral("submit", str(spec_json), "--queue", "vision", "--priority", "5", "-o", "json").stdout)
    assert (out["queue"], out["priority"], out["spec"]["command"]) == ("vision", 5, "echo hi")


def test_submit_a_command_after_double_dash(corral: Corral, service: Service) -> None:
    r = corral(
        "submit",
        "--queue",
        "nlp",
        "--gpus",
        "1",
        "--name",
        "sweep",
        "--workers",
        "2",
        "--priority",
        "3",
        "--no-preemptible",
        "--env",
        "LR=0.1",
        "--env",
        "SEED=1",
        "--label",
        "exp=a",
        "--max-runtime",
        "60",
        "--idempotency-key",
        "k1",
        "--workdir",
        "/tmp",
        "--",
        "python",
        "train.py",
        "--epochs",
        "3",
    )
    got = job(service, int(r.stdout.strip()))
    spec = got["spec"]
    assert spec["command"] == ["python", "train.py", "--epochs", "3"]
    assert (got["name"], got["gpus"], got["workers"], got["priority"], got["preemptible"]) == ("sweep", 2, 2, 3, False)
    assert (spec["env"], spec["labels"], spec["max_runtime"], spec["workdir"]) == (
        {"LR": "0.1", "SEED": "1"},
        {"exp": "a"},
        60,
        "/tmp",
    )
    # The same idempotency key with the same spec answers the first job, and says so on stderr.
    again = corral(
        "submit",
        "--queue",
        "nlp",
        "--gpus",
        "1",
        "--name",
        "sweep",
        "--workers",
        "2",
        "--priority",
        "3",
        "--no-preemptible",
        "--env",
        "LR=0.1",
        "--env",
        "SEED=1",
        "--label",
        "exp=a",
        "--max-runtime",
        "60",
        "--idempotency-key",
        "k1",
        "--workdir",
        "/tmp",
        "--",
        "python",
        "train.py",
        "--epochs",
        "3",
    )
    assert again.stdout.strip() == r.stdout.strip()
    assert "used before" in again.stderr
    # With another spec, the key is refused and the fields that differ are named.
    other = corral("submit", "--queue", "nlp", "--idempotency-key", "k1", "--", "true", code=1)
    assert "other values of: command" in other.stderr
    # One argument is a shell line.
    one = corral("submit", "--queue", "nlp", "--", "python train.py | tee log")
    assert job(service, int(one.stdout.strip()))["spec"]["command"] == "python train.py | tee log"


def test_submit_a_share_of_a_gpu(corral: Corral, service: Service) -> None:
    quarter = submit(corral, "nlp", 1, "--gpus", "0.25")  # the later --gpus wins
    assert job(service, quarter)["gpus"] == 0.25 and job(service, quarter)["spec"]["gpus"] == 0.25
    assert job(service, submit(corral, "nlp", 2))["spec"]["gpus"] == 2  # whole GPUs stay integers
    r = corral("submit", "--queue", "nlp", "--gpus", "1.5", "--", "true", code=1)
    assert "whole number" in r.stderr
    r = corral("submit", "--queue", "nlp", "--mig", "1g.10gb", "--", "true", code=1)
    assert "MIG slice 1g.10gb" in r.stderr  # a well-formed profile this pool's nodes do not offer


def test_submit_without_queue_or_command_is_a_usage_error(corral: Corral) -> None:
    r = corral("submit", "--gpus", "1", code=2)
    assert "--queue" in r.stderr
    assert "KEY=VALUE" in corral("submit", "--queue", "nlp", "--env", "NOEQUALS", "--", "true", code=2).stderr


def test_unknown_queue_is_one_line_on_stderr_and_exit_1(corral: Corral) -> None:
    r = corral("submit", "--queue", "nosuch", "--", "true", code=1)
    assert r.stdout == ""
    assert r.stderr.strip() == "error: queue 'nosuch' does not exist [invalid]"


# ----- ps, cancel, explain, logs -----


def test_ps_lists_live_jobs_and_filters(corral: Corral, service: Service) -> None:
    a = submit(corral, "nlp", 2)
    b = submit(corral, "ranking", 4)
    service.tick()
    table = corral("ps").stdout
    assert "ID" in table and "running" in table and "ranking" in table
    assert corral("cancel", str(a)).stdout.strip() == f"cancelled job {a} (job in nlp)"
    listed = json.loads(corral("ps", "-o", "json").stdout)["jobs"]
    assert [j["id"] for j in listed] == [b]
    every = yaml.safe_load(corral("ps", "--all", "-o", "yaml").stdout)["jobs"]
    assert [(j["id"], j["state"]) for j in every] == [(b, "running"), (a, "cancelled")]
    only = json.loads(corral("ps", "--state", "cancelled", "--queue", "nlp", "-o", "json").stdout)["jobs"]
    assert [j["id"] for j in only] == [a]
    assert json.loads(corral("ps", "--owner", "nobody", "-o", "json").stdout)["jobs"] == []
    assert "no jobs" in corral("ps", "--queue", "vision").stderr
    submit(corral, "vision", 1, "--name", "[red]x")
    assert "[red]x" in corral("ps").stdout  # a name is text, not rich markup


def test_cancel_tries_every_job_and_fails_if_one_did(corral: Corral, service: Service) -> None:
    a = submit(corral)
    r = corral("cancel", str(a), "999", code=1)
    assert f"cancelled job {a}" in r.stdout
    assert "error: job 999: job 999 not found [not_found]" in r.stderr
    assert job(service, a)["state"] == "cancelled"
    assert "already ended" in corral("cancel", str(a), code=1).stderr


def test_explain_shows_the_blocking_rule_and_numbers(corral: Corral, service: Service) -> None:
    submit(corral, "nlp", 2, "--no-preemptible")
    waiting = submit(corral, "nlp", 1, "--no-preemptible")
    service.tick()
    text = corral("explain", str(waiting)).stdout
    assert f"job {waiting}: pending" in text
    assert "blocked by guarantee:" in text
    assert "quota=2" in text
    data = json.loads(corral("explain", str(waiting), "-o", "json").stdout)
    assert data["reason"]["rule"] == "guarantee"


def test_explain_shows_preemptions_with_cause_and_preemptor(corral: Corral, service: Service) -> None:
    borrowers = [submit(corral, "ranking", 4) for _ in range(2)]
    service.tick()
    mine = submit(corral, "nlp", 2)
    service.clock.advance(5)
    service.tick()
    victim = next(b for b in borrowers if job(service, b)["state"] == "pending")
    text = corral("explain", str(victim)).stdout
    assert "preempted 1 time:" in text
    assert f"reclaim by job {mine}:" in text


def test_logs_error_when_the_job_has_not_started(corral: Corral) -> None:
    jid = submit(corral)
    assert "has not started yet" in corral("logs", str(jid), code=1).stderr


# ----- queues -----


def test_queue_ls_shows_the_tree_indented(corral: Corral, service: Service) -> None:
    submit(corral, "ranking", 6)
    service.tick()
    text = corral("queue", "ls").stdout
    lines = text.splitlines()
    assert "version 2" in text
    nlp = next(line for line in lines if line.lstrip().startswith("nlp "))
    assert nlp.startswith("  nlp")  # a child of research
    ranking = next(line for line in lines if line.lstrip().startswith("ranking "))
    assert ranking.split()[1:4] == ["local", "4", "-"] and ranking.split()[6:9] == ["6", "0", "2"]
    data = yaml.safe_load(corral("queue", "ls", "-o", "yaml").stdout)
    assert {q["name"] for q in data["queues"]} == {q["name"] for q in DEMO_TREE["queues"]}


def _tree_file(tmp_path: Path, ranking_quota: int) -> Path:
    doc = json.loads(json.dumps(DEMO_TREE))
    next(q for q in doc["queues"] if q["name"] == "ranking")["quota"] = {"local": ranking_quota}
    doc["queues"].append({"name": "ads", "parent": "product", "quota": {"local": 0}})
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_queue_apply_dry_run_shows_the_diff_and_changes_nothing(
    corral: Corral, service: Service, tmp_path: Path
) -> None:
    r = corral("queue", "apply", "-f", str(_tree_file(tmp_path, 3)), "--dry-run")
    assert "~ ranking  quota: {local: 4} -> {local: 3}" in r.stdout
    assert "+ ads  parent: product  quota: {local: 0}" in r.stdout
    assert len(service.admin.get("/v1/queues/history").json()["versions"]) == 2


def test_queue_apply_asks_then_applies_and_rolls_back(corral: Corral, service: Service, tmp_path: Path) -> None:
    path = _tree_file(tmp_path, 3)
    declined = corral("queue", "apply", "-f", str(path), input="n\n", code=1)
    assert "~ ranking" in declined.stdout and "nothing applied" in declined.stderr
    assert len(service.admin.get("/v1/queues/history").json()["versions"]) == 2
    r = corral("queue", "apply", "-f", str(path), "-m", "shrink ranking", input="y\n")
    assert "applied as version 3" in r.stdout
    assert "no changes" in corral("queue", "apply", "-f", str(path), "--yes").stdout
    history = corral("queue", "history").stdout
    assert "shrink ranking" in history and "test tree" in history
    versions = json.loads(corral("queue", "history", "-o", "json").stdout)["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    back = corral("queue", "rollback", "2")
    assert "~ ranking  quota: {local: 3} -> {local: 4}" in back.stdout
    assert "- ads" in back.stdout
    assert "rolled back to version 2, now version 4" in back.stdout
    assert "version 5 not found" in corral("queue", "rollback", "5", code=1).stderr


def test_queue_apply_rejects_an_invalid_tree_with_its_problems(corral: Corral, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"queues": [{"name": "a", "quota": {"local": 99}}]}))
    r = corral("queue", "apply", "-f", str(path), "--yes", code=1)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "[invalid]" in r.stderr
    (tmp_path / "broken.yaml").write_text("queues: [")
    assert "not valid YAML" in corral("queue", "apply", "-f", str(tmp_path / "broken.yaml"), code=2).stderr


# ----- top, usage, tokens -----


def test_top_shows_gpus_with_their_jobs_and_queues(corral: Corral, service: Service) -> None:
    jid = submit(corral, "ranking", 6, "--name", "big")
    submit(corral, "nlp", 2)
    service.tick()
    text = corral("top").stdout
    assert "pool local: 8 GPUs, 0 free" in text
    gpu_rows = [line.split() for line in text.splitlines() if line.startswith("localhost")]
    assert len(gpu_rows) == 8
    assert sum(1 for row in gpu_rows if row[3:6] == [str(jid), "big", "ranking"]) == 6
    data = json.loads(corral("top", "-o", "json").stdout)
    assert data["pools"][0]["free"] == 0 and any(q["name"] == "ranking" for q in data["queues"])


def test_top_shows_each_share_of_a_shared_gpu(corral: Corral, service: Service) -> None:
    half, quarter = submit(corral, "nlp", 1, "--gpus", "0.5"), submit(corral, "nlp", 1, "--gpus", "0.25")
    service.tick()
    rows = [line.split() for line in corral("top").stdout.splitlines() if line.startswith("localhost")]
    shared = [r for r in rows if len(r) > 4 and r[4].startswith("(")]
    assert sorted(r[3:5] for r in shared) == sorted([[str(half), "(0.5)"], [str(quarter), "(0.25)"]]), rows
    assert len({r[1] for r in shared}) == 1  # one GPU, shared


def test_top_shows_non_preemptible_use_against_quota(corral: Corral, service: Service) -> None:
    box = {"queue": "nlp", "gpus": 2, "command": ["jupyterhub-singleuser"]}
    assert service.admin.post("/v1/sandboxes", json=box).status_code == 201
    submit(corral, "nlp", 3)  # a batch job: usage, not non-preemptible use
    service.tick()
    text = corral("top").stdout
    header = next(line.split() for line in text.splitlines() if line.startswith("QUEUE"))
    assert header[:5] == ["QUEUE", "POOL", "USAGE", "QUOTA", "NP/QUOTA"]
    rows = {r[0]: r for r in (line.split() for line in text.splitlines()) if r and r[0] in ("nlp", "research")}
    assert rows["nlp"][1:5] == ["local", "5", "2", "2/2"] and rows["research"][1:5] == ["local", "5", "4", "2/4"]
    data = json.loads(corral("top", "-o", "json").stdout)
    assert next(q for q in data["queues"] if q["name"] == "nlp")["pools"]["local"]["np_usage"] == 2


def test_usage_in_gpu_hours(corral: Corral, service: Service) -> None:
    t0 = service.clock.t
    jid = submit(corral, "nlp", 2)
    service.tick()
    service.clock.advance(3600)
    service.executor.exit(jid, 0)
    service.tick()
    text = corral("usage", "--since", str(t0), "--until", str(t0 + 7200)).stdout
    assert any(line.split() == ["nlp", "2.00"] for line in text.splitlines())
    assert any(line.split() == ["root", "2.00"] for line in text.splitlines())
    data = yaml.safe_load(corral("usage", "--since", str(t0), "-o", "yaml").stdout)
    assert data["pools"][0]["idle_gpu_hours"] == 6.0
    assert "not a time" in corral("usage", "--since", "yesterday-ish", code=2).stderr


def test_parse_time_forms() -> None:
    now = 1_700_000_000.0
    assert cli_client.parse_time("1690000000", now) == 1_690_000_000.0
    assert cli_client.parse_time("24h", now) == now - 86400
    assert cli_client.parse_time("7d", now) == now - 7 * 86400
    assert cli_client.parse_time("90s", now) == now - 90
    assert cli_client.parse_time("now", now) == now
    assert cli_client.parse_time("2024-05-01T00:00:00Z", now) == 1_714_521_600.0
    with pytest.raises(typer.BadParameter):
        cli_client.parse_time("soon", now)


def test_token_create_prints_the_secret_once(corral: Corral, service: Service) -> None:
    r = corral("token", "create", "--user", "alice", "--role", "member", "--scope", "nlp")
    secret = r.stdout.strip()
    assert secret.startswith("corral_") and "shown only now" in r.stderr
    alice = TestClient(service.admin.app)
    alice.headers["Authorization"] = f"Bearer {secret}"
    assert alice.post("/v1/jobs", json={"queue": "nlp", "command": "true"}).status_code == 201
    assert alice.post("/v1/jobs", json={"queue": "ranking", "command": "true"}).status_code == 403
    made = json.loads(corral("token", "create", "--user", "bob", "--role", "viewer", "-o", "json").stdout)
    assert (made["user"], made["role"], made["scope"]) == ("bob", "viewer", None)
    assert (
        "does not exist"
        in corral("token", "create", "--user", "x", "--role", "member", "--scope", "nope", code=1).stderr
    )


# ----- connection settings -----


def test_token_comes_from_flag_env_then_admin_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_TOKEN", raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path))
    secret, source = cli_client.resolve_token(None)
    assert secret is None and str(tmp_path / ADMIN_TOKEN_FILE) in source
    (tmp_path / ADMIN_TOKEN_FILE).write_text("corral_fromfile\n")
    assert cli_client.resolve_token(None)[0] == "corral_fromfile"
    assert cli_client.resolve_token("corral_flag")[0] == "corral_flag"
    seen: list[tuple[str, str | None]] = []

    def refuse(url: str, token: str | None) -> httpx.Client:
        seen.append((url, token))
        return httpx.Client(
            base_url=url,
            transport=httpx.MockTransport(
                lambda _: httpx.Response(
                    401,
                    json={"error": {"code": "unauthorized", "message": "the API token is not valid or was revoked"}},
                )
            ),
        )

    monkeypatch.setattr(cli_client, "make_http_client", refuse)
    runner = CliRunner()
    r = runner.invoke(app, ["ps"], env={"CORRAL_URL": "http://corral.example:9", "CORRAL_TOKEN": "corral_env"})
    assert r.exit_code == 1
    assert seen == [("http://corral.example:9", "corral_env")]
    assert r.stderr.strip() == "error: the API token is not valid or was revoked [unauthorized]"
    (tmp_path / ADMIN_TOKEN_FILE).unlink()
    r = runner.invoke(app, ["ps"])
    assert seen[-1] == ("http://127.0.0.1:8265", None)
    assert "no --token, no CORRAL_TOKEN" in r.stderr  # a 401 without any token says where one was looked for


def test_connection_refused_names_the_url_and_corral_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TOKEN", "corral_x")
    port = _free_port()
    r = CliRunner().invoke(app, ["ps", "--url", f"http://127.0.0.1:{port}"])
    assert r.exit_code == 1
    assert f"cannot reach the Corral API at http://127.0.0.1:{port}" in r.stderr
    assert "corral serve" in r.stderr


# ----- a real server -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path, corral_cmd: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """`corral serve` on 2 declared GPUs in a subprocess; yields its URL and the environment that finds it."""
    port = _free_port()
    data = tmp_path / "serve-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    # Jobs run this checkout's interpreter, which other accounts may not reach (under /root): one user.
    env.update(CORRAL_DATA_DIR=str(data), XDG_DATA_HOME=str(tmp_path / "xdg"), CORRAL_RUN_AS="service")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*corral_cmd, "serve", "--gpus", "2", "--gpu-model", "virtual", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"corral serve did not come up: {(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.1)
        # Who runs the jobs is said where the service is started.
        assert "isolation: run_as=service" in (tmp_path / "serve.log").read_text()
        yield url, {**env, "CORRAL_URL": url}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "admin token written to" in (tmp_path / "serve.log").read_text()


def test_serve_runs_a_real_job(server: tuple[str, dict[str, str]], corral_cmd: list[str]) -> None:
    url, env = server

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*corral_cmd, *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done

    jid = cli("submit", "--queue", "default", "--gpus", "1", "--", "python", "-c", "print(1)").stdout.strip()
    # Polled over HTTP, not with `corral ps`: each CLI process costs a second of start-up.
    admin = {"Authorization": f"Bearer {(Path(env['CORRAL_DATA_DIR']) / ADMIN_TOKEN_FILE).read_text().strip()}"}
    deadline = time.monotonic() + 15
    while (state := httpx.get(f"{url}/v1/jobs/{jid}", headers=admin).json()["state"]) != "completed":
        assert state in ("pending", "starting", "running") and time.monotonic() < deadline, state
        time.sleep(0.1)
    assert json.loads(cli("ps", "--all", "-o", "json").stdout)["jobs"][0]["id"] == int(jid)
    assert cli("logs", jid).stdout == "1\n"
    assert cli("logs", jid, "--follow").stdout == "1\n"  # an ended attempt: follow prints it all and returns
