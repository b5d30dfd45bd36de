"""DICOM export of AI results (SR + Secondary Capture) to real peers: Orthanc and a pynetdicom SCP."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt

from integration.app.settings import DicomPeer
from integration.db.artifacts import ArtifactNotFoundError, artifact_id, put_artifact
from integration.db.store import Store
from integration.db.tables import AiResult, DicomInstance
from integration.delivery import queue
from integration.delivery.pacs.export import (
    ExportSendError,
    ReviewOutcome,
    build_export,
    export_uid,
    send_datasets,
)
from integration.delivery.pacs.sender import DicomExportSender, ExportPolicy, export_peers
from integration.phi import uid_hash
from tests import authorized
from tests.conftest import free_port

CT_SMALL = get_testdata_file("CT_small.dcm")


def overlay_png(source: str, size: tuple[int, int] = (200, 256)) -> bytes:
    """A real overlay-like PNG: the source image's pixels in grey with a red square, at (h, w) size."""
    pixels = pydicom.dcmread(source).pixel_array.astype(np.float32)
    grey = ((pixels - pixels.min()) / max(1.0, float(np.ptp(pixels))) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[40:60, 40:60] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgb).resize((size[1], size[0])).save(buffer, format="PNG")
    return buffer.getvalue()


def artifacts(*pngs: bytes) -> Callable[[str], bytes]:
    """An artifact reader over these bytes, refusing other ids as the store's does (for the builder alone)."""
    held = {artifact_id(png): png for png in pngs}

    def read(aid: str) -> bytes:
        if aid not in held:
            raise ArtifactNotFoundError(aid)
        return held[aid]

    return read


def ai_result(report_id: str, source: str, png: bytes | None, probability: float = 0.83) -> AiResult:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return AiResult(
        report_id=report_id, kind="imaging", source_event_id="e-1", study_instance_uid=ds.StudyInstanceUID,
        details={
            "model_name": "demo-lesion-densenet", "model_version": "0.1.0",
            "instances": [{"sop_instance_uid": ds.SOPInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
                           "probabilities": {"synthetic_round_lesion": probability},
                           "heatmap_artifact_id": artifact_id(png) if png else None}],
            "skipped_instances": 0,
        },
    )


def source_instance(source: str) -> DicomInstance:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return DicomInstance(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=ds.StudyInstanceUID,
                         series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
                         transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality=ds.Modality,
                         patient_id=None, is_image=True, path=source, size=Path(source).stat().st_size)


def finding_values(sr: pydicom.Dataset) -> tuple[list[str], list[float], list[str]]:
    """(finding meanings, probabilities, source SOP Instance UIDs) read back from an SR."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    findings = hd.sr.utils.find_content_items(doc, name=codes.DCM.Finding, recursive=True)
    numbers = hd.sr.utils.find_content_items(doc, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)
    images = hd.sr.utils.find_content_items(doc, name=codes.DCM.SourceOfMeasurement, recursive=True)
    return (
        [f.ConceptCodeSequence[0].CodeMeaning for f in findings],
        [float(n.MeasuredValueSequence[0].NumericValue) for n in numbers],
        [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images],
    )


# building ---------------------------------------------------------------------------------------
def test_sr_and_sc_join_the_source_study_in_new_series_with_uids_fixed_by_the_report(tmp_path: Path) -> None:
    src = pydicom.dcmread(CT_SMALL)
    png = overlay_png(CT_SMALL, size=(200, 256))
    objects = build_export(ai_result("report-1", CT_SMALL, png), [source_instance(CT_SMALL)], artifacts(png))
    sr, sc = objects.sr, objects.sc
    assert sc is not None
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert sr.SOPClassUID == ComprehensiveSRStorage and sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    names, probabilities, sources = finding_values(sr)
    assert names == ["synthetic round lesion"]
    assert probabilities == [pytest.approx(0.83)]
    assert sources == [src.SOPInstanceUID]
    texts = [i.TextValue for i in hd.sr.utils.find_content_items(hd.sr.ComprehensiveSR.from_dataset(sr),
                                                                  value_type=hd.sr.ValueTypeValues.TEXT)]
    assert "demo-lesion-densenet" in texts and "0.1.0" in texts
    assert any("AI-generated, preliminary" in t for t in texts)
    # the SC holds the overlay's RGB pixels at its size
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (200, 256, 3, "RGB")
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    # a rebuild (a retry) yields the same objects, a different report other ones
    again = build_export(ai_result("report-1", CT_SMALL, png), [source_instance(CT_SMALL)], artifacts(png))
    assert (again.sr.SOPInstanceUID, again.sc.SOPInstanceUID) == (sr.SOPInstanceUID, sc.SOPInstanceUID)
    assert sr.SOPInstanceUID == export_uid("report-1", "sr-instance")
    other = build_export(ai_result("report-2", CT_SMALL, png), [source_instance(CT_SMALL)], artifacts(png))
    assert other.sr.SOPInstanceUID != sr.SOPInstanceUID and other.sc.SOPInstanceUID != sc.SOPInstanceUID


def review(number: int, action: str, **extra: Any) -> ReviewOutcome:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return ReviewOutcome(number=number, action=action, reviewer="Dr^Jane Roe", at=at, **extra)  # type: ignore[arg-type]


def text_items(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """Every TEXT content item of an SR, by concept name."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    found: dict[str, list[str]] = {}
    for item in hd.sr.utils.find_content_items(doc, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True):
        found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return found


def test_a_review_makes_a_verified_version_that_says_the_outcome_and_names_its_predecessor(tmp_path: Path) -> None:
    png = overlay_png(CT_SMALL)
    ai, sources = ai_result("report-1", CT_SMALL, png), [source_instance(CT_SMALL)]
    preliminary = build_export(ai, sources, artifacts(png))
    first = build_export(ai, sources, artifacts(png),
                         review(1, "amended", conclusion="No lesion; vessel.", comment="Looked again"))
    second = build_export(ai, sources, artifacts(png), review(2, "entered-in-error", comment="Wrong patient"))
    sr = first.sr
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    observer = sr.VerifyingObserverSequence[0]
    # one name component: a '^' typed by the reviewer would have split the name into parts
    name = observer.VerifyingObserverName
    assert (name.family_name, name.given_name) == ("Dr Jane Roe", "")
    assert observer.VerificationDateTime == "20260102030405"  # when the reviewer decided, not when built
    texts = text_items(sr)
    assert texts["Clinician review outcome"] == ["amended"]
    assert texts["Amended conclusion"] == ["No lesion; vessel."]
    assert texts["Reviewer comment"] == ["Looked again"]
    assert not any("preliminary" in t for t in texts["Comment"])
    assert finding_values(sr)[1] == [pytest.approx(0.83)]  # the AI's findings stay, now under the decision
    # each version is a new instance (and series) named by the report and the review's number ...
    uids = {o.sr.SOPInstanceUID for o in (preliminary, first, second)} | {
        o.sc.SOPInstanceUID for o in (preliminary, first, second) if o.sc is not None}
    assert len(uids) == 6
    assert sr.SOPInstanceUID == export_uid("report-1", "sr-instance-review-1")
    rebuilt = build_export(ai, sources, artifacts(png), review(1, "amended", conclusion="x"))
    assert rebuilt.sr.SOPInstanceUID == sr.SOPInstanceUID
    # ... that names the version before it
    for version, before in ((first, preliminary), (second, first)):
        predecessor = version.sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.SeriesInstanceUID == before.sr.SeriesInstanceUID
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == before.sr.SOPInstanceUID
    rejected = text_items(second.sr)
    assert rejected["Clinician review outcome"] == ["entered-in-error"]
    assert any("entered in error and must not be used" in t for t in rejected["Comment"])
    assert "Amended conclusion" not in rejected
    assert second.sc is not None and "entered in error" in second.sc.ImageComments
    assert second.sc.SeriesDescription == "AI heatmap overlay (entered in error)"


def test_a_heatmap_the_artifact_store_lacks_leaves_the_sc_out_and_the_sr_whole() -> None:
    ai = ai_result("report-1", CT_SMALL, overlay_png(CT_SMALL))
    objects = build_export(ai, [source_instance(CT_SMALL)], artifacts())
    assert objects.sc is None and [ds.SOPClassUID for ds in objects.datasets] == [ComprehensiveSRStorage]
    names, probabilities, _ = finding_values(objects.sr)
    assert names == ["synthetic round lesion"] and probabilities == [pytest.approx(0.83)]


# sending ----------------------------------------------------------------------------------------
def test_orthanc_stores_what_the_scu_sends_once_however_often_it_is_sent(orthanc: Any, tmp_path: Path) -> None:
    png = overlay_png(CT_SMALL)
    objects = build_export(ai_result("report-1", CT_SMALL, png), [source_instance(CT_SMALL)], artifacts(png))
    for _ in range(2):  # a retry after a lost answer re-sends the same SOP instances
        send_datasets(objects.datasets, host="127.0.0.1", port=orthanc.dicom_port, called_ae="ORTHANC",
                      calling_ae="MEDBRIDGE")
    series = orthanc.series_of_study(objects.sr.StudyInstanceUID)
    by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
    assert set(by_modality) == {"SR", "OT"}
    assert all(len(s["Instances"]) == 1 for s in series)


@pytest.fixture
def refusing_scp() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP that stores SCs with a warning (0xB000) and refuses SRs (0xA700)."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        sop_class = event.request.AffectedSOPClassUID
        received.append(str(sop_class))
        return 0xA700 if sop_class == ComprehensiveSRStorage else 0xB000

    ae = AE(ae_title="REFUSER")
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, received
    server.shutdown()


def test_failure_status_from_the_peer_fails_the_send_and_a_warning_does_not(
    refusing_scp: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, received = refusing_scp
    png = overlay_png(CT_SMALL)
    objects = build_export(ai_result("report-1", CT_SMALL, png), [source_instance(CT_SMALL)], artifacts(png))
    with pytest.raises(ExportSendError, match="REFUSER refused a Comprehensive SR Storage with status 0xA700"):
        send_datasets(objects.datasets, host="127.0.0.1", port=port, called_ae="REFUSER", calling_ae="MEDBRIDGE")
    # the SC went first and its warning counted as stored; the SR's failure stopped the send
    assert received == [SecondaryCaptureImageStorage, ComprehensiveSRStorage]


def test_unreachable_peer_fails_with_what_to_check() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    with pytest.raises(ExportSendError, match="could not be reached; check the peer is running"):
        send_datasets([ds], host="127.0.0.1", port=free_port(), called_ae="PACS", calling_ae="MEDBRIDGE",
                      timeout=5)


def test_an_export_peer_without_a_port_is_refused_with_what_to_set() -> None:
    peers = [DicomPeer(ae_title="MODALITY", host="10.0.0.9"), DicomPeer(ae_title="PACS", host="10.0.0.5", export=True)]
    with pytest.raises(ValueError, match="peer PACS has export=true but no port; set the port"):
        export_peers(peers)
    assert export_peers(peers[:1]) == []  # no export peer: the worker is not started


# the sender -------------------------------------------------------------------------------------
def _add_ai(store: Store, ai: AiResult) -> None:
    with store.session() as s:
        s.add(ai)


async def test_sender_counts_a_refusal_as_a_failed_attempt_and_names_the_status(
    store: Store, refusing_scp: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, received = refusing_scp
    png = overlay_png(CT_SMALL)
    _add_ai(store, ai_result("img-1", CT_SMALL, png))
    with store.session() as s:
        s.add(source_instance(CT_SMALL))
        put_artifact(s, png, "image/png")  # the sender reads the heatmap from the store
        queue.enqueue(s, "pacs", "REFUSER", "img-1", "issued")
    sender = DicomExportSender(
        store, [DicomPeer(ae_title="REFUSER", host="127.0.0.1", port=port, export=True)],
        ExportPolicy(calling_ae="MEDBRIDGE", max_attempts=2, backoff_seconds=0.01, timeout_seconds=10),
    )  # not started: the test drives its rounds
    assert await sender.send_due() == 0
    (row,) = queue.list_jobs(store, "pacs")
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error == "REFUSER refused a Comprehensive SR Storage with status 0xA700"

    async def second_attempt() -> list[Any]:
        await sender.send_due()
        return queue.list_jobs(store, "pacs", "dead")

    await poll(second_attempt, timeout=30, what="the second attempt")
    (row,) = queue.list_jobs(store, "pacs")
    assert (row.state, row.attempts) == ("dead", 2)
    assert received.count(ComprehensiveSRStorage) == 2
    assert received.count(SecondaryCaptureImageStorage) == 2  # each attempt built the SC from the stored PNG


async def test_a_job_whose_image_is_gone_dies_at_once_with_the_reason(store: Store, tmp_path: Path) -> None:
    gone = tmp_path / "gone.dcm"
    gone.write_bytes(Path(CT_SMALL).read_bytes())
    _add_ai(store, ai_result("img-1", str(gone), None))
    with store.session() as s:
        s.add(source_instance(str(gone)))
        queue.enqueue(s, "pacs", "PACS", "img-1", "issued")
    gone.unlink()
    sender = DicomExportSender(store, [DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port(), export=True)],
                               ExportPolicy(calling_ae="MEDBRIDGE", max_attempts=5))
    await sender.send_due()
    (row,) = queue.list_jobs(store, "pacs")
    assert (row.state, row.attempts) == ("dead", 1)  # no retry brings the image back
    assert "none of the analysed images is stored any more" in (row.last_error or "")


async def test_without_an_export_peer_the_exporter_does_not_start(export_stack: Any) -> None:
    runtime = await export_stack([DicomPeer(ae_title="MODALITY", host="127.0.0.1", port=104)],
                                 workers="reports,dicom-export")
    assert "dicom_exporter" not in runtime.workers
    async with authorized.AsyncClient(base_url=base_url(runtime), timeout=30) as client:
        assert (await client.get("/api/dicom-exports")).json() == []
        health = (await client.get("/health")).json()
        assert health["details"]["dicom_exports"] == {"pending": 0, "sent": 0, "dead": 0}


# the whole runtime ------------------------------------------------------------------------------
def base_url(runtime: Any) -> str:
    return f"http://127.0.0.1:{runtime.settings.http_port}"


async def poll(check: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check() if asyncio.iscoroutinefunction(check) else await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not reached after {timeout}s")


async def storescu(port: int, *files: str) -> None:
    proc = await asyncio.to_thread(subprocess.run, ["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(port), *files],
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


async def test_ai_result_reaches_orthanc_as_sr_and_sc_in_the_source_study(
    export_stack: Any, orthanc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runtime = await export_stack([DicomPeer(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port,
                                            export=True)])
    src = pydicom.dcmread(CT_SMALL)
    await storescu(runtime.dicom.port, CT_SMALL)

    def exported_series() -> list[dict[str, Any]]:
        series = orthanc.series_of_study(src.StudyInstanceUID)
        return series if {s["MainDicomTags"]["Modality"] for s in series} == {"SR", "OT"} else []

    series = await poll(exported_series, what="SR and SC series in Orthanc")
    assert all(s["MainDicomTags"]["SeriesInstanceUID"] != src.SeriesInstanceUID for s in series)
    async with authorized.AsyncClient(base_url=base_url(runtime), timeout=30) as client:
        exports = (await client.get("/api/dicom-exports", params={"state": "sent"})).json()
        assert [(e["destination_ae"], e["attempts"]) for e in exports] == [("ORTHANC", 1)]
        report = (await client.get(f"/api/reports/{exports[0]['report_id']}")).json()
        overlay = Image.open(io.BytesIO((await client.get(f"/api/reports/{report['id']}/image.png")).content))
        health = (await client.get("/health")).json()
        assert health["checks"]["dicom_exporter"] is True
        assert health["details"]["dicom_exports"] == {"pending": 0, "sent": 1, "dead": 0}
    with orthanc.rest() as rest:
        files = {}
        for s in series:
            instance_id = s["Instances"][0]
            files[s["MainDicomTags"]["Modality"]] = pydicom.dcmread(
                io.BytesIO(rest.get(f"/instances/{instance_id}/file").content))
    sr, sc = files["SR"], files["OT"]
    names, probabilities, sources = finding_values(sr)
    assert names == ["synthetic round lesion"]
    assert probabilities == [pytest.approx(report["instances"][0]["probabilities"]["synthetic_round_lesion"])]
    assert sources == [src.SOPInstanceUID]
    assert sr.SOPInstanceUID == export_uid(report["id"], "sr-instance")
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (overlay.height, overlay.width, 3)
    assert sc.PatientID == src.PatientID  # the patient module travels in the DICOM objects ...
    text = "\n".join(r.getMessage() for r in caplog.records)
    export_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("integration.delivery.pacs"))
    assert "exported to ORTHANC" in export_log
    for phi in (str(src.PatientName), str(src.PatientID)):
        assert phi not in text, f"{phi!r} leaked into the logs"  # ... never into the logs
    # the export names studies by hashed UID only (aiokafka's own debug lines carry event keys)
    assert src.StudyInstanceUID not in export_log and uid_hash(src.StudyInstanceUID) in export_log


async def test_outage_ends_dead_and_a_replay_delivers_exactly_once(export_stack: Any, orthanc_factory: Any) -> None:
    orthanc = orthanc_factory()  # not started yet: its DICOM port is closed
    runtime = await export_stack(
        [DicomPeer(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, export=True)],
        dicom_export_max_attempts=3, dicom_export_retry_for_seconds=0,
    )
    src = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    await storescu(runtime.dicom.port, CT_SMALL)
    async with authorized.AsyncClient(base_url=base_url(runtime), timeout=30) as client:
        async def dead() -> list[dict[str, Any]]:
            return (await client.get("/api/dicom-exports", params={"state": "dead"})).json()

        rows = await poll(dead, what="a dead export")
        assert len(rows) == 1
        row = rows[0]
        assert row["destination_ae"] == "ORTHANC" and row["attempts"] == 3
        assert "could not be reached" in row["last_error"]
        assert (await client.get("/health")).json()["details"]["dicom_exports"]["dead"] == 1
        assert (await client.get("/api/dicom-exports", params={"state": "nonsense"})).status_code == 422
        assert (await client.post("/api/dicom-exports/999999/replay")).status_code == 404

        await asyncio.to_thread(orthanc.start)
        replay = await client.post(f"/api/dicom-exports/{row['id']}/replay")
        assert replay.status_code == 200, replay.text
        assert replay.json()["state"] == "pending" and replay.json()["attempts"] == 0

        async def sent() -> list[dict[str, Any]]:
            return (await client.get("/api/dicom-exports", params={"state": "sent"})).json()

        done = await poll(sent, what="the replayed export sent")
        assert done[0]["id"] == row["id"] and done[0]["attempts"] == 1
        again = await client.post(f"/api/dicom-exports/{row['id']}/replay")
        assert again.status_code == 409  # only dead exports are replayed: nothing is sent twice
    series = orthanc.series_of_study(src.StudyInstanceUID)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["OT", "SR"]
    assert all(len(s["Instances"]) == 1 for s in series)
    with orthanc.rest() as rest:
        sr_id = next(s for s in series if s["MainDicomTags"]["Modality"] == "SR")["Instances"][0]
        tags = rest.get(f"/instances/{sr_id}/simplified-tags").json()
    assert tags["SOPInstanceUID"] == export_uid(row["report_id"], "sr-instance")
