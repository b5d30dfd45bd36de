"""The reviewer's workstation in a real browser (headless Chromium) against the running stack (DICOM,
inference, report writer, delivery to an EHR stand-in: Medplum's FHIR router in Node).

A reviewer logs in, filters the worklist, opens a study, scrolls it, changes the window, fades and hides
the heatmap, approves with the keyboard only, rejects (refused without a reason, accepted with one) and
amends; a second reviewer sees the first one's claim and their stale decision is refused. Then the API,
the EHR and the quality page show what was decided. Screenshots of each step are kept in the test's
temporary folder (and copied to docs/screenshots/ with MEDBRIDGE_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.async_api import Locator, Page, async_playwright, expect
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from integration.app.runtime import Runtime
from integration.auth.users import add_user
from tests import authorized
from tests.conftest import REPO, stack_settings
from tests.integration.delivery.ehr.conftest import UpstreamFhir, upstream_fhir  # noqa: F401 - a fixture
from tests.viewer.test_viewer import CHROMIUM, CHROMIUM_ARGS, running_viewer

PASSWORD = "a reviewer's password"
SCREENSHOTS = REPO / "docs" / "screenshots"


def send_ct_study(port: int, patient_id: str, images: int) -> str:
    """C-STORE a CT study of ``images`` images (CT_small, each with a bright disc of its own size, so the
    model scores them differently) for ``patient_id``; returns its Study Instance UID."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, template.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        for n in range(images):
            ds = dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID, ds.InstanceNumber = patient_id, n + 1
            pixels = ds.pixel_array.copy()
            yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
            pixels[(yy - 64) ** 2 + (xx - 64) ** 2 < (4 + 5 * n) ** 2] = pixels.max()
            ds.PixelData = pixels.tobytes()
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    return study


@pytest.fixture
async def workstation_stack(tmp_path: Path, imaging_weights: Path, tiny_llm: Path, seeded_chroma: Path,
                            upstream_fhir: Callable[..., UpstreamFhir]) -> AsyncIterator[tuple[Runtime, UpstreamFhir]]:  # noqa: F811
    """The whole stack (as the ``stack`` fixture) writing reports back to the EHR stand-in."""
    up = upstream_fhir()
    shutil.copytree(seeded_chroma, tmp_path / "var" / "chroma")
    settings = stack_settings(tmp_path, imaging_model=imaging_weights, llm_model=tiny_llm, upstream_fhir_url=up.base,
                              upstream_timeout_seconds=5.0, upstream_backoff_base_seconds=0.2,
                              upstream_backoff_max_seconds=1.0, upstream_poll_seconds=0.2)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        yield runtime, up
    finally:
        await runtime.stop()


class Shots:
    """Numbered screenshots of each step."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.n = folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    async def take(self, page: Page, name: str) -> None:
        self.n += 1
        await page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"), full_page=True)


async def log_in(page: Page, url: str, user: str) -> None:
    await page.goto(url)
    await page.get_by_label("User name").fill(user)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_text("Log in").click()
    await page.get_by_text("Worklist", exact=True).first.wait_for(timeout=60_000)


async def go_to(page: Page, name: str) -> None:
    await page.locator('[data-testid="stSidebar"]').get_by_text(name, exact=True).click()


def open_buttons(page: Page) -> Locator:
    """The worklist's Open buttons (not the drop-downs' open arrows)."""
    return page.locator('[data-testid="stButton"]').get_by_role("button", name="Open", exact=True)


async def open_first(page: Page) -> None:
    await open_buttons(page).first.click()
    await page.get_by_text("Sign-off").wait_for(timeout=60_000)


async def outcome(page: Page, text: str) -> None:
    await page.get_by_text(text).first.wait_for(timeout=30_000)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


async def test_a_reviewer_works_through_the_worklist_and_a_second_one_sees_the_claim(
        workstation_stack: tuple[Runtime, UpstreamFhir], tmp_path: Path) -> None:
    runtime, upstream = workstation_stack
    api = f"http://127.0.0.1:{runtime.settings.http_port}"
    port = runtime.dicom.port
    studies = [await asyncio.to_thread(send_ct_study, port, "WS-SCROLL", 4)]
    studies += [await asyncio.to_thread(send_ct_study, port, f"WS-{n}", 1) for n in range(3)]
    with authorized.Client(base_url=api, timeout=30) as client:
        def all_reported() -> bool:
            return client.get("/api/worklist", params={"kind": "imaging"}).json()["total"] == len(studies)
        await eventually(all_reported, "four reports", timeout=120)
    for user in ("dr-ada", "dr-bob"):
        add_user(runtime.store, user, PASSWORD, ["reviewer"])

    shots = Shots(tmp_path / "screenshots")
    full_viewer = "http://ohif.example/viewer?StudyInstanceUIDs={study}"
    try:
        async with running_viewer(api, MEDBRIDGE_FULL_VIEWER_URL=full_viewer) as url, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ada = await browser.new_page(viewport={"width": 1400, "height": 2000})
            await log_in(ada, url, "dr-ada")
            await open_buttons(ada).first.wait_for(timeout=30_000)
            await shots.take(ada, "worklist")
            # the imaging studies (the stack may also write clinical reports for these patients meanwhile)
            await ada.locator('[data-testid="stSelectbox"]').filter(has_text="Kind").click()
            await ada.get_by_role("option", name="imaging", exact=True).click()
            await expect(open_buttons(ada)).to_have_count(4, timeout=30_000)

            # filter: the patient of the four-image study
            await ada.get_by_label("Patient identifier").fill("WS-SCROLL")
            await ada.get_by_label("Patient identifier").press("Enter")
            await expect(open_buttons(ada)).to_have_count(1, timeout=30_000)
            await shots.take(ada, "worklist-filtered")

            # open it: the highest-scoring image first, with the heatmap beside the original
            await open_first(ada)
            await ada.get_by_text("Heatmap overlay at 60%").wait_for(timeout=60_000)
            assert await ada.get_by_text("in review by you").count() + await ada.get_by_text("You hold").count() >= 1
            first = await ada.get_by_text("Original, image").first.inner_text()
            assert "of 4" in first
            await shots.take(ada, "review-heatmap")

            # scroll with the keys (K back, J on), then pick the lung window
            await ada.keyboard.press("k" if "image 4 of" in first else "j")
            await ada.wait_for_function(
                "t => !document.body.innerText.includes(t)", arg=first.split(",")[1].strip(), timeout=30_000)
            await shots.take(ada, "review-scrolled")
            original = ada.locator('[data-testid="stImage"]').filter(has_text="Original, image").locator("img")
            before = await original.evaluate("i => i.src")
            await ada.get_by_text("Lung", exact=True).click()
            await ada.wait_for_function("s => ![...document.images].some(i => i.src === s)", arg=before,
                                        timeout=30_000)
            await shots.take(ada, "review-lung-window")

            # fade the heatmap (opacity slider by its keys) and hide it
            opacity = ada.locator('[data-testid="stSlider"]').filter(has_text="Heatmap opacity").get_by_role("slider")
            await opacity.focus()
            for _ in range(3):
                await opacity.press("ArrowLeft")
            await ada.get_by_text("Heatmap overlay at 45%").wait_for(timeout=30_000)
            await shots.take(ada, "review-heatmap-faded")
            await ada.get_by_text("Heatmap", exact=True).click()
            await ada.get_by_text("Heatmap hidden").wait_for(timeout=30_000)
            await shots.take(ada, "review-heatmap-hidden")

            # approve with the keyboard alone
            # (focus off the toggle first: Streamlit ignores shortcuts while a form control has the focus)
            await ada.evaluate("document.activeElement && document.activeElement.blur()")
            await ada.keyboard.press("a")
            await outcome(ada, "Recorded: report is now final")
            await shots.take(ada, "approved-by-keyboard")

            # the next study: reject without a reason (refused), then with one (accepted)
            await go_to(ada, "Worklist")
            await ada.get_by_label("Patient identifier").fill("")
            await ada.get_by_label("Patient identifier").press("Enter")
            await expect(open_buttons(ada)).to_have_count(3, timeout=30_000)
            await open_first(ada)
            await ada.get_by_role("button", name="Reject").click()
            await outcome(ada, "Refused:")
            await shots.take(ada, "reject-without-reason-refused")
            await ada.locator('[data-testid="stSelectbox"]').filter(has_text="Rejection reason").click()
            await ada.get_by_role("option", name="Missed finding").click()
            await ada.get_by_role("button", name="Reject").click()
            await outcome(ada, "Recorded: report is now entered-in-error")
            await shots.take(ada, "rejected-with-reason")

            # the next: amend, the change shown before it is sent
            await go_to(ada, "Worklist")
            await expect(open_buttons(ada)).to_have_count(2, timeout=30_000)
            await open_first(ada)
            await ada.get_by_text("Amend the conclusion").click()
            await ada.get_by_label("Amended conclusion").fill("No lesion on review; calcification.")
            await ada.get_by_label("Amended conclusion").press("Control+Enter")
            await ada.get_by_text("The change you are about to sign").wait_for(timeout=30_000)
            await shots.take(ada, "amend-diff")
            await ada.get_by_role("button", name="Submit amendment").click()
            await outcome(ada, "Recorded: report is now amended")

            # two reviewers on the last study: Ada claims it, Bob sees the claim; his stale decision is refused
            await go_to(ada, "Worklist")
            await expect(open_buttons(ada)).to_have_count(1, timeout=30_000)
            await open_first(ada)
            bob = await browser.new_page(viewport={"width": 1400, "height": 2000})
            await log_in(bob, url, "dr-bob")
            await bob.get_by_text("in review by dr-ada").wait_for(timeout=30_000)
            await open_first(bob)
            await bob.get_by_text("In review by someone else").wait_for(timeout=30_000)
            await shots.take(bob, "second-reviewer-sees-claim")
            await ada.get_by_role("button", name="Approve").click()
            await outcome(ada, "Recorded: report is now final")
            await bob.get_by_role("button", name="Approve").click()
            await outcome(bob, "someone reviewed this report meanwhile")
            await shots.take(bob, "stale-decision-refused")

            # the quality page counts the decisions
            await go_to(ada, "Quality")
            await ada.get_by_text("Download feedback (JSON Lines)").wait_for(timeout=30_000)
            decisions = ada.locator('[data-testid="stMetric"]').filter(has_text="Decisions")
            assert "4" in await decisions.inner_text()
            await shots.take(ada, "quality")
            await browser.close()
    finally:
        if os.environ.get("MEDBRIDGE_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            for shot in (tmp_path / "screenshots").glob("*.png"):
                shutil.copy(shot, SCREENSHOTS / shot.name)

    # what the API, the EHR and the quality metrics hold (a thread: the stack serves on this test's loop)
    def decided() -> dict[str, str]:
        with authorized.Client(base_url=api, timeout=30) as client:
            page = client.get("/api/worklist", params={"status": "final,amended,entered-in-error",
                                                       "kind": "imaging"}).json()
            by_status = {i["status"]: i for i in page["items"]}
            assert page["counts"] == {"final": 2, "amended": 1, "entered-in-error": 1}
            rejected = client.get(f"/api/reports/{by_status['entered-in-error']['report_id']}").json()
            assert rejected["reviews"][0]["reason"] == "missed-finding"
            amended = client.get(f"/api/reports/{by_status['amended']['report_id']}").json()
            assert amended["conclusion"] == "No lesion on review; calcification."
            assert {r["reviewer"] for i in page["items"]
                    for r in client.get(f"/api/reports/{i['report_id']}").json()["reviews"]} == {"dr-ada"}
            quality = client.get("/api/quality").json()
            assert quality["overall"]["decisions"] == 4 and quality["rejection_reasons"] == {"missed-finding": 1}
            return {i["report_id"]: i["status"] for i in page["items"]}

    ids = await asyncio.to_thread(decided)

    def upstream_has_them() -> bool:
        found = {r["status"] for r in upstream.search("DiagnosticReport?_count=50")}
        return {"final", "amended", "entered-in-error"} <= found
    await eventually(upstream_has_them, "the decisions in the EHR")
    assert len(ids) == 4
