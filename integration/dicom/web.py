"""DICOMweb under /dicomweb (PS3.18): STOW-RS, QIDO-RS and WADO-RS over what MedBridge holds.

* STOW-RS ``POST /studies[/{study}]``: multipart/related; type="application/dicom". Every part
  goes through ``InstanceIngest`` (as a C-STORE does); the answer lists ReferencedSOPSequence and
  FailedSOPSequence (FailureReason = the C-STORE status): 200 all stored, 202 some failed, 409
  none stored, 415 for another content type. Stored studies are expedited to the study publisher.
* QIDO-RS ``GET /studies``, ``/studies/{s}/series``, ``/studies/{s}/series/{se}/instances``,
  ``/studies/{s}/instances``, ``/series``, ``/instances``: matching keys by keyword or tag,
  ``includefield``, ``limit``/``offset``; ``fuzzymatching`` is ignored with a Warning header.
  Matching is ``integration.dicom.query``'s, the same as C-FIND.
* WADO-RS: instances (multipart/related of the stored bytes as received), ``metadata`` (DICOM
  JSON, pixel data as a BulkDataURI to its frames), ``frames/{n}`` and ``rendered`` (PNG, JPEG, GIF; the
  ``window``, ``viewport`` and ``quality`` parameters).

Unknown UIDs answer 404, malformed queries 400, each with a ``detail`` saying what to change.
No patient data is logged: only hashed UIDs and counts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from email.message import Message
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from integration.app.auditing import request_audit
from integration.app.identity import ActorDep
from integration.app.services import Services, get_services
from integration.audit import events as audit_events
from integration.datadir import private_folder
from integration.db.tables import DicomInstance
from integration.dicom.ingest.instances import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS, InstanceIngest
from integration.dicom.ingest.limits import InstanceTooLargeError, check_part10
from integration.dicom.query import ATTRIBUTES, Query, QueryEngine, QueryError, keyword_of, tag_of
from integration.dicom.render import (
    RENDERED_FORMATS,
    PixelError,
    Rendering,
    RenderingParameterError,
    frames,
    render,
    rendering_from_query,
)
from integration.dicom.rendered_cache import RenderedCache, etag_of
from integration.errors import StoreUnavailableError
from integration.phi import uid_hash

log = logging.getLogger(__name__)

ServicesDep = Annotated[Services, Depends(get_services)]


def _audited_interaction(request: Request) -> audit_events.Interaction:
    """STOW-RS stores, QIDO-RS (a path ending in studies, series or instances) queries, the rest retrieves."""
    if request.method == "POST":
        return audit_events.DICOM_STORE
    if request.url.path.rstrip("/").rsplit("/", 1)[-1] in ("studies", "series", "instances"):
        return audit_events.DICOM_QUERY
    return audit_events.DICOM_RETRIEVE


async def _audit_request(request: Request, services: ServicesDep, actor: ActorDep) -> AsyncIterator[None]:
    """One coarse AuditEvent per DICOMweb request (not per instance): what kind, the study it names, and a
    query's keys (base64, as the FHIR searches'); recorded once the request is answered."""
    interaction = _audited_interaction(request)
    async with request_audit(services, actor, interaction) as audit:
        study = request.path_params.get("study")
        if study:
            audit.add(audit_events.study_entity(str(study)))
        if interaction is audit_events.DICOM_QUERY:
            audit.add(audit_events.query_entity(request.url.query, "QIDO-RS"))
        yield


# scope "request", as the FHIR API's (integration.app.auditing.audited): a retrieve's event once it is sent
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(_audit_request, scope="request")])

DICOM_JSON = "application/dicom+json"
STATUS_NOT_IN_STUDY = 0xA900  # STOW-RS to /studies/{study} of an instance of another study

# PS3.18 Table 10.6.1-5..7: attributes QIDO-RS returns by default, per level
_DEFAULT_RETURN = {
    "STUDY": ["SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"],
    "SERIES": ["Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
              "NumberOfFrames"],
}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _engine(services: Services) -> QueryEngine:
    return QueryEngine(services.store)


def _dicom_json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(content), status_code=status, media_type=DICOM_JSON, headers=headers)


def _content_type(value: str) -> Message:
    msg = Message()
    msg["content-type"] = value
    return msg


# ---- STOW-RS -----------------------------------------------------------------------------------


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body: (lower-cased headers, content)."""
    return list(iter_multipart(io.BytesIO(body), boundary))


_SPOOL_IN_MEMORY = 8 << 20  # a STOW-RS body up to this size stays in memory; a larger one goes to disk
_READ_CHUNK = 1 << 20


def iter_multipart(source: BinaryIO, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body read from ``source`` a chunk at a time, each yielded once it
    ends: memory holds the part being read and one chunk, never the whole body. Raises
    ``MultipartParseError`` (while iterating) for a body that is not multipart with ``boundary``."""
    parts: list[tuple[dict[str, str], bytes]] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").strip().lower()] = state["value"].decode("latin-1").strip()
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        parts.append((state["headers"], bytes(state["data"])))

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    while chunk := source.read(_READ_CHUNK):
        parser.write(chunk)
        yield from parts
        parts.clear()
    parser.finalize()
    yield from parts


async def _spool_body(request: Request, max_bytes: int, folder: Path) -> BinaryIO | None:
    """The request body in a spooled file (in memory up to a few MiB, then a private temporary file
    in ``folder``, gone once closed), or None as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return None
    private_folder(folder)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, mode="w+b", dir=str(folder))
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            spool.close()
            return None
        spool.write(chunk)
    spool.seek(0)
    return spool  # type: ignore[return-value]


def _check_parts(source: BinaryIO, boundary: str, max_instance_bytes: int) -> int:
    """How many parts the body holds, once each is known to be within the instance limit (413
    otherwise, before anything is stored) and the body to be multipart (400 otherwise)."""
    count = 0
    try:
        for _, data in iter_multipart(source, boundary):
            count += 1
            check_part10(data, max_instance_bytes)  # measured, never inflated, when deflated
    except InstanceTooLargeError as exc:
        log.warning("STOW-RS refused: %s", exc)
        raise HTTPException(413, f"{exc}; send it over DICOM (C-STORE) if the limit is meant, or ask the "
                                 "administrator to raise it") from None
    except MultipartParseError:
        log.warning("STOW-RS refused: the body is not multipart/related with its declared boundary")
        raise HTTPException(400, "the body is not a multipart/related body with the boundary its Content-Type "
                                 "declares: each part starts with --boundary, then its headers, an empty line "
                                 "and one DICOM Part 10 file; the body ends with --boundary--") from None
    source.seek(0)
    return count


def _stow_item(sop_class: str | None, sop: str | None, url: str | None = None, reason: int | None = None) -> dict:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
                            "00081155": {"vr": "UI", "Value": [sop]} if sop else {"vr": "UI"}}
    if url:
        item["00081190"] = {"vr": "UR", "Value": [url]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _store_parts(services: Services, parts: Iterable[tuple[dict[str, str], bytes]], study: str | None,
                 base: str) -> tuple[list[dict], list[dict], set[str]]:
    s = services.settings
    ingest = InstanceIngest(services.store, s.dicom_dir, min_free_bytes=s.min_free_bytes,
                            max_instance_bytes=s.dicom_max_instance_bytes)
    s.dicom_dir.mkdir(parents=True, exist_ok=True)
    stored: list[dict] = []
    failed: list[dict] = []
    studies: set[str] = set()
    for headers, data in parts:
        part_type = _content_type(headers.get("content-type", "application/dicom")).get_content_type()
        sop_class = sop = None
        try:
            if part_type != "application/dicom":
                raise InvalidDicomError(f"part of type {part_type}")
            ds = dcmread(io.BytesIO(data))
            sop_class = str(ds.get("SOPClassUID", "") or "") or None
            sop = str(ds.get("SOPInstanceUID", "") or "") or None
        except Exception as exc:  # noqa: BLE001 - any parse failure of client bytes means "cannot understand"
            log.warning("STOW-RS part refused: not a readable DICOM file (%s)", type(exc).__name__)
            failed.append(_stow_item(sop_class, sop, reason=STATUS_CANNOT_UNDERSTAND))
            continue
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            log.warning("STOW-RS instance %s refused: not in study %s", uid_hash(sop), uid_hash(study))
            failed.append(_stow_item(sop_class, sop, reason=STATUS_NOT_IN_STUDY))
            continue
        outcome = ingest.ingest(ds, data)
        if outcome.status != STATUS_SUCCESS:
            failed.append(_stow_item(sop_class, outcome.sop_instance_uid or sop, reason=outcome.status))
            continue
        study_uid = str(outcome.study_instance_uid)
        studies.add(study_uid)
        url = f"{base}/studies/{study_uid}/series/{ds.SeriesInstanceUID}/instances/{outcome.sop_instance_uid}"
        stored.append(_stow_item(sop_class, outcome.sop_instance_uid, url=url))
    return stored, failed, studies


@router.post("/studies", summary="STOW-RS: store instances")
@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def stow(request: Request, services: ServicesDep, study: str | None = None) -> Response:
    """Store the application/dicom parts of a multipart/related body (see the module docstring)."""
    ctype = _content_type(request.headers.get("content-type", ""))
    boundary = ctype.get_param("boundary")
    part_type = ctype.get_param("type")
    if ctype.get_content_type() != "multipart/related" or not isinstance(boundary, str) or not boundary or (
        part_type is not None and part_type != "application/dicom"
    ):
        raise HTTPException(415, 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
                                 "boundary=... with one DICOM Part 10 file per part")
    max_bytes = services.settings.stow_max_bytes
    # spooled to disk past a few MiB, then read a part at a time: twice (limits, then storage)
    body = await _spool_body(request, max_bytes, services.settings.dicom_dir / ".stow")
    if body is None:
        raise HTTPException(413, f"the STOW-RS request exceeds MEDBRIDGE_STOW_MAX_BYTES ({max_bytes} bytes); "
                                 "send the instances in several requests")
    base = _base(request)
    try:
        if not await asyncio.to_thread(_check_parts, body, boundary, services.settings.dicom_max_instance_bytes):
            raise HTTPException(400, "the multipart body holds no parts; send one application/dicom part per "
                                     "instance")
        stored, failed, studies = await asyncio.to_thread(
            _store_parts, services, iter_multipart(body, boundary), study, base)
    finally:
        body.close()
    if studies:
        try:
            services.store.expedite("study", sorted(studies), services.settings.study_quiet_seconds)
            services.on_study_ready()
        except StoreUnavailableError:
            log.warning("could not expedite STOW-RS studies; they will publish after the quiet period")
    log.info("STOW-RS: %d stored, %d failed", len(stored), len(failed))
    result: dict[str, Any] = {}
    if len(studies) == 1 or study:
        result["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study or next(iter(studies))}"]}
    if stored:
        result["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        result["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if stored else 409)
    return _dicom_json(result, status)


# ---- QIDO-RS -----------------------------------------------------------------------------------

_MAX_PAGE_NUMBER = 2**31 - 1


def _path_uids(keys: dict[str, str]) -> dict[str, str]:
    """The UIDs of a request path, each one UID: the query engine reads a backslash (or, in QIDO
    parameters, a comma) as a list of UIDs, which a path cannot name."""
    for keyword, uid in keys.items():
        if not uid or "\\" in uid or "," in uid:
            raise HTTPException(400, f"{keyword} in the path must be one UID (digits and dots, at most 64), "
                                     "not a list")
    return dict(keys)


def _qido_query(request: Request, level: str, path_keys: dict[str, str]) -> tuple[Query, int | None, int, bool]:
    query = Query(level, _path_uids(path_keys))
    limit: int | None = None
    offset = 0
    fuzzy = False
    include: list[str] = []
    for name, value in request.query_params.multi_items():
        if name == "includefield":
            include.extend(v.strip() for v in value.split(",") if v.strip())
        elif name in ("limit", "offset"):
            # ASCII digits only (int() takes '١' and '1_0'). A limit above the server's maximum is
            # capped; an offset past what the database's OFFSET takes would be its error (a 500), so
            # it stops at the largest 32-bit number
            digits = value.strip()
            if not re.fullmatch(r"[0-9]+", digits):
                raise HTTPException(400, f"{name} must be a non-negative integer")
            number = int(digits) if len(digits) <= 10 else _MAX_PAGE_NUMBER + 1
            if name == "offset" and number > _MAX_PAGE_NUMBER:
                raise HTTPException(400, f"offset must be at most {_MAX_PAGE_NUMBER}")
            if name == "limit":
                limit = number
            else:
                offset = number
        elif name == "fuzzymatching":
            fuzzy = value.lower() == "true"
        else:
            try:
                keyword = keyword_of(tag_of(name))
            except QueryError as exc:
                raise HTTPException(
                    400, f"{exc}; use a keyword such as PatientName or a tag such as 00100010") from None
            if keyword not in ATTRIBUTES:
                raise HTTPException(400, f"{keyword}: MedBridge cannot match on this attribute; "
                                         f"matching keys are {', '.join(sorted(ATTRIBUTES))}")
            # QIDO-RS UID lists may be separated by commas (PS3.18 8.3.4.1)
            query.keys[keyword] = value.replace(",", "\\") if ATTRIBUTES[keyword].vr == "UI" else value
    defaults = {"STUDY": ["STUDY"], "SERIES": ["SERIES"], "IMAGE": ["IMAGE"]}[level]
    if "StudyInstanceUID" not in path_keys and level != "STUDY":
        defaults = ["STUDY", *defaults]
    if level == "IMAGE" and "SeriesInstanceUID" not in path_keys:
        defaults = ["SERIES", *defaults]
    tags = [tag_of(k) for d in defaults for k in _DEFAULT_RETURN[d]]
    tags += [tag_of(k) for k in query.keys]
    for item in include:
        if item == "all":
            query.all_fields = True
            continue
        try:
            tags.append(tag_of(item))
        except QueryError as exc:
            raise HTTPException(400, f"includefield {exc}") from None
    query.return_tags = list(dict.fromkeys(tags))
    return query, limit, offset, fuzzy


def _qido(request: Request, services: Services, level: str, path_keys: dict[str, str]) -> Response:
    query, limit, offset, fuzzy = _qido_query(request, level, path_keys)
    # at most MEDBRIDGE_QIDO_MAX_RESULTS per response, one more fetched to tell whether there are more
    most = services.settings.qido_max_results
    take = most if limit is None else min(limit, most)
    try:
        matches = _engine(services).find(query, limit=take + 1, offset=offset)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    warnings = []
    if len(matches) > take:
        matches = matches[:take]
        if limit is None or limit > most:
            # the Warning PS3.18 8.3.4.4 prescribes; the client pages on with offset
            warnings.append('299 MedBridge: "The number of results exceeded the maximum supported by the server. '
                            'Additional results can be requested."')
    base = _base(request)
    for match in matches:
        url = f"{base}/studies/{match['0020000D']['Value'][0]}"
        if level in ("SERIES", "IMAGE"):
            url += f"/series/{match['0020000E']['Value'][0]}"
        if level == "IMAGE":
            url += f"/instances/{match['00080018']['Value'][0]}"
        match["00081190"] = {"vr": "UR", "Value": [url]}
    if fuzzy:
        warnings.append('299 MedBridge: "The fuzzymatching parameter is not supported. Only literal matching '
                        'has been performed."')
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    log.info("QIDO-RS %s level: %d matches", level, len(matches))
    return _dicom_json([dict(sorted(m.items())) for m in matches], headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "STUDY", {})


@router.get("/series", summary="QIDO-RS: search for series")
def search_all_series(request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "SERIES", {})


@router.get("/instances", summary="QIDO-RS: search for instances")
def search_all_instances(request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "IMAGE", {})


@router.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
def search_series(study: str, request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "SERIES", {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
def search_study_instances(study: str, request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "IMAGE", {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for instances of a series")
def search_instances(study: str, series: str, request: Request, services: ServicesDep) -> Response:
    return _qido(request, services, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series})


# ---- WADO-RS -----------------------------------------------------------------------------------


def _rows(
    services: Services, study: str, series: str | None = None, instance: str | None = None
) -> list[DicomInstance]:
    keys = {"StudyInstanceUID": study}
    level = "STUDY"
    if series is not None:
        keys["SeriesInstanceUID"] = series
        level = "SERIES"
    if instance is not None:
        keys["SOPInstanceUID"] = instance
        level = "IMAGE"
    try:
        rows = _engine(services).instances(Query(level, _path_uids(keys)))
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    # a series or instance UID under another study (or series) is not found here
    rows = [r for r in rows if r.study_instance_uid == study and (series is None or r.series_instance_uid == series)]
    if not rows:
        what = "instance" if instance else ("series" if series else "study")
        raise HTTPException(404, f"MedBridge holds no {what} with these UIDs; search with QIDO-RS "
                                 "(GET /dicomweb/studies) to see what it holds")
    return rows


def _accepted(request: Request) -> list[tuple[str, Message]]:
    """The Accept header's media ranges, each as (media type or the multipart's type, parameters)."""
    out = []
    for item in (request.headers.get("accept") or "*/*").split(","):
        if not item.strip():
            continue
        parsed = _content_type(item.strip())
        media = parsed.get_content_type()
        if media == "multipart/related":
            inner = parsed.get_param("type")
            media = inner.lower() if isinstance(inner, str) else "*/*"
        if item.strip().startswith("*/*"):
            media = "*/*"
        out.append((media, parsed))
    return out


def _wanted_syntax(request: Request) -> str | None:
    """The transfer syntax the client asks application/dicom in; None: as stored."""
    for media, params in _accepted(request):
        if media in ("application/dicom", "*/*", "application/*"):
            syntax = params.get_param("transfer-syntax")
            return None if not isinstance(syntax, str) or syntax == "*" else syntax
    raise HTTPException(406, 'instances are served as multipart/related; type="application/dicom"')


def _instance_bytes(row: DicomInstance, syntax: str | None) -> tuple[bytes, str]:
    path = Path(row.path)
    if syntax is None or syntax == row.transfer_syntax_uid:
        return path.read_bytes(), row.transfer_syntax_uid
    ds = dcmread(path)
    target = UID(syntax)
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            if target.is_compressed:
                raise ValueError("compressed to compressed")
            ds.decompress()
        if target.is_compressed:
            ds.compress(target)
        ds.file_meta.TransferSyntaxUID = target
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - any transcoding failure means "not acceptable"
        raise HTTPException(406, f"the instance cannot be served in transfer syntax {syntax}; ask for "
                                 f"transfer-syntax=* (as stored) or {ExplicitVRLittleEndian}") from exc
    return out.getvalue(), syntax


def _multipart(parts: Iterator[tuple[bytes, str]], part_type: str) -> StreamingResponse:
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for data, media_type in parts:
            yield f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


def _retrieve(request: Request, rows: list[DicomInstance]) -> StreamingResponse:
    syntax = _wanted_syntax(request)
    if syntax is not None:
        # the first is transcoded (or refused: 406) before the 200 is sent, the others one at a time
        # as the body streams: a study's transcoded instances together need not fit in memory
        first = _instance_bytes(rows[0], syntax)

        def transcoded() -> Iterator[tuple[bytes, str]]:
            yield first
            for row in rows[1:]:
                try:
                    yield _instance_bytes(row, syntax)
                except HTTPException:
                    log.error("WADO-RS retrieve cut short: an instance cannot be transcoded")
                    return

        parts: Iterator[tuple[bytes, str]] = (
            (data, f"application/dicom; transfer-syntax={ts}") for data, ts in transcoded())
    else:
        parts = ((Path(r.path).read_bytes(), f"application/dicom; transfer-syntax={r.transfer_syntax_uid}")
                 for r in rows)
    log.info("WADO-RS: %d instances", len(rows))
    return _multipart(parts, "application/dicom")


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(study: str, request: Request, services: ServicesDep) -> StreamingResponse:
    return _retrieve(request, _rows(services, study))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(study: str, series: str, request: Request, services: ServicesDep) -> StreamingResponse:
    return _retrieve(request, _rows(services, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: retrieve an instance")
def retrieve_instance(study: str, series: str, instance: str, request: Request,
                      services: ServicesDep) -> StreamingResponse:
    return _retrieve(request, _rows(services, study, series, instance))


def _metadata(request: Request, services: Services, rows: list[DicomInstance]) -> Response:
    base = _base(request)
    _engine(services).with_json(rows)
    out = []
    for row in rows:
        meta = dict(row.dicom_json or {})
        meta["00083002"] = {"vr": "UI", "Value": [row.transfer_syntax_uid]}  # AvailableTransferSyntaxUID
        if row.is_image or "00280010" in meta:
            count = _frame_total(row)
            url = (f"{base}/studies/{row.study_instance_uid}/series/{row.series_instance_uid}/instances/"
                   f"{row.sop_instance_uid}/frames/{','.join(str(n) for n in range(1, count + 1))}")
            meta["7FE00010"] = {"vr": "OW", "BulkDataURI": url}
        out.append(dict(sorted(meta.items())))
    return _dicom_json(out)


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
def study_metadata(study: str, request: Request, services: ServicesDep) -> Response:
    return _metadata(request, services, _rows(services, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
def series_metadata(study: str, series: str, request: Request, services: ServicesDep) -> Response:
    return _metadata(request, services, _rows(services, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata", summary="WADO-RS: instance metadata")
def instance_metadata(study: str, series: str, instance: str, request: Request, services: ServicesDep) -> Response:
    return _metadata(request, services, _rows(services, study, series, instance))


MAX_FRAME_LIST = 1000  # frame numbers one request may name (each costs a decode or a copy)


def _frame_numbers(value: str) -> list[int]:
    if value.count(",") >= MAX_FRAME_LIST:
        raise HTTPException(400, f"a frame list names at most {MAX_FRAME_LIST} frames; ask in several requests")
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise HTTPException(400, f"frame list {value!r} must be 1-based frame numbers separated by commas, e.g. 1,2")
    return numbers


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}",
            summary="WADO-RS: retrieve frames")
def retrieve_frames(study: str, series: str, instance: str, frame_list: str, request: Request,
                    services: ServicesDep) -> StreamingResponse:
    """Compressed frames as stored with their media type, native ones as application/octet-stream;
    a client that accepts only application/octet-stream gets compressed frames decoded."""
    numbers = _frame_numbers(frame_list)
    row = _rows(services, study, series, instance)[0]
    accepted = _accepted(request)
    ds = dcmread(row.path)
    # anything beyond plain octet-stream (image/jp2, */*, or octet-stream; transfer-syntax=*) takes frames as stored
    as_stored = any(media != "application/octet-stream" or params.get_param("transfer-syntax") == "*"
                    for media, params in accepted)
    try:
        out = frames(ds, numbers, decode=not as_stored)
    except PixelError as exc:
        raise HTTPException(404 if "does not exist" in str(exc) else 406, str(exc)) from None
    part_type = out[0][1].split(";")[0]
    return _multipart(iter(out), part_type)


def _rendered_media_type(request: Request) -> str:
    accepted = [media for media, _ in _accepted(request)]
    media_type = next((m for m in accepted if m in RENDERED_FORMATS), None)
    if media_type is None:
        if not any(m in ("*/*", "image/*") for m in accepted):
            raise HTTPException(406, "rendered images are served as image/jpeg, image/png or image/gif")
        media_type = "image/jpeg"
    return media_type


def _rendering(request: Request, **defaults: str) -> Rendering:
    try:
        return rendering_from_query({**defaults, **request.query_params})
    except RenderingParameterError as exc:
        raise HTTPException(400, str(exc)) from None


def _frame_total(row: DicomInstance) -> int:
    return int(row.number_of_frames or 1)


def _render(row: DicomInstance, numbers: list[int], media_type: str, rendering: Rendering) -> list[bytes]:
    """Frames ``numbers`` of the instance rendered, its file read once."""
    ds = dcmread(row.path)
    try:
        return [render(ds, n, media_type=media_type, rendering=rendering) for n in numbers]
    except RenderingParameterError as exc:
        raise HTTPException(400, str(exc)) from None
    except PixelError as exc:
        raise HTTPException(404 if "does not exist" in str(exc) else 406, str(exc)) from None


def _asks_multipart(request: Request) -> bool:
    return any(params.get_content_type() == "multipart/related" for _, params in _accepted(request))


def _rendered_cache(request: Request) -> RenderedCache:
    """The app's cache of rendered frames (made on first use: one per app, not per process)."""
    cache = getattr(request.app.state, "rendered_cache", None)
    if cache is None:
        cache = request.app.state.rendered_cache = RenderedCache()
    return cache  # type: ignore[no-any-return]


def _one_rendered(request: Request, row: DicomInstance, number: int, media_type: str,
                  rendering: Rendering) -> Response:
    """One frame rendered, from the cache when it was rendered before; with an ETag (a scroll back is a
    304 when the browser kept it) and private caching (the image is of a patient)."""
    key = (row.sop_instance_uid, row.size, number, media_type, rendering)
    etag = etag_of(key)
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if etag in (request.headers.get("if-none-match") or ""):
        return Response(status_code=304, headers=headers)
    cache = _rendered_cache(request)
    image = cache.get(key)
    if image is None:
        image = _render(row, [number], media_type, rendering)[0]
        cache.put(key, image)
    return Response(image, media_type=media_type, headers=headers)


def _rendered_frames(request: Request, row: DicomInstance, numbers: list[int]) -> Response:
    """Frames rendered as multipart/related of images when the Accept header asks for it; else one
    frame as the image itself (a single-frame media type holds one frame)."""
    media_type, rendering = _rendered_media_type(request), _rendering(request)
    if not _asks_multipart(request):
        if len(numbers) > 1:
            raise HTTPException(406, f'several frames are served as multipart/related; type="{media_type}": '
                                     "ask for that, or for one frame")
        return _one_rendered(request, row, numbers[0], media_type, rendering)
    images = _render(row, numbers, media_type, rendering)
    return _multipart(((image, media_type) for image in images), media_type)


def _rendered_instances(request: Request, rows: list[DicomInstance]) -> StreamingResponse:
    """Every frame of every image of a study or series, rendered, as multipart/related; objects without
    pixel data (SR, RT plans, ...) have no rendering here and are left out. Streamed a frame at a
    time (a study's frames together would not fit in memory); the first is rendered before the 200
    is sent, so a request that cannot succeed gets a status. A later frame that fails ends the body
    early (logged), as a connection cut would."""
    images = _images(rows, "to render")
    media_type, rendering = _rendered_media_type(request), _rendering(request)
    first = _render(images[0], [1], media_type, rendering)[0]

    def parts() -> Iterator[tuple[bytes, str]]:
        yield first, media_type
        count = 1
        try:
            for index, row in enumerate(images):
                ds = dcmread(row.path)
                for number in range(2 if index == 0 else 1, _frame_total(row) + 1):
                    yield render(ds, number, media_type=media_type, rendering=rendering), media_type
                    count += 1
        except (PixelError, RenderingParameterError, OSError) as exc:
            log.error("WADO-RS rendered retrieve cut short after %d frames: %s", count, type(exc).__name__)
            return
        log.info("WADO-RS: %d rendered frames", count)

    return _multipart(parts(), media_type)


def _images(rows: list[DicomInstance], purpose: str) -> list[DicomInstance]:
    """The rows that are images; 406 when there is none (SR, RT plans, ... have no pixel data)."""
    images = [r for r in rows if r.is_image]
    if not images:
        raise HTTPException(406, f"none of these instances has pixel data {purpose}")
    return images


def _representative(rows: list[DicomInstance]) -> DicomInstance:
    """The image a study's or series' thumbnail shows: the middle one (by instance number) of its first
    series with images, as a viewer would open it."""
    images = _images(rows, "for a thumbnail")
    series = min(r.series_instance_uid for r in images)
    ordered = sorted((r for r in images if r.series_instance_uid == series),
                     key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_instance_uid))
    return ordered[len(ordered) // 2]


THUMBNAIL_VIEWPORT = "128,128"


def _thumbnail(request: Request, row: DicomInstance, number: int = 1) -> Response:
    """PS3.18 10.4.1.1.4: one small rendered image; 128 x 128 at most unless a viewport says otherwise."""
    media_type = _rendered_media_type(request)
    rendering = _rendering(request, viewport=THUMBNAIL_VIEWPORT)
    return _one_rendered(request, row, number, media_type, rendering)


@router.get("/studies/{study}/rendered", summary="WADO-RS: rendered study")
def retrieve_study_rendered(study: str, request: Request, services: ServicesDep) -> StreamingResponse:
    return _rendered_instances(request, _rows(services, study))


@router.get("/studies/{study}/series/{series}/rendered", summary="WADO-RS: rendered series")
def retrieve_series_rendered(study: str, series: str, request: Request, services: ServicesDep) -> StreamingResponse:
    return _rendered_instances(request, _rows(services, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered", summary="WADO-RS: rendered instance")
def retrieve_rendered(study: str, series: str, instance: str, request: Request, services: ServicesDep) -> Response:
    """Every frame as multipart/related when the Accept header asks for it, else the first."""
    row = _rows(services, study, series, instance)[0]
    count = _frame_total(row) if _asks_multipart(request) else 1
    return _rendered_frames(request, row, list(range(1, count + 1)))


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}/rendered",
            summary="WADO-RS: rendered frames")
def retrieve_frame_rendered(study: str, series: str, instance: str, frame_list: str, request: Request,
                            services: ServicesDep) -> Response:
    return _rendered_frames(request, _rows(services, study, series, instance)[0], _frame_numbers(frame_list))


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail")
def study_thumbnail(study: str, request: Request, services: ServicesDep) -> Response:
    return _thumbnail(request, _representative(_rows(services, study)))


@router.get("/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: series thumbnail")
def series_thumbnail(study: str, series: str, request: Request, services: ServicesDep) -> Response:
    return _thumbnail(request, _representative(_rows(services, study, series)))


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail", summary="WADO-RS: instance thumbnail")
def instance_thumbnail(study: str, series: str, instance: str, request: Request, services: ServicesDep) -> Response:
    row = _rows(services, study, series, instance)[0]
    return _thumbnail(request, row, (_frame_total(row) + 1) // 2)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail",
            summary="WADO-RS: frame thumbnail")
def frame_thumbnail(study: str, series: str, instance: str, frame: int, request: Request,
                    services: ServicesDep) -> Response:
    return _thumbnail(request, _rows(services, study, series, instance)[0], frame)
