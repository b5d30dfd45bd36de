"""What ingest needs to know about a received data set, read from its bytes without pydicom.

pydicom builds a ``Dataset`` of every element (~0.6 ms for a 39 KB CT) and converts each value on
access (~20 us an attribute); a C-STORE needs only the UIDs, a dozen query attributes and the
pixel description, once. :func:`scan_facts` walks the top-level elements of a little-endian data set
(implicit or explicit VR, native or encapsulated pixel data) in one pass over the bytes, skipping
values it does not need, and decodes those it does in ~0.1 ms.

It only answers for data it fully understands: a missing or empty UID, a value that runs past the
end of the bytes, an unknown VR, a character set beyond ASCII/Latin-1/UTF-8, big-endian or deflated
data, or anything malformed make it return ``None``, and the caller asks pydicom
(:func:`facts_from_dataset`), which decides the refusals. ``tests/integration/dicom/test_scan.py``
checks both give the same facts for every file of pydicom's test set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from integration.dicom.query import INDEX_INT_COLUMNS, INDEX_TEXT_COLUMNS, index_fields

# Composite objects that carry no pixels for the CNN, even if they are "storage" classes
NON_IMAGE_MODALITIES = frozenset({"SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "ECG", "DOC", "REG", "SEG"})


@dataclass(frozen=True)
class InstanceFacts:
    """The attributes ingest checks and records; ``truncated`` names a short element, if any."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    patient_id: str | None
    has_pixel_data: bool
    truncated: str | None
    index: dict[str, Any] = field(default_factory=dict)  # DicomInstance query columns

    @property
    def is_image(self) -> bool:
        return self.has_pixel_data and (self.modality or "") not in NON_IMAGE_MODALITIES


# ---- pydicom: the reference reading, and every case the scanner declines --------------------------


def facts_from_dataset(ds: Any, transfer_syntax: UID) -> InstanceFacts:
    """The facts of a pydicom data set. Raises AttributeError when a required UID is missing and
    whatever pydicom raises for values it cannot parse."""
    return InstanceFacts(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "") or "") or None,
        patient_id=str(ds.get("PatientID", "") or "") or None,
        has_pixel_data="PixelData" in ds,
        truncated=_first_truncated_element(ds, transfer_syntax),
        index=index_fields(ds),
    )


def _first_truncated_element(ds: Any, transfer_syntax: UID) -> str | None:
    """The tag of a top-level element holding fewer bytes than its declared length, if any.

    pydicom reads a truncated value silently (short bytes); a sender that lost the end of a file
    must get a failure, not a stored half image. Only the last element read can be short (the
    parser stops at the end of the bytes), so only it is checked. Undefined-length values fail in
    pydicom itself.
    """
    last = next(reversed(ds.keys()), None) if len(ds) else None
    if last is not None:
        raw = ds.get_item(last)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
            return str(last)
    if "PixelData" not in ds or transfer_syntax.is_compressed:
        return None
    value = getattr(ds.get_item(0x7FE00010), "value", None)
    if not isinstance(value, bytes):
        return None
    try:
        needed = native_pixel_bytes(
            rows=int(ds.Rows), columns=int(ds.Columns), samples=int(ds.get("SamplesPerPixel", 1) or 1),
            photometric=ds.get("PhotometricInterpretation"), frames=int(ds.get("NumberOfFrames", 1) or 1),
            bits_allocated=int(ds.BitsAllocated),
        )
    except (AttributeError, TypeError, ValueError):
        return "PixelData"  # pixels without the attributes that describe them cannot be understood
    return "PixelData" if len(value) < needed else None


def native_pixel_bytes(*, rows: int, columns: int, samples: int, photometric: str | None, frames: int,
                       bits_allocated: int) -> int:
    """Bytes that uncompressed pixel data of this description needs."""
    if photometric == "YBR_FULL_422":
        samples = 2  # chroma subsampled: two samples per pixel on average (PS3.3 C.7.6.3.1.2)
    return (rows * columns * samples * frames * bits_allocated + 7) // 8


# ---- the scanner -----------------------------------------------------------------------------------

class _Decline(Exception):
    """The scanner does not vouch for this data set; pydicom decides."""


# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010

# tag -> the fact or query-index column it fills: the UIDs and pixel description ingest checks,
# and every column of dicom_query's index (one list for this scanner and for index_fields)
_WANTED: dict[int, str] = {
    0x00080005: "charset",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x00100020: "patient_id",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00280002: "samples",
    0x00280004: "photometric",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
    **{int(tag_for_keyword(keyword)): column  # type: ignore[arg-type]
       for column, keyword, *_ in (*INDEX_TEXT_COLUMNS, *INDEX_INT_COLUMNS)},
}
# Character sets whose bytes decode with one Python codec and no escape sequences (PS3.3 C.12.1.1.2)
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")


def scan_facts(data: bytes | memoryview, transfer_syntax: UID) -> InstanceFacts | None:
    """The facts of a data set (the bytes after the File Meta Information), or None when the scanner
    declines it (see the module docstring); never raises."""
    if not transfer_syntax.is_little_endian or transfer_syntax.is_deflated:
        return None
    try:
        raw, pixel_length = _scan(bytes(data), transfer_syntax.is_implicit_VR)
        return _facts(raw, pixel_length, transfer_syntax)
    except (_Decline, struct.error, UnicodeDecodeError, ValueError):
        return None


def _scan(buf: bytes, implicit: bool) -> tuple[dict[str, bytes], int | None]:
    """The raw values of the wanted top-level elements and the pixel data length (None: absent,
    -1: encapsulated). The element header is unpacked inline: this loop runs ~250 times for a CT."""
    raw: dict[str, bytes] = {}
    pixel_length: int | None = None
    end = len(buf)
    pos = 0
    previous = -1
    wanted_names = _WANTED
    while pos < end:
        if implicit:
            group, element, length = _IMPLICIT.unpack_from(buf, pos)
            vr = None
            pos += 8
        else:
            group, element, vr, length = _EXPLICIT.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                length = _U32.unpack_from(buf, pos + 8)[0]
                pos += 12
            elif vr in _SHORT_VRS:
                pos += 8
            else:
                raise _Decline("unknown VR")
        tag = group << 16 | element
        if tag <= previous or group == 0xFFFE:
            raise _Decline("elements out of order, or an item outside a sequence")
        previous = tag
        if length == _UNDEFINED:
            if vr not in (b"SQ", b"UN", b"OB", b"OW", None):
                raise _Decline("undefined length on a VR that cannot have one")
            pos = _skip_items(buf, pos, implicit)
            if tag == _PIXEL_DATA:
                pixel_length = -1  # encapsulated (compressed) pixel data
            continue
        if pos + length > end:
            raise _Decline("value runs past the end")  # truncated: pydicom names it
        name = wanted_names.get(tag)
        if name is not None:
            raw[name] = buf[pos : pos + length]
        elif tag == _PIXEL_DATA:
            pixel_length = length
        pos += length
    return raw, pixel_length


def _header(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """Tag, VR (None when implicit or an item), length and value offset of the element at ``pos``."""
    group, element = _TAG.unpack_from(buf, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
    if vr in _SHORT_VRS:
        return tag, vr, _U16.unpack_from(buf, pos + 6)[0], pos + 8
    raise _Decline("unknown VR")


def _skip_items(buf: bytes, pos: int, implicit: bool) -> int:
    """Past an undefined-length value: items (each of defined or undefined length) up to the
    sequence delimiter. Encapsulated pixel fragments are items of defined length."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise _Decline("sequence runs past the end")
        tag, length = _U32.unpack_from(buf, pos)[0], _U32.unpack_from(buf, pos + 4)[0]
        tag = (tag & 0xFFFF) << 16 | tag >> 16  # (group, element) little-endian words
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Decline("not an item")
        if length == _UNDEFINED:
            pos = _skip_item_elements(buf, pos, implicit)
        elif pos + length > end:
            raise _Decline("item runs past the end")
        else:
            pos += length


def _skip_item_elements(buf: bytes, pos: int, implicit: bool) -> int:
    """Past the elements of an undefined-length item, up to and including its delimiter."""
    end = len(buf)
    while pos < end:
        tag, vr, length, pos = _header(buf, pos, implicit)
        if tag == _ITEM_END:
            return pos
        if length == _UNDEFINED:
            pos = _skip_items(buf, pos, implicit)
        elif pos + length > end:
            raise _Decline("value runs past the end")
        else:
            pos += length
    raise _Decline("item runs past the end")


def _facts(raw: dict[str, bytes], pixel_length: int | None, transfer_syntax: UID) -> InstanceFacts:
    charset = _ascii(raw.get("charset", b""))
    codec = _CODECS.get(charset)
    if codec is None:
        raise _Decline("character set needs pydicom")
    uids = {}
    for name in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        uid = _ascii(raw.get(name, b"")).rstrip("\x00 ")
        if not uid:
            raise _Decline("UID missing or empty")  # pydicom decides 0xC211
        uids[name] = uid
    index: dict[str, Any] = {
        column: _clip(_text(raw[column], codec), size) if column in raw else None
        for column, _keyword, size in INDEX_TEXT_COLUMNS
    }
    for column, _keyword in INDEX_INT_COLUMNS:
        index[column] = _int(raw.get(column))
    if pixel_length == -1 and not transfer_syntax.is_compressed:
        raise _Decline("encapsulated pixel data in a native transfer syntax")
    if pixel_length is not None and pixel_length >= 0 and not transfer_syntax.is_compressed:
        if not all(k in raw for k in ("rows", "columns", "bits_allocated")):
            raise _Decline("native pixels without their description")
        needed = native_pixel_bytes(
            rows=_us(raw["rows"]), columns=_us(raw["columns"]), samples=_us(raw.get("samples")) or 1,
            photometric=_text(raw.get("photometric", b""), codec), frames=index["number_of_frames"] or 1,
            bits_allocated=_us(raw["bits_allocated"]),
        )
        if pixel_length < needed:
            raise _Decline("short native pixel data")  # pydicom names it
    return InstanceFacts(
        **uids,
        modality=_text(raw.get("modality", b""), codec) or None,
        patient_id=_text(raw.get("patient_id", b""), codec) or None,
        has_pixel_data=pixel_length is not None,
        truncated=None,  # a short value made the scan decline
        index=index,
    )


def _ascii(value: bytes) -> str:
    return value.decode("ascii").strip(" \x00")


def _text(value: bytes, codec: str) -> str:
    """A text value as pydicom gives it: each of its values with trailing padding removed."""
    if not value:
        return ""
    decoded = value.decode(codec)
    if "\\" in decoded:
        return "\\".join(v.rstrip(" \x00") for v in decoded.split("\\"))
    return decoded.rstrip(" \x00")


def _clip(value: str | None, size: int) -> str | None:
    return value[:size] or None if value else None


def _int(value: bytes | None) -> int | None:
    """An IS value as an int; None when absent, empty, multi-valued or not a number."""
    if not value:
        return None
    text = value.decode("ascii").strip(" \x00")
    if not text:
        return None
    return int(text)  # ValueError (multi-valued, not a number) declines: pydicom decides


def _us(value: bytes | None) -> int:
    if value is None or len(value) != 2:
        raise _Decline("US value of unexpected length")
    return int(_U16.unpack(value)[0])
