"""Bounded memory: instance size limits, deflate bombs and huge frame headers, over real sockets.

The peak-RSS test runs the listener and the HTTP app in a subprocess of their own (so its VmHWM is
theirs alone), warms them with ordinary traffic, then sends a 2 GiB deflate bomb by C-STORE and by
STOW-RS and asks for a rendering of a 60,000 x 60,000 frame, reading VmHWM after each.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from integration.db.store import Store
from integration.dicom.ingest.limits import TOO_LARGE_COMMENT, inflate_within, inflated_size_within
from integration.dicom.network.listener import DicomListener, part10_bytes
from tests import authorized
from tests.conftest import free_port

DEFLATED = "1.2.840.10008.1.2.1.99"
CT_SMALL = get_testdata_file("CT_small.dcm")
RSS_BOUND_MIB = 200


def deflate_bomb(folder: Path, inflated: int = 2 << 30) -> tuple[Path, str, str]:
    """A Part 10 file in the deflated transfer syntax whose data set (a few UIDs and an OB element of
    zeros) inflates to ``inflated`` bytes; built from one repeated full-flush block, so neither
    making nor sending it needs that memory. (path, SOP Instance UID, Study Instance UID)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    chunk = 16 << 20
    repeats = inflated // chunk
    header = fp.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, repeats * chunk)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)  # no history: repeatable
    stream = head + block * repeats + compressor.flush()
    path = folder / "bomb.dcm"
    path.write_bytes(part10_bytes(CTImageStorage, str(ds.SOPInstanceUID), DEFLATED, "BOMB", stream))
    return path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def test_bounded_inflate_measures_before_it_inflates(tmp_path: Path) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    small = compressor.compress(b"x" * 1000) + compressor.flush()
    assert inflate_within(small, 1000) == b"x" * 1000
    path, _, _ = deflate_bomb(tmp_path, inflated=64 << 20)
    data = path.read_bytes()
    offset = 144 + int.from_bytes(data[140:144], "little")
    import pytest

    from integration.dicom.ingest.limits import InstanceTooLargeError

    with pytest.raises(InstanceTooLargeError):
        inflated_size_within(data[offset:], 32 << 20)
    assert inflated_size_within(data[offset:], 128 << 20) > 64 << 20


def test_c_store_over_the_instance_limit_answers_a700_with_a_comment(store: Store, tmp_path: Path) -> None:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, max_instance_bytes=20_000)
    lst.start()
    try:
        ae = AE(ae_title="BIG")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.add_requested_context(CTImageStorage, DEFLATED)
        assoc = ae.associate("127.0.0.1", lst.port, ae_title="MEDBRIDGE", max_pdu=8192)
        assert assoc.is_established
        ds = dcmread(CT_SMALL)  # 39 KB
        status = assoc.send_c_store(ds)
        assert status.Status == 0xA700 and status.ErrorComment == TOO_LARGE_COMMENT
        assert store.get_instance(ds.SOPInstanceUID) is None
        # the association goes on: an instance under the limit is stored
        small = Dataset()
        small.SOPClassUID, small.SOPInstanceUID = CTImageStorage, generate_uid()
        small.StudyInstanceUID, small.SeriesInstanceUID = generate_uid(), generate_uid()
        small.file_meta = dcmread(CT_SMALL).file_meta
        assert assoc.send_c_store(small).Status == 0x0000
        assoc.release()
    finally:
        lst.stop()


def test_an_undecodable_deflated_data_set_answers_c210(listener: DicomListener, tmp_path: Path) -> None:
    sop = generate_uid()
    path = tmp_path / "broken.dcm"
    path.write_bytes(part10_bytes(CTImageStorage, sop, DEFLATED, "BROKEN", b"\xff\xfe not a deflate stream"))
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="BROKEN")
        ae.add_requested_context(CTImageStorage, DEFLATED)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0xC210
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False


SERVER = r"""
import sys, threading, time
from pathlib import Path
import uvicorn
from integration import phi
from integration.app.http import create_app
from integration.app.services import Services
from integration.app.settings import Settings
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

settings = Settings(data_dir=Path(sys.argv[1]), auth_signing_key=Path(sys.argv[2]), http_port=int(sys.argv[3]),
                    dicom_port=0, viewer_enabled=False, database_url="")
phi.install_key(phi.load_or_create_key(settings.data_dir))
store = Store(settings.effective_database_url)
store.start()
listener = DicomListener.from_settings(store, settings, port=0)
listener.start()
server = uvicorn.Server(uvicorn.Config(create_app(Services(settings, store)), host="127.0.0.1",
                                       port=settings.http_port, log_level="warning", lifespan="off"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.02)
print(listener.port, flush=True)
for line in sys.stdin:
    print(hwm_kib(), flush=True)
"""


def _limit_memory() -> None:
    # should a bound fail, the server gets MemoryError rather than the shared machine's memory
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


def _stow(client: httpx.Client, content: bytes) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + content
            + f"\r\n--{boundary}--\r\n".encode())
    return client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _huge_frame(study: str) -> bytes:
    """An RLE-compressed image whose header says 60,000 x 60,000 (decoders allocate from the header)."""
    ds = dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = 60000
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_deflate_bombs_and_a_huge_frame_header_do_not_raise_peak_rss(tmp_path: Path) -> None:
    http_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path / "var"), str(authorized.issuer_key()), str(http_port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_limit_memory)
    assert server.stdin is not None and server.stdout is not None

    def hwm_mib() -> float:
        server.stdin.write("hwm\n")  # type: ignore[union-attr]
        server.stdin.flush()  # type: ignore[union-attr]
        return int(server.stdout.readline()) / 1024  # type: ignore[union-attr]

    try:
        dicom_port = int(server.stdout.readline())
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.add_requested_context(CTImageStorage, DEFLATED)
        with authorized.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as client:
            # warm up: an ordinary C-STORE, STOW-RS and rendering load what those paths import
            ds = dcmread(CT_SMALL)
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title="MEDBRIDGE")
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
            ct = io.BytesIO()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(ct, enforce_file_format=True)
            assert _stow(client, ct.getvalue()).status_code == 200
            rendered = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                                  f"/instances/{ds.SOPInstanceUID}/rendered", headers={"Accept": "image/png"})
            assert rendered.status_code == 200
            baseline = hwm_mib()

            bomb, bomb_sop, _ = deflate_bomb(tmp_path)
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # sent as it is, never inflated here
            try:
                assoc = ae.associate("127.0.0.1", dicom_port, ae_title="MEDBRIDGE")
                status = assoc.send_c_store(bomb)
                assoc.release()
            finally:
                pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
            assert status.Status == 0xA700 and status.ErrorComment == TOO_LARGE_COMMENT
            after_c_store = hwm_mib()

            stow = _stow(client, bomb.read_bytes())
            assert stow.status_code == 413 and "MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES" in stow.text
            after_stow = hwm_mib()

            study = generate_uid()
            huge = dcmread(io.BytesIO(_huge_frame(study)))
            assert _stow(client, _huge_frame(study)).status_code == 200
            listing = client.get(f"/dicomweb/studies/{study}/instances").json()
            sop, series = listing[0]["00080018"]["Value"][0], listing[0]["0020000E"]["Value"][0]
            rendered = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered",
                                  headers={"Accept": "image/png"})
            assert rendered.status_code == 406 and "60000 x 60000" in rendered.text, rendered.text
            study_rendered = client.get(f"/dicomweb/studies/{study}/rendered", headers={
                "Accept": 'multipart/related; type="image/png"'})
            assert study_rendered.status_code == 406
            assert huge.Rows == 60000
            many = ",".join(["1"] * 1001)
            frames = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{many}")
            assert frames.status_code == 400 and "at most 1000 frames" in frames.text
            after_render = hwm_mib()
        figures = {"baseline_mib": round(baseline), "c_store_bomb_delta_mib": round(after_c_store - baseline),
                   "stow_bomb_delta_mib": round(after_stow - baseline),
                   "render_60000_delta_mib": round(after_render - baseline)}
        print(json.dumps(figures))
        assert after_c_store - baseline < RSS_BOUND_MIB, figures
        assert after_stow - baseline < RSS_BOUND_MIB, figures
        assert after_render - baseline < RSS_BOUND_MIB, figures
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(30)
