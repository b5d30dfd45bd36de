"""The Streamlit viewer in a real browser (headless Chromium) against the running stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from playwright.async_api import async_playwright

from integration.auth.users import add_user
from tests.conftest import REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


@contextlib.asynccontextmanager
async def running_viewer(api_url: str, **env: str) -> AsyncIterator[str]:
    """The Streamlit viewer against the API at ``api_url`` (``env``: more of its settings) on a free port;
    yields its URL once it answers, stops it after."""
    port = free_port()
    viewer = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "viewer" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env={**os.environ, "MEDBRIDGE_API_URL": api_url, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/_stcore/health")
        yield url
    finally:
        viewer.terminate()
        viewer.wait(10)


async def test_the_viewer_asks_for_a_password_and_shows_the_worklist_after_login(tmp_path: Path) -> None:
    """The login alone, against the HTTP app without workers (cheap beside the whole stack of
    tests/viewer/test_workstation.py, which drives the review itself)."""
    from integration.db.store import Store
    from tests.conftest import serve_app, stack_settings

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    add_user(store, "dr-login", "the right password", ["reviewer"])
    with serve_app(stack_settings(tmp_path), store) as api_port:
        try:
            async with running_viewer(f"http://127.0.0.1:{api_port}") as url, async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = await browser.new_page()
                await page.goto(url)
                await page.get_by_label("User name").fill("dr-login")
                await page.get_by_label("Password", exact=True).fill("a wrong password")
                await page.get_by_text("Log in").click()
                await page.get_by_text("Unknown user name or wrong password").wait_for(timeout=30_000)
                await page.get_by_label("Password", exact=True).fill("the right password")
                await page.get_by_text("Log in").click()
                await page.get_by_text("No study matches these filters").wait_for(timeout=30_000)
                assert await page.get_by_text("Logged in as").count() == 1
                await browser.close()
        finally:
            store.stop()
