"""The Streamlit viewer in a real browser (headless Chromium) against the running stack."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.async_api import async_playwright

from integration.app.demo import send_study
from integration.auth.users import add_user
from tests import authorized
from tests.conftest import REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rgb(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.int16)


async def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


async def test_reviewer_sees_the_heatmap_and_approves_a_report(stack, tmp_path: Path) -> None:  # noqa: ANN001
    # the probability shown must be the API's, to two decimals
    api = f"http://127.0.0.1:{stack.settings.http_port}"
    await asyncio.to_thread(send_study, "127.0.0.1", stack.dicom.port, "MEDBRIDGE")
    async with authorized.AsyncClient(base_url=api) as client:
        deadline = time.monotonic() + 90
        while not (await client.get("/api/reports", params={"status": "preliminary"})).json():
            assert time.monotonic() < deadline, "no report to review"
            await asyncio.sleep(0.25)
        (report,) = (await client.get("/api/reports", params={"status": "preliminary"})).json()
        detail = (await client.get(f"/api/reports/{report['id']}")).json()
        heatmap = (await client.get(f"/api/reports/{report['id']}/image.png")).content
    assert detail["instances"] and heatmap.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", heatmap[16:24])  # the PNG's IHDR
    add_user(stack.store, "dr-viewer", "a reviewer's password", ["reviewer"])

    port = free_port()
    viewer = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "viewer" / "app.py"), "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env={**os.environ, "MEDBRIDGE_API_URL": api}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/_stcore/health")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}")
            await page.get_by_label("User name").fill("dr-viewer")
            await page.get_by_label("Password", exact=True).fill("a reviewer's password")
            await page.get_by_text("Log in").click()
            await page.get_by_text("Image with the AI heatmap").wait_for(timeout=60_000)
            await page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
            assert await page.get_by_text("synthetic_round_lesion").count() >= 1
            # one image, the API's heatmap, decoded by the browser at its own size (Streamlit re-encodes it as JPEG)
            (figure,) = await page.locator('[data-testid="stImage"]').all()
            assert "Image with the AI heatmap" in await figure.inner_text()
            img = figure.locator("img")
            shown_size = await img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
            assert shown_size == [True, width, height]
            served = await (await page.request.get(await img.evaluate("i => i.src"))).body()
            assert np.abs(rgb(served) - rgb(heatmap)).mean() < 4, "the viewer shows another picture than the API's"
            # a row per instance of the report in the probabilities table
            for instance in detail["instances"]:
                assert await page.get_by_text(f"…{instance['sop_instance_uid'][-12:]}", exact=True).count() == 1
            shown = f"{report['top_probability']:.2f}"
            assert await page.get_by_text(shown, exact=True).count() >= 1
            await page.get_by_text("Submit review").click()
            await page.get_by_text("Recorded: report is now final").wait_for(timeout=30_000)
            await browser.close()
    finally:
        viewer.terminate()
        viewer.wait(10)
    async with authorized.AsyncClient(base_url=api) as client:
        fhir = (await client.get(f"/fhir/DiagnosticReport/{report['id']}")).json()
        detail = (await client.get(f"/api/reports/{report['id']}")).json()
    assert fhir["status"] == "final"
    # the reviewer is the authenticated caller (the viewer's login), never a typed name
    assert detail["reviews"][0]["reviewer"] == "dr-viewer"
    assert fhir["resultsInterpreter"][0]["display"] == "dr-viewer"


async def test_the_viewer_asks_for_a_password_and_shows_the_worklist_after_login(tmp_path: Path) -> None:
    """The login alone, against the HTTP app without workers (cheap beside the whole stack above)."""
    from integration.db.store import Store
    from tests.conftest import serve_app, stack_settings

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    add_user(store, "dr-login", "the right password", ["reviewer"])
    port = free_port()
    with serve_app(stack_settings(tmp_path), store) as api_port:
        viewer = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "viewer" / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            env={**os.environ, "MEDBRIDGE_API_URL": f"http://127.0.0.1:{api_port}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            await wait_http(f"http://127.0.0.1:{port}/_stcore/health")
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{port}")
                await page.get_by_label("User name").fill("dr-login")
                await page.get_by_label("Password", exact=True).fill("a wrong password")
                await page.get_by_text("Log in").click()
                await page.get_by_text("Unknown user name or wrong password").wait_for(timeout=30_000)
                await page.get_by_label("Password", exact=True).fill("the right password")
                await page.get_by_text("Log in").click()
                await page.get_by_text("No preliminary reports").wait_for(timeout=30_000)
                assert await page.get_by_text("Logged in as").count() == 1
                await browser.close()
        finally:
            viewer.terminate()
            viewer.wait(10)
            store.stop()
