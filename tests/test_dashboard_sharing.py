"""The dashboard's GPU map with GPU sharing: a shared GPU split by the shares its jobs hold (a real browser against
a live service whose local executor runs the shares as real processes), and MIG slices drawn per profile."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from scheduler.backends.base import GPUInfo, MigDevice
from scheduler.backends.sharing import FRACTION_ENV
from scheduler.service.api.auth import Role
from tests.test_dashboard import CHROMIUM, STABLE_SHOTS, _browser_missing, live_service, login
from tests.test_sharing_service import h100s, service

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None  # type: ignore[assignment]


def test_gpu_map_draws_mig_slices(tmp_path: Path) -> None:
    mig = tuple(MigDevice(f"MIG-{i}", "1g.10gb") for i in range(3))
    svc = service(tmp_path, [*h100s(8), GPUInfo(8, "NVIDIA A100-SXM4-80GB", 81920, "GPU-8", mig_mode=True, mig=mig)])
    r = svc.admin.post("/v1/jobs", json={"name": "tiny-eval", "queue": "nlp", "mig": "1g.10gb", "command": "x"})
    assert r.status_code == 201, r.text
    svc.tick()
    page = login(svc, "root", Role.PLATFORM_ADMIN).get("/ui/pools")
    assert page.status_code == 200
    html = page.text
    assert 'aria-label="MIG 1g.10gb slices of node localhost"' in html and "1 of 3 held" in html
    assert html.count('class="slice free"') == 2 and "tiny-eval</a>" in html


@pytest.mark.integration
def test_browser_gpu_map_splits_a_shared_gpu(tmp_path: Path) -> None:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CORRAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CORRAL_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with live_service(tmp_path) as (url, token):
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        show = f'echo "gpu=$CUDA_VISIBLE_DEVICES share=${FRACTION_ENV}"; sleep 120'
        ids = {
            name: api.post("/v1/jobs", json={"name": name, "queue": "nlp", "gpus": f, "command": show}).json()["id"]
            for name, f in (("half-a", 0.5), ("quarter-b", 0.25))
        }
        end = time.monotonic() + 60
        while any(api.get(f"/v1/jobs/{i}").json()["state"] != "running" for i in ids.values()):
            assert time.monotonic() < end, "the shares did not start"
            time.sleep(0.3)
        placements = {n: api.get(f"/v1/jobs/{i}").json()["attempts"][-1]["placement"] for n, i in ids.items()}
        assert placements["half-a"] == placements["quarter-b"], placements  # the engine packs shares on one GPU
        gpu = placements["half-a"][0][1][0]
        # What each process really got: the same GPU, its own share.
        for name, f in (("half-a", 0.5), ("quarter-b", 0.25)):
            while "gpu=" not in (log := api.get(f"/v1/jobs/{ids[name]}/logs").text):
                assert time.monotonic() < end, log
                time.sleep(0.3)
            assert f"gpu={gpu} share={f:g}" in log, log
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(20_000)
                page.goto(f"{url}/ui/login")
                page.get_by_label("API token").fill(token)
                page.get_by_role("button", name="Log in").click()
                page.goto(f"{url}/ui/pools")
                cell = page.locator("li.gpu.shared")
                expect(cell).to_have_count(1)
                expect(cell).to_contain_text(f"GPU {gpu}")
                expect(cell).to_contain_text("0.25 free")
                half, quarter, free = (
                    cell.locator(f".share{sel}") for sel in (":has-text('half-a')", ":has-text('quarter-b')", ".free")
                )
                widths = [b["width"] for b in (half.bounding_box(), quarter.bounding_box(), free.bounding_box()) if b]
                assert len(widths) == 3 and widths[0] == pytest.approx(2 * widths[1], rel=0.15), widths
                assert widths[1] == pytest.approx(widths[2], rel=0.15), widths  # a quarter held, a quarter free
                shots = tmp_path / "screenshots"
                shots.mkdir()
                cell.screenshot(path=str(shots / "gpu-map-shared.png"))
            finally:
                browser.close()
        for i in ids.values():
            api.delete(f"/v1/jobs/{i}")
    STABLE_SHOTS.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        (STABLE_SHOTS / shot.name).write_bytes(shot.read_bytes())
