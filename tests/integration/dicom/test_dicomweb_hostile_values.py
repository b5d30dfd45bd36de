"""DICOMweb answers hostile UIDs, matching values, paging numbers and multipart bodies with a 4xx that says
what to send (or with the matches a stored value would give), never a 500, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from integration.db.store import Store
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.dicom.test_dicomweb import CT_SMALL, MR_SMALL, multipart

CT = dcmread(CT_SMALL, stop_before_pixels=True)  # CompressedSamples^CT1; SeriesNumber 1, as MR_small's
MR = dcmread(MR_SMALL, stop_before_pixels=True)


@pytest.fixture
def web(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path, min_free_bytes=0), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}/dicomweb", timeout=30
    ) as client:
        body, headers = multipart(Path(CT_SMALL).read_bytes(), Path(MR_SMALL).read_bytes())
        assert client.post("/studies", content=body, headers=headers).status_code == 200
        yield client


def _studies(r: httpx.Response) -> set[str]:
    assert r.status_code == 200, r.text
    return {m["0020000D"]["Value"][0] for m in r.json()}


def test_uids_in_the_path_that_are_lists_or_empty_are_refused(web: httpx.Client) -> None:
    st, se = CT.StudyInstanceUID, CT.SeriesInstanceUID
    for uid in ("%5C", f"{st}%5C{MR.StudyInstanceUID}", f"{st},{MR.StudyInstanceUID}"):
        for path in (f"/studies/{uid}", f"/studies/{uid}/metadata", f"/studies/{uid}/series",
                     f"/studies/{uid}/instances", f"/studies/{st}/series/{uid}", f"/studies/{st}/series/{uid}/metadata",
                     f"/studies/{st}/series/{uid}/instances", f"/studies/{st}/series/{se}/instances/{uid}",
                     f"/studies/{st}/series/{se}/instances/{uid}/frames/1"):
            r = web.get(path)
            assert r.status_code == 400, path
            assert "one UID" in r.json()["detail"]
    for value in (",", "\\", ",,"):
        r = web.get("/studies", params={"StudyInstanceUID": value})
        assert r.status_code == 400 and r.json()["detail"].startswith("StudyInstanceUID: a UID (list)")


def test_nul_in_a_matching_value_is_dropped_as_the_ingest_drops_it(web: httpx.Client) -> None:
    """PostgreSQL refused the query (a 500); SQLite matched nothing, though the stored columns drop NUL."""
    assert _studies(web.get("/studies", params={"PatientName": "CompressedSamples^CT1\u0000"})) == {
        CT.StudyInstanceUID}
    assert _studies(web.get("/studies", params={"PatientID": "\u0000"})) == {CT.StudyInstanceUID, MR.StudyInstanceUID}
    assert _studies(web.get("/studies", params={"ModalitiesInStudy": "MR\\\u0000"})) == {MR.StudyInstanceUID}
    assert _studies(web.get("/series", params={"Modality": "C\u0000T"})) == {CT.StudyInstanceUID}
    assert _studies(web.get("/studies", params={"ModalitiesInStudy": "\\\\"})) == {
        CT.StudyInstanceUID, MR.StudyInstanceUID}


def test_integers_beyond_32_bits_match_nothing_and_non_integers_are_refused(web: httpx.Client) -> None:
    for key in ("SeriesNumber", "InstanceNumber", "NumberOfFrames"):
        for value in ("2147483648", "9223372036854775808", "9" * 30):
            assert _studies(web.get("/instances", params={key: value})) == set(), (key, value)
    both = web.get("/series", params={"SeriesNumber": f"{CT.SeriesNumber}\\{'9' * 30}"})
    assert _studies(both) == {CT.StudyInstanceUID, MR.StudyInstanceUID}
    for value in ("1e5", "\u0661", "1_0", "x"):
        r = web.get("/instances", params={"InstanceNumber": value})
        assert r.status_code == 400 and r.json()["detail"].startswith("InstanceNumber:"), value


def test_offsets_beyond_32_bits_are_refused_and_limits_are_capped(web: httpx.Client) -> None:
    for value in ("2147483648", "9223372036854775808", "9" * 30, "\u0661", "-1", "1e3"):
        r = web.get("/studies", params={"offset": value})
        assert r.status_code == 400 and r.json()["detail"].startswith("offset must be"), value
    assert _studies(web.get("/studies", params={"offset": "2147483647"})) == set()
    assert len(_studies(web.get("/studies", params={"limit": "9" * 30}))) == 2
    r = web.get("/studies", params={"limit": "\u0661"})
    assert r.status_code == 400 and r.json()["detail"] == "limit must be a non-negative integer"


@pytest.mark.parametrize("content_type, body", [
    ("multipart/related; boundary=", b"x"),
    ("multipart/related; boundary=x", b"garbage"),
    ("multipart/related; boundary=x", b"--y\r\n\r\nabc\r\n--y--\r\n"),
    ("multipart/related; boundary=x", b"--x\r\nBad header line\r\n\r\nabc\r\n--x--\r\n"),
])
def test_stow_of_a_body_that_is_not_multipart_with_its_boundary_is_refused(
    web: httpx.Client, content_type: str, body: bytes
) -> None:
    r = web.post("/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code in (400, 415), r.text
    assert "boundary" in r.json()["detail"]
    assert len(web.get("/studies").json()) == 2  # nothing more stored
