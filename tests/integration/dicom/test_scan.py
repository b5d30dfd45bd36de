"""The byte scanner that C-STORE uses instead of pydicom gives pydicom's facts, or declines.

Every file of pydicom's test set (with pydicom-data) that pydicom reads as Part 10: where the scanner
answers, each fact (UIDs, modality, patient ID, pixel presence, every query column) equals what
pydicom reads; where pydicom finds a problem (a missing UID, a truncated value), the scanner declines
so that pydicom decides the status.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.filereader import read_preamble
from pydicom.uid import UID

from integration.dicom.ingest.scan import facts_from_dataset, scan_facts


def data_set_bytes(path: Path) -> tuple[bytes, UID] | None:
    """The bytes after the File Meta Information and the transfer syntax, as a C-STORE carries them."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - only files pydicom reads as Part 10 are in the set
        return None
    with open(path, "rb") as fh:
        read_preamble(fh, force=False)
        from pydicom.filereader import _read_file_meta_info

        _read_file_meta_info(fh)
        return fh.read(), syntax


def corpus() -> list[Path]:
    return [Path(p) for p in sorted(get_testdata_files("*")) if data_set_bytes(Path(p)) is not None]


def pydicom_facts(data: bytes, syntax: UID):  # noqa: ANN201
    from io import BytesIO

    from pynetdicom.dsutils import decode

    ds = decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    return facts_from_dataset(ds, syntax)


@pytest.fixture(scope="module")
def files() -> list[Path]:
    found = corpus()
    assert len(found) > 100, "pydicom's test set (and pydicom-data) should hold over a hundred Part 10 files"
    return found


def test_scanner_agrees_with_pydicom_on_every_file_it_answers(files: list[Path]) -> None:
    answered = 0
    for path in files:
        data, syntax = data_set_bytes(path)  # type: ignore[misc]
        scanned = scan_facts(data, syntax)
        if scanned is None:
            continue
        answered += 1
        assert scanned == pydicom_facts(data, syntax), path.name
    # the common case (little endian, clean, Latin-1/UTF-8) must be the fast one
    assert answered > len(files) // 2


def test_scanner_declines_what_pydicom_refuses(files: list[Path]) -> None:
    for path in files:
        data, syntax = data_set_bytes(path)  # type: ignore[misc]
        try:
            reference = pydicom_facts(data, syntax)
        except Exception:  # noqa: BLE001 - pydicom cannot read it: the scanner must not vouch for it
            assert scan_facts(data, syntax) is None, path.name
            continue
        if reference.truncated is not None:
            assert scan_facts(data, syntax) is None, path.name


def test_scanner_declines_a_truncated_instance_and_a_missing_uid() -> None:
    data, syntax = data_set_bytes(Path(get_testdata_file("CT_small.dcm")))  # type: ignore[misc]
    assert scan_facts(data, syntax) == pydicom_facts(data, syntax)  # whole: answered, as pydicom reads it
    assert scan_facts(data[:-100], syntax) is None  # pixel data cut short
    header_cut = data[: data.index(b"\xe0\x7f\x10\x00") - 2]  # the value before the pixel data, 2 bytes short
    assert pydicom_facts(header_cut, syntax).truncated == "(0043,104E)"  # pydicom reads on with a short value
    assert scan_facts(header_cut, syntax) is None
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(fp, ds)
    assert scan_facts(fp.getvalue(), syntax) is None
