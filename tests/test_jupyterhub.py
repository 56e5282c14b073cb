"""A real JupyterHub (with configurable-http-proxy) spawning sandboxes through a real Corral service.

Within quota a server starts on its GPUs; over quota the hub answers at once with Corral's message; stopping
frees the GPUs at once; hub tokens carry hub groups and custom:corral:* scopes into Corral's rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from notebooks.client import Client
from scheduler.service.store.db import jobs
from tests.test_crash import free_port

pytestmark = pytest.mark.integration  # JupyterHub, its proxy and a live Corral

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
UID_MIN, UID_MAX = 2_900_100, 2_900_199  # the notebooks' accounts when the hub's servers run as their users


def reachable(path: Path) -> bool:
    """Whether an account other than root may run `path`: every directory above it passable, the file executable."""
    real = path.resolve()
    return real.exists() and all(p.stat().st_mode & 0o001 for p in [*real.parents, real])


def user_python() -> str | None:
    """An interpreter of this Python's version that other accounts may run (with this venv's packages on
    PYTHONPATH): this one, or the system's where this one sits under /root. None: the servers run as the service."""
    tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.executable), Path("/usr/bin") / tag, Path("/usr/local/bin") / tag):
        if reachable(candidate):
            return str(candidate)
    return None


def proxy_command() -> str | None:
    """configurable-http-proxy: CORRAL_PROXY_CMD (scripts/test sets it from scripts/proxy), else on PATH."""
    return os.environ.get("CORRAL_PROXY_CMD") or shutil.which("configurable-http-proxy")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 40) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


HUB_CONFIG = """
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {hub_port}
c.JupyterHub.hub_port = {hub_api_port}
c.JupyterHub.db_url = "sqlite:///{home}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{home}/cookie_secret"
c.JupyterHub.pid_file = "{home}/jupyterhub.pid"
c.ConfigurableHTTPProxy.command = ["{proxy}"]
c.ConfigurableHTTPProxy.auth_token = "{proxy_token}"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "corral"
c.JupyterHub.allow_named_servers = True
c.Spawner.cmd = {cmd}
c.Spawner.environment = {environment}
c.Spawner.args = ["--allow-root"] if {root} else []
c.Spawner.start_timeout = 30
c.Spawner.http_timeout = 30
c.CorralSpawner.corral_url = "{corral_url}"
c.CorralSpawner.corral_token = "{corral_token}"
c.CorralSpawner.group_queues = {groups}
c.CorralSpawner.profiles = {profiles}
c.JupyterHub.load_groups = {{"team-a": {{"users": ["alice"]}}, "team-b": {{"users": ["bob"]}}}}
c.JupyterHub.custom_scopes = {{
    "custom:corral:submit": {{"description": "submit jobs and open sandboxes in Corral"}},
    "custom:corral:admin": {{"description": "administer Corral"}},
    "custom:corral:promote": {{"description": "promote models in Corral"}},
}}
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "custom:corral:submit"]}},
    {{"name": "server", "scopes": ["inherit"]}},
    {{"name": "tester", "scopes": ["admin:users", "admin:servers", "admin:groups", "tokens"],
      "services": ["tester"]}},
]
c.JupyterHub.services = [
    {{"name": "tester", "api_token": "{tester_token}"}},
    {{"name": "corral", "url": "{corral_url}", "api_token": "{corral_service_token}", "oauth_no_confirm": True,
      "oauth_redirect_uri": "{corral_url}/oauth_callback"}},
]
"""


PROFILES = [
    {"name": "gpu1", "display": "1 x GPU", "gpus": 1},
    {"name": "gpu2", "display": "2 x GPU", "gpus": 2, "groups": ["team-b"]},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with hub_stack(tmp_path_factory.mktemp("hub"), PROFILES) as s:
        yield s


@contextlib.contextmanager
def hub_stack(
    home: Path,
    profiles: list[dict[str, Any]],
    corral: list[str] | None = None,
    corral_env: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Corral (`python -m scheduler.service`, or the `corral` argv given) on 4 virtual GPUs with the demo queues,
    and a JupyterHub (dummy authenticator, configurable-http-proxy) spawning through it with these profiles."""
    proxy = proxy_command()
    if proxy is None:
        if os.environ.get("CORRAL_REQUIRE_HUB"):
            pytest.fail("configurable-http-proxy is not installed, but CORRAL_REQUIRE_HUB asks for hub tests")
        pytest.skip("configurable-http-proxy not found (npm install configurable-http-proxy; scripts/test does)")
    # As root, notebook servers run as their users' own accounts (docs/service.md, Trust model): their homes are
    # under data_dir, which must then be where other accounts may pass (pytest's tmp is not).
    python = user_python() if os.geteuid() == 0 else None
    if python is not None:
        data = Path(tempfile.mkdtemp(prefix="corral-hub-", dir="/tmp"))
        os.chmod(data, 0o711)
        cmd = [python, "-m", "jupyterhub.singleuser"]
        site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
        # This checkout too (the editable install's .pth is not read from PYTHONPATH), and where this venv keeps
        # Jupyter's config (which server extensions are on), data and JupyterLab's assets: not under /usr.
        share = Path(sys.prefix) / "share" / "jupyter"
        environment = {
            "PYTHONPATH": os.pathsep.join([*site, str(ROOT)]),
            "JUPYTERLAB_DIR": str(share / "lab"),
            "JUPYTER_CONFIG_PATH": str(Path(sys.prefix) / "etc" / "jupyter"),
            "JUPYTER_PATH": str(share),
        }
        (home / "data").symlink_to(data)  # where the tests look; the service is given the real path
    else:
        data = home / "data"
        data.mkdir()
        cmd, environment = [str(BIN / "jupyterhub-singleuser")], {}
    corral_port, hub_port, hub_api_port = free_port(), free_port(), free_port()
    groups = {"team-a": "nlp", "team-b": "ranking"}
    corral_url = f"http://127.0.0.1:{corral_port}"
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_PORT": str(corral_port),
        "CORRAL_GPUS": "4",
        "CORRAL_DEMO": "1",
        "CORRAL_TICK_S": "0.1",
        "CORRAL_GRACE_S": "3",
        "CORRAL_HUB_API_URL": f"http://127.0.0.1:{hub_api_port}/hub/api",
        "CORRAL_HUB_GROUPS": json.dumps(groups),
        "CORRAL_RUN_AS": "users" if python is not None else "service",
        "CORRAL_UID_MIN": str(UID_MIN),
        "CORRAL_UID_MAX": str(UID_MAX),
        **(corral_env or {}),
    }
    env.pop("CORRAL_DATABASE_URL", None)
    procs: list[subprocess.Popen[bytes]] = []
    with open(home / "corral.log", "w") as log:
        procs.append(
            subprocess.Popen(corral or [sys.executable, "-m", "scheduler.service"], env=env, stdout=log, stderr=log)
        )
    try:
        wait_for(lambda: httpx.get(f"{corral_url}/readyz").status_code == 200, "Corral")
        admin = (home / "data" / "admin-token").read_text().strip()
        tester = secrets.token_hex(16)
        (home / "jupyterhub_config.py").write_text(
            HUB_CONFIG.format(
                hub_port=hub_port,
                hub_api_port=hub_api_port,
                home=home,
                proxy=proxy,
                proxy_token=secrets.token_hex(16),
                cmd=cmd,
                environment=environment,
                root=os.geteuid() == 0,
                corral_url=corral_url,
                corral_token=admin,
                groups=groups,
                tester_token=tester,
                corral_service_token=secrets.token_hex(16),
                profiles=profiles,
            )
        )
        hub_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        with open(home / "hub.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [str(BIN / "jupyterhub"), "-f", str(home / "jupyterhub_config.py")],
                    cwd=home,
                    env=hub_env,
                    stdout=log,
                    stderr=log,
                )
            )
        hub = httpx.Client(
            base_url=f"http://127.0.0.1:{hub_port}/hub/api", headers={"Authorization": f"token {tester}"}, timeout=60
        )
        wait_for(lambda: hub.get("/").status_code == 200, "JupyterHub")
        corral = httpx.Client(base_url=corral_url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        yield {
            "hub": hub,
            "corral": corral,
            "corral_url": corral_url,
            "home": home,
            "as_users": python is not None,
            "hub_url": f"http://127.0.0.1:{hub_port}",
            "data": data,
        }
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if python is not None:
            shutil.rmtree(data, ignore_errors=True)


def sandboxes(stack: dict[str, Any]) -> list[dict[str, Any]]:
    boxes: list[dict[str, Any]] = stack["corral"].get("/v1/sandboxes").json()["sandboxes"]
    return boxes


def server_ready(stack: dict[str, Any], user: str, name: str = "") -> bool:
    servers = stack["hub"].get(f"/users/{user}").json().get("servers", {})
    return bool(servers.get(name, {}).get("ready"))


def test_spawn_within_quota_runs_on_its_gpus(stack: dict[str, Any]) -> None:
    r = stack["hub"].post("/users/alice/server", json={"profile": "gpu1"})
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: server_ready(stack, "alice"), "alice's server")
    (box,) = [b for b in sandboxes(stack) if b["owner"] == "alice"]
    assert (box["queue"], box["gpus"], box["state"], box["preemptible"]) == ("nlp", 1, "running", False)
    held = [
        g
        for p in stack["corral"].get("/v1/pools").json()["pools"]
        for n in p["nodes"]
        for g in n["gpus"]
        if g["job"] == box["id"]
    ]
    assert len(held) == 1


def test_the_notebook_server_runs_as_its_user(stack: dict[str, Any]) -> None:
    """As root, the hub's single-user server runs as alice's own account, with its home (where jupyter keeps its
    runtime files) hers alone."""
    if not stack["as_users"]:
        if os.geteuid() != 0 and os.environ.get("CORRAL_REQUIRE_ISOLATION"):
            pytest.fail("the service is not root, and CORRAL_REQUIRE_ISOLATION asks for this test")
        # Root without a Python other accounts may run: the servers run single-user here; the notebook's uid and
        # home are still tested with a shell server in tests/test_attack_isolation.py.
        pytest.skip("the service is not root, or no interpreter other accounts may run: servers run single-user")
    (box,) = [b for b in sandboxes(stack) if b["owner"] == "alice"]
    data = stack["home"] / "data"
    uid = json.loads((data / "accounts.json").read_text())["alice"]
    shim = json.loads((data / "runs" / str(box["id"]) / str(box["attempt"]) / "pid").read_text())["pid"]
    members = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == shim]
    assert {p.stat().st_uid for p in members} == {0, uid}  # the shim (the service's user) and the server
    home = data / "home" / str(uid)
    assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (uid, 0o700)
    assert (home / ".local" / "share" / "jupyter" / "runtime").stat().st_uid == uid


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_the_notebook_talks_to_corral_as_its_user(stack: dict[str, Any]) -> None:
    """Inside the sandbox, CORRAL_URL and the server's hub token are all the SDK needs."""
    (box,) = [b for b in sandboxes(stack) if b["owner"] == "alice"]
    with sa.create_engine(f"sqlite:///{stack['home'] / 'data' / 'corral.db'}").connect() as conn:
        env = conn.execute(sa.select(jobs.c.spec).where(jobs.c.id == box["id"])).scalar_one()["env"]
    assert env["CORRAL_URL"] == stack["corral_url"]
    me = httpx.Client(base_url=env["CORRAL_URL"], headers={"Authorization": f"token {env['JUPYTERHUB_API_TOKEN']}"})
    r = me.post("/v1/jobs", json={"queue": "nlp", "gpus": 0, "command": ["true"]})
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "alice"


def test_spawn_over_quota_is_refused_at_once_with_the_reason(stack: dict[str, Any]) -> None:
    r = stack["hub"].post("/users/alice/servers/second", json={"profile": "gpu1"})
    assert r.status_code == 409, r.text
    assert (
        "team nlp holds 1 non-preemptible GPUs of local and this notebook needs 1: 2 > quota 1" in r.json()["message"]
    )
    assert [b["owner"] for b in sandboxes(stack)].count("alice") == 1


def test_profiles_are_restricted_per_group(stack: dict[str, Any]) -> None:
    r = stack["hub"].post("/users/alice/servers/big", json={"profile": "gpu2"})
    assert r.status_code == 409, r.text
    assert r.json()["message"] == "profile 'gpu2' is not open to alice's groups"


def test_hub_tokens_carry_groups_and_scopes_into_corral(stack: dict[str, Any]) -> None:
    tokens = {
        u: stack["hub"].post(f"/users/{u}/tokens", json={"note": "test"}).json()["token"] for u in ("alice", "bob")
    }
    as_user = {
        u: httpx.Client(base_url=stack["corral_url"], headers={"Authorization": f"token {t}"}, timeout=30)
        for u, t in tokens.items()
    }
    job = {"queue": "ranking", "gpus": 0, "command": ["sleep", "30"]}
    bob_job = as_user["bob"].post("/v1/jobs", json=job)
    assert bob_job.status_code == 201, bob_job.text
    bid = bob_job.json()["id"]
    assert bob_job.json()["owner"] == "bob"
    assert as_user["alice"].get(f"/v1/jobs/{bid}").status_code == 404
    assert as_user["alice"].post(f"/v1/jobs/{bid}/cancel").status_code == 404
    assert as_user["alice"].post("/v1/jobs", json=job).status_code == 403
    assert all(b["owner"] == "alice" for b in as_user["alice"].get("/v1/sandboxes").json()["sandboxes"])
    assert as_user["bob"].get("/v1/sandboxes").json()["sandboxes"] == []  # alice's sandbox is not his to see
    assert as_user["bob"].post(f"/v1/jobs/{bid}/cancel").status_code == 200
    bad = httpx.get(f"{stack['corral_url']}/v1/jobs", headers={"Authorization": "token nonsense"})
    assert bad.status_code == 401


def test_stopping_the_server_frees_its_gpus_at_once(stack: dict[str, Any]) -> None:
    (box,) = [b for b in sandboxes(stack) if b["owner"] == "alice"]
    r = stack["hub"].delete("/users/alice/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: stack["corral"].get(f"/v1/jobs/{box['id']}").json()["state"] == "cancelled", "the close")
    free = stack["corral"].get("/v1/pools").json()["pools"][0]["free"]
    assert free == 4


def test_the_sdk_finds_corral_through_the_hub_with_no_configuration(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without CORRAL_URL, a notebook's SDK goes to the hub's service URL, <hub>/services/corral: the hub's proxy
    forwards the whole path to Corral, which answers there as at its root."""
    origin = str(stack["hub"].base_url).split("/hub/api")[0]
    token = stack["hub"].post("/users/alice/tokens", json={"note": "sdk"}).json()["token"]
    for var in ("CORRAL_URL", "CORRAL_TOKEN", "JUPYTERHUB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    monkeypatch.setenv("JUPYTERHUB_PUBLIC_URL", f"{origin}/")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    auth = {"Authorization": f"token {token}"}
    direct = httpx.get(f"{stack['corral_url']}/v1/jobs", headers=auth)
    through = httpx.get(f"{origin}/services/corral/v1/jobs", headers=auth)
    assert through.status_code == 200, through.text
    assert through.json() == direct.json()
    with Client() as corral:
        assert corral.connection.url == f"{origin}/services/corral"
        job = corral.submit(["true"], queue="nlp", gpus=0)
        assert job.data["owner"] == "alice" and corral.job(job.id).queue == "nlp"
