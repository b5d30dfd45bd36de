"""Every file of pydicom's own test set (with pydicom-data) that pydicom can read, sent to MedBridge.

Each one is stored or refused with a DIMSE status that says why, the listener stays up throughout,
and every stored image gets exactly one inference outcome (a finding, or "could not be decoded").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import select

from integration.db.tables import DicomInstance, OutboxEntry

STORED, DUPLICATE = 0x0000, 0xB000
REFUSALS = {0xC210, 0xC211}  # cannot understand / identifiers missing or disagreeing
STORAGE_CLASSES = {cx.abstract_syntax for cx in AllStoragePresentationContexts}


def readable_corpus() -> tuple[dict[str, list[Path]], list[Path]]:
    """Sendable files by study (one association each), and readable files of unknown SOP classes."""
    by_study: dict[str, list[Path]] = defaultdict(list)
    unknown_class: list[Path] = []
    for name in sorted(get_testdata_files("*")):
        path = Path(name)
        try:
            ds = dcmread(path, stop_before_pixels=True)
            sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - "pydicom can read it, as a Part 10 file with a SOP class" is the filter
            continue
        if sop_class not in STORAGE_CLASSES:
            unknown_class.append(path)
        elif syntax:
            by_study[str(ds.get("StudyInstanceUID", ""))].append(path)
    return by_study, unknown_class


def why_refused(path: Path) -> str | None:
    """Why a file must be refused, judged without MedBridge's code: None when it must be stored."""
    ds = dcmread(path, stop_before_pixels=True)
    if any(k not in ds for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
        return "UIDs missing"
    if ds.SOPInstanceUID != ds.file_meta.get("MediaStorageSOPInstanceUID"):
        return "other instance"  # the C-STORE names the meta's instance, the data set is another one
    if "truncated" in path.name or "too_short" in path.name:
        return "truncated"
    return None


def send_corpus(port: int, by_study: dict[str, list[Path]]) -> dict[Path, int]:
    """Each study's files on one association, sent as the bytes on disk; the status of each."""
    # pynetdicom sends a file's data set bytes as they are (no decode and re-encode) with this set
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    statuses: dict[Path, int] = {}
    for files in by_study.values():
        ae = AE(ae_title="CORPUS")
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
        assert assoc.is_established
        try:
            for path in files:
                statuses[path] = int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
    return statuses


@pytest.mark.timeout(1200)
async def test_every_readable_pydicom_test_file_is_stored_or_refused_and_each_stored_image_inferred_once(
    stack,  # noqa: ANN001
) -> None:
    by_study, unknown_class = readable_corpus()
    port = stack.settings.dicom_port
    started = time.monotonic()
    statuses = await asyncio.to_thread(send_corpus, port, by_study)
    print(f"sent {len(statuses)} files in {time.monotonic() - started:.1f}s: {Counter(statuses.values())}")

    assert len(statuses) > 100
    assert set(statuses.values()) <= {STORED, DUPLICATE} | REFUSALS, Counter(statuses.values())
    # duplicates of a SOP Instance UID: one copy stored, later ones answered with the warning
    stored_sops: set[str] = set()
    for path, status in statuses.items():
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if status == DUPLICATE:
            assert sop in stored_sops, f"{path.name}: duplicate warning without a stored copy before it"
        elif status == STORED:
            assert sop not in stored_sops, f"{path.name}: stored twice"
            stored_sops.add(sop)
    with stack.store.session() as s:
        held = {row.sop_instance_uid: row for row in s.scalars(select(DicomInstance))}
    assert set(held) == stored_sops
    assert sum(status == STORED for status in statuses.values()) > 50
    # refused: exactly the files that are broken on purpose (the test set names its truncated files)
    refused = {path for path, status in statuses.items() if status in REFUSALS}
    assert refused == {path for path in statuses if why_refused(path)}
    for path in refused:
        if why_refused(path) == "UIDs missing":
            assert statuses[path] == 0xC211, path.name

    # a SOP class MedBridge does not know is refused in negotiation, and the listener is still up
    if unknown_class:
        ds = dcmread(unknown_class[0], stop_before_pixels=True)
        ae = AE(ae_title="CORPUS")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title="MEDBRIDGE")
        try:
            assert assoc.is_established
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
            assert (await asyncio.to_thread(assoc.send_c_echo)).Status == 0x0000
        finally:
            assoc.release()

    # every stored image: exactly one outcome across all imaging results
    image_studies = {row.study_instance_uid for row in held.values() if row.is_image}
    results = await wait_for_imaging_results(stack, image_studies)
    print(f"{len(image_studies)} image studies inferred after {time.monotonic() - started:.1f}s")
    outcomes = Counter(
        sop for r in results for sop in [f["sop_instance_uid"] for f in r["findings"]] + r["skipped_sop_instance_uids"]
    )
    images = {sop for sop, row in held.items() if row.is_image}
    assert set(outcomes) == images
    assert all(count == 1 for count in outcomes.values()), {sop: n for sop, n in outcomes.items() if n > 1}
    analysed = sum(len(r["findings"]) for r in results)
    assert analysed > len(images) / 2, f"only {analysed} of {len(images)} images could be analysed"


async def wait_for_imaging_results(stack, studies: set[str], timeout: float = 900) -> list[dict]:  # noqa: ANN001
    """The ImagingInferenceCompleted events of the given studies, once each has one (from the outbox)."""
    deadline = time.monotonic() + timeout
    while True:
        with stack.store.session() as s:
            rows = s.scalars(select(OutboxEntry).where(OutboxEntry.event_type == "ImagingInferenceCompleted"))
            results = [json.loads(row.payload) for row in rows]
        done = {r["study_instance_uid"] for r in results}
        if studies <= done:
            return results
        assert time.monotonic() < deadline, f"{len(studies - done)} of {len(studies)} studies have no imaging result"
        await asyncio.sleep(1)
