"""A data scientist's day in a real browser: Debian's chromium (Playwright) against a real JupyterHub spawning
through a real Corral, whose virtual GPUs read as idle (tests/idle_gpu_service.py).

JupyterLab with a Python kernel opens in a CPU-only (zero-GPU) sandbox; a notebook saved there is still there
after the server is stopped and started again; named servers work; a refusal shows Corral's own sentence; and the
idle-GPU warning appears in the JupyterLab page, in times people read, before the sandbox is culled.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_jupyterhub import hub_stack, sandboxes, server_ready, wait_for

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the browser test is skipped then
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.integration  # JupyterHub, JupyterLab and Chromium

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
PROFILES = [
    {"name": "cpu", "display": "CPU only", "gpus": 0},
    {"name": "gpu1", "display": "1 x GPU", "gpus": 1},
    {"name": "short", "display": "1 x GPU, stopped after 40 s idle", "gpus": 1, "idle_timeout_s": 40},
]


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (apt-get install chromium)"
    if sync_playwright is None:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    missing = _missing()
    if missing:
        if os.environ.get("CORRAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CORRAL_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    corral = [sys.executable, "-m", "tests.idle_gpu_service"]
    with (
        hub_stack(tmp_path_factory.mktemp("hub"), PROFILES, corral, {"CORRAL_CULL_INTERVAL_S": "1"}) as stack,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(f"{stack['hub_url']}/hub/login")
            page.fill("#username_input", "alice")
            page.fill("#password_input", "any")
            page.click("#login_submit")
            page.wait_for_url(re.compile(r"/hub/(home|spawn)"))
            shots = tmp_path_factory.mktemp("screenshots")

            def shot(name: str) -> None:
                page.screenshot(path=str(shots / f"{name}.png"))
                SHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(shots / f"{name}.png", SHOTS / f"{name}.png")

            yield {**stack, "page": page, "shot": shot}
        finally:
            browser.close()


def start(lab: dict[str, Any], server: str, profile: str) -> dict[str, Any]:
    path = f"/users/alice/servers/{server}" if server else "/users/alice/server"
    r = lab["hub"].post(path, json={"profile": profile})
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: server_ready(lab, "alice", server), f"alice's server {server!r}", timeout=90)
    (box,) = [b for b in sandboxes(lab) if b["owner"] == "alice" and b["name"] == name_of(server)]
    return box


def stop(lab: dict[str, Any], server: str, box: dict[str, Any]) -> None:
    path = f"/users/alice/servers/{server}" if server else "/users/alice/server"
    assert lab["hub"].delete(path).status_code in (202, 204)
    wait_for(lambda: lab["corral"].get(f"/v1/jobs/{box['id']}").json()["state"] == "cancelled", "the close")
    wait_for(lambda: not server_ready(lab, "alice", server), "the hub to see it stopped")


def name_of(server: str) -> str:
    return f"jupyter-alice-{server}" if server else "jupyter-alice"


def open_lab(lab: dict[str, Any], server: str) -> Any:
    page = lab["page"]
    page.goto(f"{lab['hub_url']}/user/alice/{server + '/' if server else ''}")
    page.wait_for_url(re.compile(r"/lab"))  # the default URL: JupyterLab, not "A Jupyter Server is running."
    expect(page.locator(".jp-LauncherCard", has_text="Python 3 (ipykernel)").first).to_be_visible()
    return page


def test_jupyterlab_with_a_kernel_in_a_cpu_sandbox_and_files_that_survive_a_restart(lab: dict[str, Any]) -> None:
    box = start(lab, "", "cpu")
    assert (box["gpus"], box["state"]) == (0, "running")  # a zero-GPU sandbox is not refused
    page = open_lab(lab, "")
    lab["shot"]("sandbox-01-jupyterlab")
    token = lab["hub"].post("/users/alice/tokens", json={"note": "test"}).json()["token"]
    me = httpx.Client(
        base_url=f"{lab['hub_url']}/user/alice/api", headers={"Authorization": f"token {token}"}, timeout=30
    )
    notebook = {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": "# keep me"}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    r = me.put("/contents/analysis.ipynb", json={"type": "notebook", "content": notebook})
    assert r.status_code in (200, 201), r.text

    stop(lab, "", box)
    again = start(lab, "", "cpu")
    assert again["id"] != box["id"]  # a new sandbox, in a new run directory
    r = me.get("/contents/analysis.ipynb")
    assert r.status_code == 200, r.text
    assert r.json()["content"]["cells"][0]["source"] == "# keep me"
    names = {f["name"] for f in me.get("/contents").json()["content"]}
    assert "analysis.ipynb" in names and not names & {"pid", "stdout.log", "stderr.log"}
    page = open_lab(lab, "")
    expect(page.locator(".jp-DirListing-item", has_text="analysis.ipynb")).to_be_visible()
    stop(lab, "", again)


def test_named_servers_are_sandboxes_of_their_own(lab: dict[str, Any]) -> None:
    box = start(lab, "second", "cpu")
    assert box["name"] == "jupyter-alice-second"
    open_lab(lab, "second")
    stop(lab, "second", box)


def test_a_refusal_shows_corrals_sentence_on_the_hubs_page(lab: dict[str, Any]) -> None:
    held = start(lab, "one", "gpu1")  # nlp's whole guarantee (quota 1)
    page = lab["page"]
    page.goto(f"{lab['hub_url']}/hub/spawn/alice/two")
    page.select_option("select[name=profile]", "gpu1")
    page.get_by_role("button", name=re.compile("start", re.I)).click()
    expect(
        page.get_by_text(re.compile("team nlp holds 1 non-preemptible GPUs of local and this notebook needs 1"))
    ).to_be_visible()
    lab["shot"]("sandbox-02-refused")
    assert "SandboxRefused" not in page.content() and "corral_refused" not in page.content()
    progress = lab["hub"].get("/users/alice/servers/two/progress")
    assert "SandboxRefused" not in progress.text
    stop(lab, "one", held)


def test_the_idle_warning_shows_in_jupyterlab_before_the_cull(lab: dict[str, Any]) -> None:
    box = start(lab, "quiet", "short")
    page = open_lab(lab, "quiet")
    warning = page.locator(".jp-toast-message, .Toastify__toast", has_text="will be stopped in").first
    expect(warning).to_be_visible(timeout=40_000)
    text = warning.inner_text()
    assert re.search(
        r"stopped in (under a minute|\d+ minutes?), at \d\d:\d\d UTC: its GPUs idle for "
        r"(under a minute|\d+ minutes?) \(since \d\d:\d\d UTC\)\. Use them or save work\.",
        text,
    ), text
    lab["shot"]("sandbox-03-idle-warning")
    assert lab["corral"].get(f"/v1/jobs/{box['id']}").json()["state"] == "running"  # warned before the cull
    wait_for(lambda: lab["corral"].get(f"/v1/jobs/{box['id']}").json()["state"] == "cancelled", "the cull", timeout=90)
    assert lab["corral"].get(f"/v1/jobs/{box['id']}").json()["reason"]["rule"] == "idle"
