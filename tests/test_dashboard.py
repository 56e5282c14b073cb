"""The web dashboard: pages per role, CSRF, login (TestClient), and a real browser against a live Corral.

The browser test drives Debian's chromium through Playwright (executablePath, no downloaded browser); it is
skipped when either is missing, unless CORRAL_REQUIRE_BROWSER=1 says it must run. Screenshots land under the
test's tmp_path/screenshots and are copied to test-output/screenshots/ for review.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from sandbox.culling import GpuSample
from scheduler.service.api.auth import Role
from scheduler.service.api.deps import UI_COOKIE
from scheduler.service.core.assemble import create_token
from tests.marks import starts_processes
from tests.service_kit import Service, make_service

try:  # optional: the rest of the suite runs without a browser
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
STABLE_SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
HI = "python3 -c \"import time; print('hi'); time.sleep(1)\""


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    return make_service(f"sqlite:///{tmp_path / 'corral.db'}", tmp_path)


def login(s: Service, user: str, role: Role, scope: str | None = None) -> TestClient:
    c = TestClient(s.admin.app, follow_redirects=False)
    r = c.post("/ui/login", data={"token": create_token(s.core, user, role, scope), "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    return c


def csrf(c: TestClient, path: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get(path).text)
    assert m is not None
    return m.group(1)


def submit(s: Service, queue: str, gpus: int = 1, owner: str = "root", **extra: Any) -> int:
    c = s.admin if owner == "root" else s.client(owner, Role.MEMBER, extra.pop("scope"))
    r = c.post("/v1/jobs", json={"queue": queue, "gpus": gpus, "command": "true", **extra})
    assert r.status_code == 201, r.text
    job_id: int = r.json()["id"]
    return job_id


def test_pages_need_a_login_and_come_back_after_it(svc: Service) -> None:
    c = TestClient(svc.admin.app, follow_redirects=False)
    r = c.get("/ui/jobs?state=pending")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/jobs%3Fstate%3Dpending"
    bad = c.post("/ui/login", data={"token": "corral_nope", "next": "/ui/jobs"})
    assert bad.status_code == 401 and "not valid" in bad.text
    evil = c.post("/ui/login", data={"token": "x"}, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    token = create_token(svc.core, "ana", Role.VIEWER)
    r = c.post("/ui/login", data={"token": token, "next": "https://evil.example/"})
    assert r.headers["location"] == "/ui/queues"  # no open redirect
    page = c.get("/ui/queues")
    assert page.status_code == 200 and "research" in page.text and 'aria-label="usage of nlp' in page.text
    out = c.post("/ui/logout", data={"csrf": csrf(c, "/ui/queues")})
    assert out.status_code == 303 and UI_COOKIE not in c.cookies
    assert c.get("/ui/queues").status_code == 303


def test_a_member_sees_only_their_teams_jobs(svc: Service) -> None:
    mine = submit(svc, "nlp", owner="nia", scope="nlp")
    theirs = submit(svc, "ranking")
    c = login(svc, "nia", Role.MEMBER, "nlp")
    listed = c.get("/ui/jobs").text
    assert f'href="/ui/jobs/{mine}"' in listed and f'href="/ui/jobs/{theirs}"' not in listed
    assert c.get(f"/ui/jobs/{theirs}").status_code == 404  # answered like a missing job, as the API does
    admin = login(svc, "boss", Role.PLATFORM_ADMIN)
    assert f'href="/ui/jobs/{theirs}"' in admin.get("/ui/jobs").text
    bad = c.get("/ui/jobs?label=nolabel")
    assert bad.status_code == 422 and "key=value" in bad.text


def test_cancel_button_only_for_those_allowed_and_csrf_required(svc: Service) -> None:
    job = submit(svc, "nlp", owner="nia", scope="nlp")
    owner = login(svc, "nia", Role.MEMBER, "nlp")
    peer = login(svc, "nora", Role.MEMBER, "nlp")
    viewer = login(svc, "vic", Role.VIEWER)
    assert "Cancel job" in owner.get(f"/ui/jobs/{job}").text
    for c in (peer, viewer):
        page = c.get(f"/ui/jobs/{job}")
        assert page.status_code == 200 and "Cancel job" not in page.text
    assert peer.post(f"/ui/jobs/{job}/cancel", data={"csrf": csrf(peer, "/ui/jobs")}).status_code == 403
    refused = owner.post(f"/ui/jobs/{job}/cancel", data={})
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert owner.post(f"/ui/jobs/{job}/cancel", data={"csrf": csrf(peer, "/ui/jobs")}).status_code == 403
    assert svc.admin.get(f"/v1/jobs/{job}").json()["state"] == "pending"
    done = owner.post(f"/ui/jobs/{job}/cancel", data={"csrf": csrf(owner, f"/ui/jobs/{job}")})
    assert done.status_code == 303
    assert svc.admin.get(f"/v1/jobs/{job}").json()["state"] == "cancelled"
    assert "Cancel job" not in owner.get(f"/ui/jobs/{job}").text


def test_submit_form_and_pending_reason(svc: Service) -> None:
    c = login(svc, "nia", Role.MEMBER, "nlp")
    form = c.get("/ui/jobs/new").text
    assert "<option>nlp</option>" in form and "ranking" not in form  # only queues it may submit to
    assert c.post("/ui/jobs", data={"queue": "nlp", "command": "true"}).status_code == 403
    token = csrf(c, "/ui/jobs/new")
    bad = c.post("/ui/jobs", data={"csrf": token, "queue": "nlp", "command": "true", "gpus": "-1"})
    assert bad.status_code == 422 and "gpus" in bad.text
    hold = c.post(
        "/ui/jobs",
        data={"csrf": token, "queue": "nlp", "command": "sleep 60", "gpus": "8", "name": "hold", "preemptible": "1"},
    )
    assert hold.status_code == 303
    svc.tick()
    wait = c.post("/ui/jobs", data={"csrf": token, "queue": "nlp", "command": "true", "name": "waiter"})
    job_id = int(wait.headers["location"].rsplit("/", 1)[1])
    svc.tick()
    queues = c.get("/ui/queues").text
    assert "waiter" in queues and f"/ui/jobs/{job_id}" in queues
    page = c.get(f"/ui/jobs/{job_id}").text
    assert 'id="job-reason"' in page and "pending" in page
    reason = svc.admin.get(f"/v1/jobs/{job_id}/explain").json()["reason"]["message"]
    assert reason.split(":")[0] in page.replace("&#39;", "'")
    assert c.get(f"/ui/jobs/{job_id}/status").json()["state"] == "pending"


def test_queues_page_shows_non_preemptible_use_against_quota(svc: Service) -> None:
    box = {"queue": "nlp", "gpus": 2, "command": ["jupyterhub-singleuser"]}
    assert svc.admin.post("/v1/sandboxes", json=box).status_code == 201
    submit(svc, "nlp", gpus=3)  # a batch job: usage, not non-preemptible use
    svc.tick()
    page = login(svc, "boss", Role.PLATFORM_ADMIN).get("/ui/queues").text
    assert "Non-preemptible / quota" in page
    row = next(r for r in page.split("<tr>") if re.search(r">\s*nlp<", r))
    cells = re.findall(r'<span class="n">([^<]*)</span>', row)
    assert cells == ["2", "5", "5", "2/2", "3"]  # quota, fair share, usage, np/quota, borrowed
    assert 'aria-label="non-preemptible use of nlp: 2 of 8 GPUs"' in row


def test_other_pages_render(svc: Service) -> None:
    job = submit(svc, "ranking", gpus=2)
    svc.tick()
    svc.clock.advance(1800)
    admin = login(svc, "boss", Role.PLATFORM_ADMIN)
    pools = admin.get("/ui/pools").text
    assert f'href="/ui/jobs/{job}"' in pools and "free" in pools
    member = login(svc, "nia", Role.MEMBER, "nlp")
    assert "held by another team" in member.get("/ui/pools").text
    usage = admin.get("/ui/usage?period=1h").text
    assert "<svg" in usage and "ranking" in usage and "Idle GPU-hours" in usage
    assert "ranking" not in member.get("/ui/usage").text.split("Idle GPU-hours")[0].split("</nav>")[1]
    assert admin.get("/ui/models").status_code == 200
    assert admin.get("/ui/static/corral.css").status_code == 200


def test_whatif_runs_the_sim_report(svc: Service) -> None:
    admin = login(svc, "boss", Role.PLATFORM_ADMIN)
    form = admin.get("/ui/whatif").text
    assert 'value="demo.yaml"' in form
    queues = (
        "queues:\n  - {name: research, quota: {h100: 24, l4: 4}}\n  - {name: product, quota: {h100: 8, l4: 4}}\n"
        "  - {name: nlp, parent: research, quota: {h100: 16, l4: 2}}\n"
        "  - {name: speech, parent: research, quota: {h100: 8, l4: 2}}\n"
        "  - {name: vision, parent: product, quota: {h100: 4, l4: 4}}\n"
        "  - {name: ranking, parent: product, quota: {h100: 4}}\n"
    )
    data = {
        "csrf": csrf(admin, "/ui/whatif"),
        "trace": "demo.yaml",
        "cluster": "demo.yaml",
        "queues": "text",
        "queues_text": queues,
        "policy": ["corral", "fifo"],
        "limit": "100",
    }
    r = admin.post("/ui/whatif", data=data)
    assert r.status_code == 303, r.text
    run = r.headers["location"]
    deadline = time.monotonic() + 60
    while admin.get(f"{run}/status").json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    page = admin.get(run).text
    assert "Per policy" in page and "<table>" in page and "<th>policy</th>" in page, page[-3000:]
    assert admin.get(f"{run}/wait_cdf.png").headers["content-type"] == "image/png"
    member = login(svc, "nia", Role.MEMBER, "nlp")
    assert member.get(run).status_code == 404  # another user's run: its inputs may be private
    data["csrf"] = csrf(member, "/ui/whatif")
    assert member.post("/ui/whatif", data=data).status_code == 403
    data["csrf"], data["queues_text"] = csrf(admin, "/ui/whatif"), "queues: [{name: x, quota: {nowhere: 1}}]"
    failed = admin.post("/ui/whatif", data=data).headers["location"]
    while admin.get(f"{failed}/status").json()["state"] in ("queued", "running"):
        time.sleep(0.2)
    assert 'class="error"' in admin.get(failed).text


def test_sandbox_page_mine_and_all_with_idle_time_left_open_link_and_stop(tmp_path: Path) -> None:
    svc = make_service(
        f"sqlite:///{tmp_path / 'corral.db'}", tmp_path, hub_url="https://hub.example.org", cull_interval_s=0.1
    )
    idle = {i: GpuSample(2.0, 1 << 30) for i in range(8)}
    object.__setattr__(svc.core.cluster.nodes["localhost"], "sample", lambda: dict(idle))  # GPUs measured, and idle
    ids = {}
    for user, queue, server in (("alice", "nlp", ""), ("alice", "nlp", "big"), ("bob", "ranking", "")):
        name = f"jupyter-{user}-{server}" if server else f"jupyter-{user}"
        r = svc.admin.post(
            "/v1/sandboxes",
            json={
                "name": name,
                "queue": queue,
                "owner": user,
                "gpus": 0 if user == "bob" else 1,
                "profile": "gpu1",
                "command": ["jupyterhub-singleuser"],
                "env": {"JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:7001/user/x/"},
            },
        )
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    for _ in range(3):
        svc.clock.advance(60)
        svc.tick()
    alice = login(svc, "alice", Role.MEMBER, "nlp")
    mine = alice.get("/ui/sandboxes").text
    assert "jupyter-alice" in mine and "jupyter-alice-big" in mine and "jupyter-bob" not in mine
    assert 'href="https://hub.example.org/user/alice/"' in mine  # opens through the hub
    assert 'href="https://hub.example.org/user/alice/big/"' in mine
    assert re.search(r"<strong>2[89] minutes</strong>,\s*at (\d{4}-\d\d-\d\d )?\d\d:\d\d UTC", mine), mine  # time left
    assert "2%" in mine  # GPU utilisation
    assert "show=all" not in mine  # members see their own only
    admin = login(svc, "boss", Role.PLATFORM_ADMIN)
    everyone = admin.get("/ui/sandboxes?show=all").text
    assert all(n in everyone for n in ids) and "never (no GPU)" in everyone
    assert "Open jupyter-alice" not in everyone  # only its own user opens a notebook
    assert "jupyter-alice" not in admin.get("/ui/sandboxes").text  # the admin's own: none
    bob = login(svc, "bob", Role.MEMBER, "ranking")
    r = bob.post(f"/ui/sandboxes/{ids['jupyter-alice']}/stop", data={"csrf": csrf(bob, "/ui/sandboxes")})
    assert r.status_code == 404  # not his to see, let alone stop
    assert alice.post(f"/ui/sandboxes/{ids['jupyter-alice']}/stop", data={}).status_code == 403  # no CSRF token
    r = alice.post(f"/ui/sandboxes/{ids['jupyter-alice']}/stop", data={"csrf": csrf(alice, "/ui/sandboxes")})
    assert r.status_code == 303 and r.headers["location"] == "/ui/sandboxes?show=mine"
    assert svc.admin.get(f"/v1/jobs/{ids['jupyter-alice']}").json()["state"] == "cancelled"
    assert "jupyter-alice-big" in alice.get("/ui/sandboxes").text


def test_whatif_replays_this_clusters_recorded_jobs(svc: Service) -> None:
    for queue in ("nlp", "ranking", "nlp"):
        submit(svc, queue)
    svc.tick()
    svc.clock.advance(600)
    for job in svc.admin.get("/v1/jobs").json()["jobs"]:
        svc.executor.exit(job["id"], 0)
    svc.tick()
    admin = login(svc, "boss", Role.PLATFORM_ADMIN)
    form = admin.get("/ui/whatif").text
    assert "Replay this cluster" in form and 'name="days"' in form
    r = admin.post(
        "/ui/whatif/replay",
        data={
            "csrf": csrf(admin, "/ui/whatif"),
            "days": "2",
            "queues": "none",
            "policy": ["corral", "fifo"],
            "limit": "100",
        },
    )
    assert r.status_code == 303, r.text
    run = r.headers["location"]
    deadline = time.monotonic() + 60
    while admin.get(f"{run}/status").json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    page = admin.get(run).text
    assert "this cluster&#39;s jobs of the last 2 days (3)" in page or "jobs of the last 2 days (3)" in page, page
    assert "Per policy" in page and "<th>policy</th>" in page, page[-3000:]
    empty = admin.post("/ui/whatif/replay", data={"csrf": csrf(admin, "/ui/whatif"), "days": "2"})
    assert empty.status_code == 303  # the same records again: fine
    svc.clock.advance(10 * 86400)
    none = admin.post("/ui/whatif/replay", data={"csrf": csrf(admin, "/ui/whatif"), "days": "1"})
    assert none.status_code == 422 and "recorded no jobs in the last 1 day<" in none.text
    member = login(svc, "nia", Role.MEMBER, "nlp")
    assert member.post("/ui/whatif/replay", data={"csrf": csrf(member, "/ui/whatif"), "days": "2"}).status_code == 403


# ----- a real browser against a live service -----


def _browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (apt-get install chromium)"
    if sync_playwright is None:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
@starts_processes
def live(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `python -m scheduler.service` on 4 virtual GPUs with the demo queues: (its URL, the admin token)."""
    with live_service(tmp_path) as started:
        yield started


@contextlib.contextmanager
def live_service(tmp_path: Path, module: str = "scheduler.service", **settings: str) -> Iterator[tuple[str, str]]:
    """`python -m <module>` (the service, or a test's variant of it) with CORRAL_<NAME> settings added."""
    data, port = tmp_path / "data", _free_port()
    data.mkdir()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_PORT": str(port),
        "CORRAL_GPUS": "4",
        "CORRAL_DEMO": "1",
        "CORRAL_TICK_S": "0.1",
        "CORRAL_GRACE_S": "2",
        **{f"CORRAL_{k.upper()}": v for k, v in settings.items()},
    }
    env.pop("CORRAL_DATABASE_URL", None)
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                pytest.fail("server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.1)
        yield url, (data / "admin-token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_browser_login_queue_tree_submit_watch_and_pending_reason(live: tuple[str, str], tmp_path: Path) -> None:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CORRAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CORRAL_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    url, token = live
    shots = tmp_path / "screenshots"
    shots.mkdir()
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)

            def shot(name: str) -> None:
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

            page.goto(f"{url}/ui/queues")
            assert "/ui/login" in page.url  # not logged in: sent to the login form
            shot("01-login")
            page.get_by_label("API token").fill(token)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Queue tree")).to_be_visible()
            expect(page.get_by_role("rowheader", name="nlp").first).to_be_visible()
            expect(page.get_by_role("img", name=re.compile("quota of research")).first).to_be_visible()
            shot("02-queue-tree")

            page.goto(f"{url}/ui/jobs/new")
            page.get_by_label("Name").fill("hello")
            page.get_by_label("Queue").select_option("nlp")
            page.get_by_label("Command").fill(HI)
            shot("03-submit-form")
            page.get_by_role("button", name="Submit").click()
            expect(page.get_by_role("heading", name=re.compile("hello"))).to_be_visible()
            expect(page.locator("#job-state")).to_have_text("running", timeout=15_000)
            shot("04-job-running")
            expect(page.locator("#job-state")).to_have_text("completed", timeout=20_000)
            # The script shows a new state, then reloads the page: wait for the reloaded one (the server's own
            # data-state), or the next navigation races that reload.
            expect(page.locator("#job")).to_have_attribute("data-state", "completed")
            expect(page.locator("#log")).to_contain_text("hi")
            shot("05-job-completed-with-log")

            page.goto(f"{url}/ui/jobs/new")  # hold every GPU, so that the next job of the same queue must wait
            page.get_by_label("Name").fill("hold")
            page.get_by_label("Queue").select_option("ranking")
            page.get_by_label("Command").fill("sleep 60")
            page.get_by_label("GPUs per worker").fill("4")
            page.get_by_role("button", name="Submit").click()
            expect(page.locator("#job-state")).to_have_text("running", timeout=15_000)
            expect(page.locator("#job")).to_have_attribute("data-state", "running")
            hold_url = page.url
            page.goto(f"{url}/ui/jobs/new")
            page.get_by_label("Name").fill("waiter")
            page.get_by_label("Queue").select_option("ranking")
            page.get_by_label("Command").fill("true")
            page.get_by_role("button", name="Submit").click()
            expect(page.locator("#job-state")).to_have_text("pending")
            page.goto(f"{url}/ui/queues")
            row = page.get_by_role("row", name=re.compile("waiter"))
            expect(row.locator(".reason")).to_contain_text(re.compile(r"\w+"))
            reason = row.locator(".reason").inner_text()
            assert "waiting for the next cycle" not in reason, reason
            shot("06-pending-reason")
            page.goto(f"{url}/ui/pools")
            expect(page.locator("li.gpu.job").first).to_contain_text("hold")
            shot("07-gpu-map")
            page.goto(hold_url)
            page.get_by_role("button", name=re.compile("Cancel job")).click()
            expect(page.locator("#job-state")).to_have_text("cancelled")
            shot("08-cancelled")

            for name in ("jobs", "usage", "models", "whatif"):
                page.goto(f"{url}/ui/{name}")
                expect(page.locator("h1")).to_be_visible()
                shot(f"09-{name}")

            other = browser.new_page()
            other.goto(f"{url}/ui/jobs")
            assert "/ui/login" in other.url
        finally:
            browser.close()
    STABLE_SHOTS.mkdir(parents=True, exist_ok=True)
    for f in shots.iterdir():
        shutil.copy(f, STABLE_SHOTS / f.name)


DOC_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"


@pytest.mark.integration
def test_browser_sandboxes_page_and_replaying_this_cluster(tmp_path: Path) -> None:
    """The sandbox view (mine, all, GPUs, utilisation, idle time left, open, stop) and "replay this cluster" on
    the what-if page, in chromium against a live service whose virtual GPUs read as idle
    (tests/idle_gpu_service.py). Its screenshots are the ones in docs/dashboard.md (docs/img/)."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("CORRAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CORRAL_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with live_service(tmp_path, "tests.idle_gpu_service", cull_interval_s="1", hub_url="https://hub.example.org") as (
        url,
        token,
    ):
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        done = [
            api.post("/v1/jobs", json={"name": f"train-{i}", "queue": q, "gpus": 1, "command": "sleep 1"}).json()["id"]
            for i, q in enumerate(("nlp", "ranking", "nlp", "vision"))
        ]
        boxes = {}
        for owner, queue, gpus, profile in (
            ("admin", "nlp", 1, "h100"),
            ("alice", "ranking", 0, "cpu"),
            ("bob", "vision", 1, "h100"),
        ):
            r = api.post(
                "/v1/sandboxes",
                json={
                    "name": f"jupyter-{owner}",
                    "queue": queue,
                    "owner": owner,
                    "gpus": gpus,
                    "profile": profile,
                    "idle_timeout_s": 1800,
                    "command": ["sleep", "600"],
                    "env": {"JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{_free_port()}/user/{owner}/"},
                },
            )
            assert r.status_code == 201, r.text
            boxes[owner] = r.json()["id"]
        end = time.monotonic() + 60
        while any(api.get(f"/v1/jobs/{j}").json()["state"] != "completed" for j in done):
            assert time.monotonic() < end, "the jobs did not complete"
            time.sleep(0.3)
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                page.set_default_timeout(30_000)
                shots = tmp_path / "screenshots"
                shots.mkdir()

                def shot(name: str, full: bool = True) -> None:
                    page.screenshot(path=str(shots / f"{name}.png"), full_page=full)

                page.goto(f"{url}/ui/login")
                page.get_by_label("API token").fill(token)
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_role("heading", name="Queue tree")).to_be_visible()
                page.get_by_role("link", name="Sandboxes").click()
                expect(page.get_by_role("heading", name="Sandboxes")).to_be_visible()
                mine = page.locator(f"#sandbox-{boxes['admin']}")
                end = time.monotonic() + 30
                while "UTC" not in mine.locator("td.idle").inner_text():  # two samples make an idle stretch
                    assert time.monotonic() < end, mine.inner_text()
                    page.reload()
                expect(mine.locator("td.idle")).to_contain_text(re.compile(r"(29|30) minutes,\s*at \d\d:\d\d UTC"))
                expect(mine).to_contain_text("0%")  # GPU utilisation
                link = mine.get_by_role("link", name="Open jupyter-admin")
                assert link.get_attribute("href") == "https://hub.example.org/user/admin/"
                expect(page.locator(f"#sandbox-{boxes['alice']}")).to_have_count(0)  # mine only
                shot("sandboxes-mine")
                page.get_by_role("link", name="All", exact=True).click()
                expect(page.locator(f"#sandbox-{boxes['alice']}")).to_contain_text("never (no GPU)")
                expect(page.locator(f"#sandbox-{boxes['bob']}")).to_be_visible()
                shot("sandboxes-all")
                page.get_by_role("button", name="Stop jupyter-bob").click()
                expect(page.locator(f"#sandbox-{boxes['bob']}")).to_have_count(0)
                assert api.get(f"/v1/jobs/{boxes['bob']}").json()["state"] == "cancelled"

                page.get_by_role("link", name="What-if").click()
                page.get_by_label("Days to replay").fill("1")
                shot("whatif-replay-form")
                page.get_by_role("button", name="Replay this cluster").click()
                expect(
                    page.get_by_role("heading", name=re.compile("this cluster's jobs of the last 1 day"))
                ).to_be_visible()
                expect(page.locator("#run")).to_have_attribute("data-state", "done", timeout=90_000)
                expect(page.get_by_text("Per policy").first).to_be_visible()
                shot("whatif-replay-run", full=False)  # the report's top: it runs to several screens
            finally:
                browser.close()
        STABLE_SHOTS.mkdir(parents=True, exist_ok=True)
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for f in shots.glob("*.png"):
            shutil.copy(f, STABLE_SHOTS / f.name)
            shutil.copy(f, DOC_IMAGES / f"dashboard-{f.name}")
