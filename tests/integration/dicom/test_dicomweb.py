"""DICOMweb (STOW-RS, QIDO-RS, WADO-RS) against a uvicorn-served app, with dicomweb-client and httpx."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from sqlalchemy import select

from integration.db.store import Store
from integration.db.tables import OutboxEntry
from schemas.events import StudyReceived
from tests import authorized
from tests.conftest import serve_app, stack_settings

CT_SMALL = get_testdata_file("CT_small.dcm")  # CompressedSamples^CT1, StudyDate 20040119, CT, 128x128
MR_SMALL = get_testdata_file("MR_small.dcm")  # CompressedSamples^MR1, StudyDate 20040826, MR
RTPLAN = get_testdata_file("rtplan.dcm")  # Last^First^mid^pre, no pixels
EMRI = get_testdata_file("emri_small.dcm")  # Enhanced MR, 10 frames
JPEG2K = get_testdata_file("JPEG2000.dcm")  # CompressedSamples^NM1, JPEG 2000 (lossless)


@pytest.fixture
def base_url(store: Store, tmp_path: Path) -> Iterator[str]:
    with serve_app(stack_settings(tmp_path, min_free_bytes=0), store) as port:
        yield f"http://127.0.0.1:{port}/dicomweb"


@pytest.fixture
def client(base_url: str) -> DICOMwebClient:
    return DICOMwebClient(url=base_url, headers=authorized.headers())


@pytest.fixture
def loaded(client: DICOMwebClient) -> DICOMwebClient:
    result = client.store_instances([dcmread(p) for p in (CT_SMALL, MR_SMALL, RTPLAN, JPEG2K)])
    assert len(result.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in result
    return client


def multipart(*files: bytes, boundary: str = "medbridge-test") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files)
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_search_for_studies_by_wildcard_name_and_date_range(loaded: DICOMwebClient) -> None:
    ct, mr, nm = dcmread(CT_SMALL), dcmread(MR_SMALL), dcmread(JPEG2K)
    by_name = loaded.search_for_studies(search_filters={"PatientName": "compressedsamples^?r*"})
    assert uids(by_name) == {mr.StudyInstanceUID}
    by_name = loaded.search_for_studies(search_filters={"PatientName": "Compressed*"})
    assert uids(by_name) == {ct.StudyInstanceUID, mr.StudyInstanceUID, nm.StudyInstanceUID}
    by_date = loaded.search_for_studies(search_filters={"StudyDate": "20040101-20040331"})
    assert uids(by_date) == {ct.StudyInstanceUID}
    study = by_date[0]
    assert study["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert study["00080061"]["Value"] == ["CT"]
    assert study["00201208"]["Value"] == [1]
    assert study["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ct.StudyInstanceUID}")


def test_search_for_series_and_instances_with_filters_includefield_and_paging(loaded: DICOMwebClient) -> None:
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    series = loaded.search_for_series(study_instance_uid=ct.StudyInstanceUID)
    assert uids(series, "0020000E") == {ct.SeriesInstanceUID}
    assert series[0]["00080060"]["Value"] == ["CT"]
    instances = loaded.search_for_instances(search_filters={"Modality": "MR"})
    assert uids(instances, "00080018") == {mr.SOPInstanceUID}
    assert instances[0]["00280010"]["Value"] == [mr.Rows]  # Rows: a default instance-level attribute
    with_fields = loaded.search_for_studies(search_filters={"StudyInstanceUID": ct.StudyInstanceUID},
                                            fields=["StudyDescription", "00080090"])
    assert "00081030" in with_fields[0] and "00080090" in with_fields[0]
    page1 = loaded.search_for_studies(limit=2, offset=0)
    page2 = loaded.search_for_studies(limit=2, offset=2)
    assert len(page1) == 2 and len(page2) == 2 and not uids(page1) & uids(page2)


def test_qido_ignores_fuzzymatching_with_a_warning_and_refuses_unknown_keys(loaded: DICOMwebClient,
                                                                           base_url: str) -> None:
    rsp = authorized.get(f"{base_url}/studies", params={"PatientName": "compressed*", "fuzzymatching": "true"})
    assert rsp.status_code == 200 and len(rsp.json()) == 3
    assert "fuzzymatching" in rsp.headers["warning"]
    assert rsp.headers["content-type"].startswith("application/dicom+json")
    bad = authorized.get(f"{base_url}/studies", params={"NoSuchKeyword": "x"})
    assert bad.status_code == 400 and "NoSuchKeyword" in bad.json()["detail"]
    bad_date = authorized.get(f"{base_url}/studies", params={"StudyDate": "2004-01-19"})
    assert bad_date.status_code == 400 and "StudyDate" in bad_date.json()["detail"]


def test_retrieve_instance_is_the_stored_instance(loaded: DICOMwebClient) -> None:
    ct = dcmread(CT_SMALL)
    got = loaded.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert got.SOPInstanceUID == ct.SOPInstanceUID
    assert got.PixelData == ct.PixelData and got.PatientName == ct.PatientName


def test_wado_returns_the_bytes_as_received(base_url: str) -> None:
    raw = Path(CT_SMALL).read_bytes()
    body, headers = multipart(raw)
    assert authorized.post(f"{base_url}/studies", content=body, headers=headers).status_code == 200
    ct = dcmread(CT_SMALL)
    url = f"{base_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    rsp = authorized.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert rsp.status_code == 200
    boundary = rsp.headers["content-type"].split("boundary=")[1]
    part = rsp.content.split(f"--{boundary}".encode())[1]
    assert part.split(b"\r\n\r\n", 1)[1][:-2] == raw


def test_retrieve_study_metadata_carries_attributes_and_a_pixel_bulkdata_uri(loaded: DICOMwebClient) -> None:
    ct = dcmread(CT_SMALL)
    metadata = loaded.retrieve_study_metadata(ct.StudyInstanceUID)
    assert len(metadata) == 1
    meta = metadata[0]
    assert meta["00080018"]["Value"] == [ct.SOPInstanceUID]
    assert meta["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert meta["00280010"]["Value"] == [ct.Rows]
    assert meta["7FE00010"]["BulkDataURI"].endswith(f"/instances/{ct.SOPInstanceUID}/frames/1")
    assert "Value" not in meta["7FE00010"] and "InlineBinary" not in meta["7FE00010"]


def test_retrieve_frames_native_and_compressed(loaded: DICOMwebClient) -> None:
    ct, nm = dcmread(CT_SMALL), dcmread(JPEG2K)
    native = loaded.retrieve_instance_frames(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, [1])
    assert native == [ct.PixelData]
    compressed = loaded.retrieve_instance_frames(nm.StudyInstanceUID, nm.SeriesInstanceUID, nm.SOPInstanceUID, [1],
                                                 media_types=("image/jp2",))
    assert compressed == [next(generate_frames(nm.PixelData, number_of_frames=1))]


def test_retrieve_instance_rendered_as_png_and_jpeg(loaded: DICOMwebClient) -> None:
    ct = dcmread(CT_SMALL)
    png = loaded.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID,
                                            media_types=("image/png",))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (ct.Columns, ct.Rows)
    low, high = image.getextrema()
    assert high - low > 100  # a windowed picture, not a flat square
    jpeg = loaded.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID,
                                             media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"


def test_rendered_parameters_window_viewport_and_quality(loaded: DICOMwebClient, base_url: str) -> None:
    ct = dcmread(CT_SMALL)
    url = (f"{base_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
           f"/instances/{ct.SOPInstanceUID}/rendered")

    def picture(accept: str = "image/png", **params: str) -> Image.Image:
        rsp = authorized.get(url, params=params, headers={"Accept": accept})
        assert rsp.status_code == 200, rsp.text
        return Image.open(io.BytesIO(rsp.content))

    # a narrow window around a value in the image is brighter above it and black below it
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    center = float(np.median(hu))
    narrow = np.asarray(picture(window=f"{center},2,linear-exact"))
    assert (narrow == 0).any() and (narrow == 255).any()
    assert np.array_equal(narrow == 255, hu >= center + 1) and np.array_equal(narrow == 0, hu <= center - 1)
    assert np.asarray(picture(window=f"{center},2000,sigmoid")).std() > 0
    # a linear width of 1 is a threshold; extreme values clip instead of failing
    step = np.asarray(picture(window=f"{center},1,linear"))
    assert np.array_equal(step == 255, hu > center - 0.5) and set(np.unique(step)) == {0, 255}
    assert set(np.unique(np.asarray(picture(window="1e300,1e-300,linear-exact")))) <= {0, 255}
    assert set(np.unique(np.asarray(picture(window="0,1e-300,sigmoid")))) <= {0, 128, 255}
    # dicomweb-client's own parameter passing: the viewport keeps the aspect ratio (128 x 128 -> 64 x 64)
    thumb = loaded.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID,
                                              media_types=("image/png",), params={"viewport": "64,100"})
    assert Image.open(io.BytesIO(thumb)).size == (64, 64)
    # a source region, flipped horizontally, scaled into the viewport
    whole = np.asarray(picture())
    region = np.asarray(picture(viewport="32,32,0,0,-32,32"))
    assert region.shape == (32, 32)
    assert np.array_equal(region, whole[0:32, 0:32][:, ::-1])
    # JPEG quality changes the bytes; GIF is served too
    small = authorized.get(url, params={"quality": "5"}, headers={"Accept": "image/jpeg"}).content
    large = authorized.get(url, params={"quality": "95"}, headers={"Accept": "image/jpeg"}).content
    assert len(small) < len(large)
    assert picture(accept="image/gif").format == "GIF"
    # malformed or unsupported parameters: 400 saying what is expected
    for params in ({"window": "40,400"}, {"window": "40,400,cubic"}, {"window": "a,b,linear"},
                   {"viewport": "0,10"}, {"viewport": "10,10,0,0,0,5"}, {"viewport": "10,10,500,500,10,10"},
                   {"quality": "101"}, {"quality": "high"}, {"annotation": "patient"}):
        rsp = authorized.get(url, params=params, headers={"Accept": "image/png"})
        assert rsp.status_code == 400, (params, rsp.status_code)
        assert next(iter(params)) in rsp.json()["detail"]


def image_parts(rsp: httpx.Response) -> list[Image.Image]:
    """The images of a multipart/related response."""
    assert rsp.status_code == 200, rsp.text
    assert rsp.headers["content-type"].startswith("multipart/related")
    boundary = rsp.headers["content-type"].split("boundary=")[1]
    chunks = rsp.content.split(f"--{boundary}".encode())[1:-1]
    return [Image.open(io.BytesIO(chunk.split(b"\r\n\r\n", 1)[1][:-2])) for chunk in chunks]


def test_rendered_study_series_frames_and_thumbnails(loaded: DICOMwebClient, base_url: str) -> None:
    emri = dcmread(EMRI)  # Enhanced MR, 10 frames of 64 x 64
    loaded.store_instances([emri])
    series = f"{base_url}/studies/{emri.StudyInstanceUID}/series/{emri.SeriesInstanceUID}"
    instance = f"{series}/instances/{emri.SOPInstanceUID}"
    as_parts = {"Accept": 'multipart/related; type="image/png"'}
    # every frame of the series, each its own part, each the frame rendered on its own
    frames = image_parts(authorized.get(f"{series}/rendered", headers=as_parts))
    assert len(frames) == 10 and all(f.format == "PNG" and f.size == (64, 64) for f in frames)
    third_png = authorized.get(f"{instance}/frames/3/rendered", headers={"Accept": "image/png"}).content
    third = Image.open(io.BytesIO(third_png))
    assert np.array_equal(np.asarray(frames[2]), np.asarray(third))
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[5]))
    two = image_parts(authorized.get(f"{instance}/frames/2,3/rendered", headers=as_parts, params={"viewport": "32,32"}))
    assert [f.size for f in two] == [(32, 32)] * 2
    # several frames need a multipart Accept; one image for a single-frame media type
    rsp = authorized.get(f"{instance}/frames/2,3/rendered", headers={"Accept": "image/png"})
    assert rsp.status_code == 406 and "multipart/related" in rsp.json()["detail"]
    single = authorized.get(f"{instance}/rendered", headers={"Accept": "image/png"})
    assert single.status_code == 200 and single.headers["content-type"] == "image/png"
    assert len(image_parts(authorized.get(f"{instance}/rendered", headers=as_parts))) == 10
    # the study's images: the CT study holds one
    ct = dcmread(CT_SMALL)
    study_frames = image_parts(authorized.get(f"{base_url}/studies/{ct.StudyInstanceUID}/rendered", headers=as_parts))
    assert [f.size for f in study_frames] == [(ct.Columns, ct.Rows)]
    # thumbnails: one small image, of the middle frame for a multi-frame instance
    thumb = authorized.get(f"{series}/thumbnail", headers={"Accept": "image/jpeg"})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)
    small = authorized.get(f"{base_url}/studies/{ct.StudyInstanceUID}/thumbnail", params={"viewport": "48,48"},
                      headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(small.content)).size == (48, 48)
    middle = authorized.get(f"{instance}/thumbnail", params={"viewport": "64,64"}, headers={"Accept": "image/png"})
    fifth = authorized.get(f"{instance}/frames/5/rendered", headers={"Accept": "image/png"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(middle.content))),
                          np.asarray(Image.open(io.BytesIO(fifth.content))))
    # a study without images has nothing to render
    rt = dcmread(RTPLAN)
    for what in ("rendered", "thumbnail"):
        rsp = authorized.get(f"{base_url}/studies/{rt.StudyInstanceUID}/{what}", headers=as_parts)
        assert rsp.status_code == 406 and "pixel data" in rsp.json()["detail"]


def test_unknown_uids_answer_404_with_what_to_do(loaded: DICOMwebClient, base_url: str) -> None:
    ct = dcmread(CT_SMALL)
    with pytest.raises(requests.HTTPError) as err:
        loaded.retrieve_study("1.2.3.4.5.6.7.8.9")
    assert err.value.response.status_code == 404
    rsp = authorized.get(
        f"{base_url}/studies/{ct.StudyInstanceUID}/series/1.2.3/instances/{ct.SOPInstanceUID}/metadata")
    assert rsp.status_code == 404 and "QIDO-RS" in rsp.json()["detail"]
    rendered = authorized.get(f"{base_url}/studies/{dcmread(RTPLAN).StudyInstanceUID}/series/"
                              f"{dcmread(RTPLAN).SeriesInstanceUID}/instances/{dcmread(RTPLAN).SOPInstanceUID}/rendered")
    assert rendered.status_code == 406 and "no pixel data" in rendered.json()["detail"]


def test_stow_of_another_content_type_is_415(base_url: str) -> None:
    rsp = authorized.post(f"{base_url}/studies", content=Path(CT_SMALL).read_bytes(),
                     headers={"Content-Type": "application/dicom"})
    assert rsp.status_code == 415 and "multipart/related" in rsp.json()["detail"]


def test_stow_refuses_a_truncated_file_and_stores_its_good_sibling(base_url: str, store: Store) -> None:
    good, bad = Path(MR_SMALL).read_bytes(), Path(CT_SMALL).read_bytes()
    body, headers = multipart(bad[: len(bad) // 2], good)
    rsp = authorized.post(f"{base_url}/studies", content=body, headers=headers)
    assert rsp.status_code == 202
    result = rsp.json()
    failed = result["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC210]
    assert [i["00081155"]["Value"][0] for i in result["00081199"]["Value"]] == [dcmread(MR_SMALL).SOPInstanceUID]
    assert store.get_instance(dcmread(MR_SMALL).SOPInstanceUID) is not None
    assert store.get_instance(dcmread(CT_SMALL).SOPInstanceUID) is None


def test_stow_to_another_study_is_409(base_url: str, store: Store) -> None:
    body, headers = multipart(Path(CT_SMALL).read_bytes())
    rsp = authorized.post(f"{base_url}/studies/1.2.3.4", content=body, headers=headers)
    assert rsp.status_code == 409
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert store.get_instance(dcmread(CT_SMALL).SOPInstanceUID) is None


async def test_stowed_study_is_announced_as_study_received(stack) -> None:  # noqa: ANN001
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = f"2.25.{uuid.uuid4().int}"
    ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, headers = multipart(buf.getvalue())
    url = f"http://127.0.0.1:{stack.settings.http_port}/dicomweb/studies"
    async with authorized.AsyncClient(timeout=60) as http:
        rsp = await http.post(url, content=body, headers=headers)
    assert rsp.status_code == 200
    deadline = time.monotonic() + 90
    while True:
        with stack.store.session() as s:
            rows = [r for r in s.scalars(select(OutboxEntry).where(OutboxEntry.event_type == "StudyReceived"))
                    if ds.StudyInstanceUID in r.payload and r.published_at is not None]
        if rows:
            break
        assert time.monotonic() < deadline, "no StudyReceived was published for the STOW'd study"
        await asyncio.sleep(0.2)
    event = StudyReceived.model_validate_json(rows[0].payload)
    assert event.instance_count == 1


def test_logs_carry_no_patient_data(client: DICOMwebClient, base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ct = dcmread(CT_SMALL)
    truncated = Path(CT_SMALL).read_bytes()[:5000]
    body, headers = multipart(Path(CT_SMALL).read_bytes(), truncated)
    assert authorized.post(f"{base_url}/studies", content=body, headers=headers).status_code == 202
    client.search_for_studies(search_filters={"PatientName": "CompressedSamples*", "PatientID": str(ct.PatientID)})
    client.retrieve_study_metadata(ct.StudyInstanceUID)
    authorized.get(f"{base_url}/studies", params={"PatientBirthDate": "1970-01-01"})
    # the service's records (the test's own HTTP clients log the URLs they call)
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "dicomweb_client")))
    assert "STOW-RS" in text and "QIDO-RS" in text  # the routes did log
    for secret in ("CompressedSamples", str(ct.PatientID), "20040119", "1970-01-01", ct.StudyInstanceUID,
                   ct.SOPInstanceUID):
        assert secret not in text


def test_qido_uid_lists_take_commas(loaded: DICOMwebClient) -> None:
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    both = f"{ct.StudyInstanceUID},{mr.StudyInstanceUID}"
    found = loaded.search_for_studies(search_filters={"StudyInstanceUID": both})
    assert uids(found) == {ct.StudyInstanceUID, mr.StudyInstanceUID}


def test_compressed_frames_are_decoded_for_a_client_that_takes_only_octet_stream(loaded: DICOMwebClient,
                                                                               base_url: str) -> None:
    nm = dcmread(JPEG2K)
    url = f"{base_url}/studies/{nm.StudyInstanceUID}/series/{nm.SeriesInstanceUID}/instances/{nm.SOPInstanceUID}"
    rsp = authorized.get(f"{url}/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert rsp.status_code == 200
    boundary = rsp.headers["content-type"].split("boundary=")[1]
    headers, data = rsp.content.split(f"--{boundary}".encode())[1].split(b"\r\n\r\n", 1)
    assert b"application/octet-stream" in headers
    assert data[:-2] == nm.pixel_array.tobytes()
    beyond = authorized.get(f"{url}/frames/2")
    assert beyond.status_code == 404 and "1 frame" in beyond.json()["detail"]


def test_qido_answers_at_most_the_configured_number_with_the_standard_warning(store: Store, tmp_path: Path) -> None:
    with serve_app(stack_settings(tmp_path, min_free_bytes=0, qido_max_results=2), store) as port:
        base = f"http://127.0.0.1:{port}/dicomweb"
        DICOMwebClient(url=base, headers=authorized.headers()).store_instances(
            [dcmread(p) for p in (CT_SMALL, MR_SMALL, RTPLAN, JPEG2K)])
        first = authorized.get(f"{base}/studies")
        assert first.status_code == 200 and len(first.json()) == 2
        assert "exceeded the maximum supported by the server" in first.headers["Warning"]
        rest = authorized.get(f"{base}/studies", params={"offset": 2})
        assert len(rest.json()) == 2 and "Warning" not in rest.headers
        assert uids(first.json()) | uids(rest.json()) == {dcmread(p).StudyInstanceUID
                                                          for p in (CT_SMALL, MR_SMALL, RTPLAN, JPEG2K)}
        one = authorized.get(f"{base}/studies", params={"limit": 1})
        assert len(one.json()) == 1 and "Warning" not in one.headers  # the client asked for fewer


def test_a_viewer_on_a_configured_origin_may_call_dicomweb_and_others_may_not(store: Store, tmp_path: Path) -> None:
    viewer = "http://ohif.example:3000"
    with serve_app(stack_settings(tmp_path, min_free_bytes=0, cors_origins=viewer), store) as port:
        base = f"http://127.0.0.1:{port}/dicomweb"
        preflight = httpx.options(f"{base}/studies", headers={
            "Origin": viewer, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == viewer
        allowed = authorized.get(f"{base}/studies", headers={"Origin": viewer})
        assert allowed.headers["access-control-allow-origin"] == viewer
        other = authorized.get(f"{base}/studies", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def test_stow_rs_above_the_size_limit_is_refused_with_413_and_stores_nothing(store: Store, tmp_path: Path) -> None:
    ct = Path(CT_SMALL).read_bytes()
    settings = stack_settings(tmp_path, min_free_bytes=0).model_copy(update={"stow_max_bytes": len(ct) + 1000})
    with serve_app(settings, store) as port:
        url = f"http://127.0.0.1:{port}/dicomweb/studies"
        body, headers = multipart(ct, ct)
        declared = authorized.post(url, content=body, headers=headers)
        streamed = authorized.post(url, content=iter([body[:1000], body[1000:]]), headers=headers)  # no Content-Length
        assert store.get_instance(str(dcmread(CT_SMALL).SOPInstanceUID)) is None
        within = authorized.post(url, content=multipart(ct)[0], headers=headers)
    assert declared.status_code == 413 and "MEDBRIDGE_STOW_MAX_BYTES" in declared.text
    assert streamed.status_code == 413
    assert within.status_code == 200
    assert store.get_instance(str(dcmread(CT_SMALL).SOPInstanceUID)) is not None


def test_an_instance_with_a_non_conformant_uid_is_stored_and_found(client: DICOMwebClient, base_url: str) -> None:
    """Devices that break PS3.5 with letters or leading zeros in UIDs are stored (see
    dicom_query.STORABLE_UID); what is stored must also be found and retrieved."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.01a"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.01a.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.01a.2.3"
    result = client.store_instances([ds])
    assert "FailedSOPSequence" not in result
    found = client.search_for_instances(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
    assert uids(found, "00080018") == {ds.SOPInstanceUID}
    # dicomweb-client refuses such UIDs in its URLs: plain HTTP
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/metadata"
    metadata = authorized.get(base_url + path, headers={"Accept": "application/dicom+json"}, timeout=30)
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]
