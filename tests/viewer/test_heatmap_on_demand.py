"""In a real browser (headless Chromium) against the running stack (DICOM, the imaging worker, the report
writer, the broker): a reviewer asks for the heatmap of an image the worker rendered none for and sees it
appear; the worklist's status filter finds a superseded (cancelled) clinical draft."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from integration.app.runtime import Runtime
from integration.auth.users import add_user
from integration.reports.writer import write_report
from schemas.events import ClinicalInferenceCompleted
from tests import authorized
from tests.conftest import stack_settings
from tests.viewer.test_viewer import CHROMIUM, CHROMIUM_ARGS, running_viewer
from tests.viewer.test_workstation import PASSWORD, eventually, go_to, log_in, open_buttons, send_ct_study


@pytest.fixture
async def imaging_stack(tmp_path: Path, imaging_weights: Path) -> AsyncIterator[Runtime]:
    """The stack with the imaging worker (in this process: no model process to spawn) and the report writer,
    rendering no heatmap by itself (top 0): every heatmap is one a reviewer asked for."""
    settings = stack_settings(tmp_path, imaging_model=imaging_weights, workers="imaging,reports",
                              inference_processes=False, imaging_explain_top=0)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def settled(page: Page) -> None:
    """Wait until the page's script has run to its end (Streamlit's running icon gone): a click while it still
    runs can be lost."""
    await page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')", timeout=60_000)


def _superseded_draft(runtime: Runtime) -> None:
    """Two clinical drafts of one patient, as the report writer writes them: the first is cancelled."""
    for revision in (1, 2):
        write_report(runtime.store, ClinicalInferenceCompleted(
            source_event_id=f"record-{revision}", patient_ref="Patient/hd-superseded", revision=revision,
            model_name="tiny", impression=f"Impression of revision {revision}.", evidence=[]))


async def test_a_reviewer_asks_for_a_heatmap_sees_it_appear_and_finds_a_cancelled_draft(
        imaging_stack: Runtime) -> None:
    runtime = imaging_stack
    api = f"http://127.0.0.1:{runtime.settings.http_port}"
    await asyncio.to_thread(send_ct_study, runtime.dicom.port, "HD-1", 1)
    with authorized.Client(base_url=api, timeout=30) as client:
        def reported() -> bool:
            return client.get("/api/worklist", params={"kind": "imaging"}).json()["total"] == 1
        await eventually(reported, "the imaging report", timeout=120)
    await asyncio.to_thread(_superseded_draft, runtime)
    add_user(runtime.store, "dr-heat", PASSWORD, ["reviewer"])

    async with running_viewer(api) as url, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1400, "height": 2000})
        await log_in(page, url, "dr-heat")
        await page.locator('[data-testid="stSelectbox"]').filter(has_text="Kind").click()
        await page.get_by_role("option", name="imaging", exact=True).click()
        await expect(open_buttons(page)).to_have_count(1, timeout=30_000)
        await open_buttons(page).first.click()

        # no heatmap rendered: ask for one, and it appears over the image like a precomputed one
        await page.get_by_text("The model produced no heatmap for this image").wait_for(timeout=60_000)
        await page.get_by_text("status preliminary").first.wait_for(timeout=60_000)  # the sign-off, drawn last
        await settled(page)
        await page.get_by_role("button", name="Compute heatmap").click()
        await page.get_by_text("Heatmap overlay at 60%").wait_for(timeout=60_000)
        await expect(page.get_by_role("button", name="Compute heatmap")).to_have_count(0, timeout=30_000)

        # the superseded draft: not among the preliminary ones, found with the cancelled status
        await go_to(page, "Worklist")
        await page.locator('[data-testid="stSelectbox"]').filter(has_text="Kind").click()
        await page.get_by_role("option", name="clinical", exact=True).click()
        await expect(open_buttons(page)).to_have_count(1, timeout=30_000)
        await settled(page)
        await page.locator('[data-testid="stMultiSelect"]').filter(has_text="Status").click()
        await page.get_by_role("option", name="cancelled", exact=True).click()
        await page.keyboard.press("Escape")  # the open drop-down hides the page from the accessibility tree
        await expect(open_buttons(page)).to_have_count(2, timeout=30_000)
        await page.get_by_text("cancelled", exact=True).last.wait_for(timeout=30_000)
        await browser.close()

    # the heatmap is recorded against the result: every later view shows it without asking again (a thread:
    # the stack serves on this test's loop)
    def recorded() -> dict:
        with authorized.Client(base_url=api, timeout=30) as client:
            item = client.get("/api/worklist", params={"kind": "imaging"}).json()["items"][0]
            (instance,) = client.get(f"/api/reports/{item['report_id']}").json()["instances"]
            return instance
    instance = await asyncio.to_thread(recorded)
    assert instance["has_heatmap"] and instance["heatmap_layer_artifact_id"] and instance["explanation"] == "ready"
