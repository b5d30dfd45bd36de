"""DICOM export of AI results: a Comprehensive SR of the findings and a Secondary Capture of the
heatmap overlay, built with highdicom, and the DICOM SEG of each segmentation, sent to a PACS by C-STORE
(we are the SCU).

The SEG is built by the imaging worker (inference.imaging.segmentation) and kept in the artifact store; it
is sent as stored, with every version of the SR (which names its segments' volumes and references it), so
a PACS that holds the SR holds the SEG it points at.

Both objects go into the source study (same Study Instance UID, patient and study modules copied
from the source images by highdicom), each in a new series. Their Series and SOP Instance UIDs
derive from the report id, so a retry or a replay re-sends the same objects rather than new ones
(the PACS keeps one copy).

A clinician's review makes a new version of both (``ReviewOutcome``): an SR that is final and
verified by the reviewer, says whether the result was confirmed, amended or entered in error (with
the amended conclusion and the reviewer's comment), and names the previous version as its
predecessor; and an SC whose comments say the same. Their UIDs derive from the report id and the
review's number, so each review is one new version, however often it is sent.

Nothing here logs patient data: callers log hashed UIDs and report ids only.
"""

from __future__ import annotations

import io
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt

from integration.db.artifacts import ArtifactNotFoundError
from integration.db.tables import AiResult, DicomInstance, stable_id
from integration.dicom.network.requestor import adapt_requests

MANUFACTURER = "MedBridge"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PRELIMINARY_STATEMENT = (
    "AI-generated, preliminary result from a demonstration model, not for clinical use; "
    "it has not been reviewed by a clinician."
)
# Codes for concepts DICOM/LOINC do not name are in a private scheme ("99" prefix, PS3.16 8.2).
MEDBRIDGE_SCHEME = "99MEDBRIDGE"
PROBABILITY = hd.sr.CodedConcept("ai-probability", MEDBRIDGE_SCHEME, "AI probability")
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging study")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
REVIEW_OUTCOME = hd.sr.CodedConcept("review-outcome", MEDBRIDGE_SCHEME, "Clinician review outcome")
REVIEW_COMMENT = hd.sr.CodedConcept("review-comment", MEDBRIDGE_SCHEME, "Reviewer comment")
AMENDED_CONCLUSION = hd.sr.CodedConcept("amended-conclusion", MEDBRIDGE_SCHEME, "Amended conclusion")
# DICOM wants the verifier's organisation (Type 1); MedBridge knows only that the review was made in it
VERIFYING_ORGANIZATION = "MedBridge review"
OUTCOME_STATEMENTS = {
    "final": "Reviewed by a clinician: the AI result is confirmed (final).",
    "amended": "Reviewed by a clinician: the AI result is amended; see the amended conclusion.",
    "entered-in-error": "Reviewed by a clinician: the AI result is entered in error and must not be used.",
}
DEMO_MODEL_NOTE = "AI-generated from a demonstration model, not for clinical use."
SEGMENTATION = hd.sr.CodedConcept("113076", "DCM", "Segmentation")
MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")


class ExportBuildError(Exception):
    """The AI result cannot become DICOM objects (no source image on disk, no analysed image)."""


class ExportSendError(Exception):
    """The destination could not be reached or refused an object; ``str()`` holds no patient data."""


@dataclass(frozen=True)
class ReviewOutcome:
    """A clinician's decision on a report, which a new SR and SC version carries to the PACS.
    ``number``: 1 for the report's first review, 2 for the next, ..."""

    number: int
    action: Literal["final", "amended", "entered-in-error"]
    reviewer: str
    at: datetime
    comment: str | None = None
    conclusion: str | None = None  # the amended conclusion

    @property
    def statement(self) -> str:
        return f"{OUTCOME_STATEMENTS[self.action]} {DEMO_MODEL_NOTE}"


def version_part(part: str, review_number: int) -> str:
    """The UID name of ``part`` (e.g. 'sr-instance') in the preliminary version (0) or a review's."""
    return part if review_number == 0 else f"{part}-review-{review_number}"


def _number(review: ReviewOutcome | None) -> int:
    return 0 if review is None else review.number


def previous_sr(report_id: str, review: ReviewOutcome, study_uid: str) -> Dataset:
    """What a review's SR names as its predecessor: the version before it (the preliminary SR, or
    the previous review's), by its derived UIDs."""
    before = review.number - 1
    ref = Dataset()
    ref.StudyInstanceUID = study_uid
    ref.SeriesInstanceUID = export_uid(report_id, version_part("sr-series", before))
    ref.SOPClassUID = ComprehensiveSRStorage
    ref.SOPInstanceUID = export_uid(report_id, version_part("sr-instance", before))
    return ref


@dataclass(frozen=True)
class ExportObjects:
    """What one report exports: the SR, the SC when a heatmap exists, the SEG of each segmentation."""

    sr: Dataset
    sc: Dataset | None
    segs: tuple[Dataset, ...] = ()

    @property
    def datasets(self) -> list[Dataset]:
        """In sending order: the objects the SR references first, the SR last."""
        return [*([] if self.sc is None else [self.sc]), *self.segs, self.sr]


def export_uid(report_id: str, part: str) -> str:
    """A deterministic UID for a derived object of a report (``part`` is e.g. 'sr-series'): the
    2.25 form of a name-based UUID (PS3.5 B.2). pydicom's ``generate_uid(prefix=None)`` would
    ignore its entropy sources and return a random one."""
    return f"2.25.{uuid.UUID(stable_id('dicom-export', report_id, part)).int}"


def finding_concept(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name[:64], MEDBRIDGE_SCHEME, name.replace("_", " ")[:64])


def overlay_pixels(png: bytes) -> np.ndarray:
    """The heatmap overlay (the PNG the API serves to the viewer) as an RGB uint8 array."""
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _headers(path: str) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS patient axes)


def _direction_letters(cosines: list[float]) -> str:
    """The Patient Orientation letters of a direction, dominant axis first (PS3.3 C.7.6.1.1.1)."""
    order = sorted(range(3), key=lambda i: abs(cosines[i]), reverse=True)
    letters = [_AXIS_LETTERS[i][0 if cosines[i] > 0 else 1] for i in order if abs(cosines[i]) > 0.25]
    return "".join(letters) or "L"


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """Row and column directions of the source image: its Patient Orientation, else derived from
    Image Orientation (Patient); an image with neither is taken as an axial slice (L, P)."""
    if len(source.get("PatientOrientation") or []) == 2:
        row, col = (str(v) for v in source.PatientOrientation)
        return row, col
    iop = [float(v) for v in source.get("ImageOrientationPatient") or []]
    if len(iop) == 6:
        return _direction_letters(iop[:3]), _direction_letters(iop[3:])
    return "L", "P"


def build_secondary_capture(report_id: str, source: Dataset, png: bytes,
                            review: ReviewOutcome | None = None) -> Dataset:
    """An RGB Secondary Capture of the heatmap overlay (PNG bytes), in the source image's study; with
    ``review``, the version that carries the clinician's decision."""
    pixels = overlay_pixels(png)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=patient_orientation(source),
        series_instance_uid=export_uid(report_id, version_part("sc-series", _number(review))),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=export_uid(report_id, version_part("sc-instance", _number(review))),
        instance_number=1 if review is None else review.number + 1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI heatmap overlay ({_state(review)})",
    )
    sc.ImageComments = PRELIMINARY_STATEMENT if review is None else review.statement
    sc.BurnedInAnnotation = "NO"
    # the SC stands for the source image it was derived from
    derived = Dataset()
    derived.ReferencedSOPClassUID = source.SOPClassUID
    derived.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [derived]
    return sc


def seg_dataset(data: bytes) -> Dataset:
    """A stored SEG (Part 10 bytes, deflated or not) as a dataset to send: decoded in memory, it is sent
    in whichever uncompressed transfer syntax the peer accepts."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def segmentation_items(details: dict[str, Any], segs: dict[str, Dataset]) -> list[hd.sr.ContentItem]:
    """One Segmentation container per stored SEG: the model, and per segment the structure, its volume
    (mL) and a reference to the segment in the SEG."""
    items: list[hd.sr.ContentItem] = []
    for found in details.get("segmentations") or []:
        seg = segs.get(found["sop_instance_uid"])
        if seg is None:
            continue
        group = hd.sr.ContainerContentItem(name=SEGMENTATION, relationship_type="CONTAINS")
        children: list[hd.sr.ContentItem] = [
            hd.sr.TextContentItem(ALGORITHM_NAME, str(found["model_name"])[:64], "HAS OBS CONTEXT"),
            hd.sr.TextContentItem(ALGORITHM_VERSION, str(found["model_version"])[:64], "HAS OBS CONTEXT"),
        ]
        for segment in found["segments"]:
            site = segment["body_site"]
            children.append(hd.sr.CodeContentItem(
                codes.DCM.Finding, hd.sr.CodedConcept(site["code"], _scheme(site["system"]), site["display"]),
                "CONTAINS"))
            children.append(hd.sr.NumContentItem(codes.SCT.Volume, float(segment["volume_ml"]), MILLILITRE,
                                                 relationship_type="CONTAINS"))
            children.append(hd.sr.ImageContentItem(
                codes.DCM.Segmentation, seg.SOPClassUID, seg.SOPInstanceUID,
                referenced_segment_numbers=int(segment["segment_number"]), relationship_type="INFERRED FROM"))
        group.ContentSequence = hd.sr.ContentSequence(children)
        items.append(group)
    return items


def _scheme(system: str) -> str:
    """The DICOM coding scheme of a FHIR system (the SEG's codes are SNOMED CT or DCM)."""
    return {"http://snomed.info/sct": "SCT", "http://dicom.nema.org/resources/ontology/DCM": "DCM"}.get(
        system, MEDBRIDGE_SCHEME)


def build_sr(
    report_id: str,
    details: dict[str, Any],
    sources: dict[str, Dataset],
    sc: Dataset | None,
    threshold: float = 0.5,
    review: ReviewOutcome | None = None,
    segs: dict[str, Dataset] | None = None,
) -> Dataset:
    """A Comprehensive SR: algorithm name/version, the preliminary statement, per analysed
    image one Findings container (finding code, probability, source image reference), and per
    segmentation (``segs``: the SEGs by SOP Instance UID) one Segmentation container. With
    ``review``: final and verified by the reviewer, with the review's outcome instead of the
    preliminary statement."""
    segs = segs or {}
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id=None)
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(ALGORITHM_NAME, str(details.get("model_name") or "unknown"), "HAS OBS CONTEXT"),
        hd.sr.TextContentItem(ALGORITHM_VERSION, str(details.get("model_version") or "unknown"), "HAS OBS CONTEXT"),
        *_statement_items(review),
    ]
    header_items = len(items)
    for inst in details.get("instances", []):
        source = sources.get(inst["sop_instance_uid"])
        if source is None:
            continue
        group = hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type="CONTAINS")
        children: list[hd.sr.ContentItem] = []
        for name, probability in inst["probabilities"].items():
            children.append(hd.sr.CodeContentItem(codes.DCM.Finding, finding_concept(name), "CONTAINS"))
            children.append(
                hd.sr.NumContentItem(PROBABILITY, float(probability), UNITLESS, relationship_type="CONTAINS")
            )
            verdict = "suspected" if probability >= threshold else "not detected"
            children.append(
                hd.sr.TextContentItem(codes.DCM.Conclusion, f"{name.replace('_', ' ')}: {verdict}", "CONTAINS")
            )
        children.append(
            hd.sr.ImageContentItem(
                codes.DCM.SourceOfMeasurement, source.SOPClassUID, source.SOPInstanceUID,
                relationship_type="INFERRED FROM",
            )
        )
        group.ContentSequence = hd.sr.ContentSequence(children)
        items.append(group)
    items.extend(segmentation_items(details, segs))
    if len(items) == header_items:
        raise ExportBuildError(f"report {report_id} has no analysed image whose source is on disk, nor a SEG")
    if sc is not None:
        items.append(
            hd.sr.ImageContentItem(
                hd.sr.CodedConcept("121200", "DCM", "Illustration of ROI"),
                sc.SOPClassUID, sc.SOPInstanceUID, relationship_type="CONTAINS",
            )
        )
    root.ContentSequence = hd.sr.ContentSequence(items)
    evidence = list(sources.values()) + ([sc] if sc is not None else []) + list(segs.values())
    study_uid = evidence[0].StudyInstanceUID
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=export_uid(report_id, version_part("sr-series", _number(review))),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=export_uid(report_id, version_part("sr-instance", _number(review))),
        instance_number=1 if review is None else review.number + 1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=review is not None,
        is_verified=review is not None,
        verifying_observer_name=None if review is None else _person_name(review.reviewer),
        verifying_organization=None if review is None else VERIFYING_ORGANIZATION,
        previous_versions=None if review is None else [previous_sr(report_id, review, study_uid)],
        series_description=f"AI findings ({_state(review)})",
    )
    if review is not None:
        # highdicom stamps the time of building; the verification happened when the reviewer decided
        sr.VerifyingObserverSequence[0].VerificationDateTime = review.at.strftime("%Y%m%d%H%M%S")
    return sr


def _state(review: ReviewOutcome | None) -> str:
    return "preliminary" if review is None else review.action.replace("-", " ")


def _person_name(reviewer: str) -> str:
    """The reviewer as a DICOM person name. MedBridge has the name as typed, not its parts, so it
    is one component (a PN component holds 64 characters and no '^', '=' or backslash); the trailing
    '^' says it is one component, not a family name missing its given name."""
    name = reviewer.replace("^", " ").replace("=", " ").replace("\\", " ").strip()[:64] or "unknown reviewer"
    return f"{name}^"


def _statement_items(review: ReviewOutcome | None) -> list[hd.sr.ContentItem]:
    """What the SR says about its own standing: preliminary, or the clinician's decision."""
    if review is None:
        return [hd.sr.TextContentItem(codes.DCM.Comment, PRELIMINARY_STATEMENT, "CONTAINS")]
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(codes.DCM.Comment, review.statement, "CONTAINS"),
        hd.sr.TextContentItem(REVIEW_OUTCOME, review.action, "CONTAINS"),
    ]
    if review.action == "amended" and review.conclusion:
        items.append(hd.sr.TextContentItem(AMENDED_CONCLUSION, review.conclusion, "CONTAINS"))
    if review.comment:
        items.append(hd.sr.TextContentItem(REVIEW_COMMENT, review.comment, "CONTAINS"))
    return items


def build_export(
    ai: AiResult, instances: list[DicomInstance], read_artifact: Callable[[str], bytes],
    review: ReviewOutcome | None = None,
) -> ExportObjects:
    """The SR (and SC) for an imaging AI result; ``instances`` are the study's stored instances;
    ``read_artifact`` gives the bytes of an artifact by id (the store's, raising ArtifactNotFoundError).
    With ``review``, the version that carries that review's decision.

    Raises ExportBuildError when none of the analysed images is still on disk and there is no SEG, or a
    SEG the result names is not in the artifact store. A heatmap the artifact store does not hold leaves
    the SC out, as a result without a heatmap does.
    """
    segs = stored_segs(ai, read_artifact)
    paths = {i.sop_instance_uid: i.path for i in instances}
    findings = [f for f in ai.details.get("instances", []) if f["sop_instance_uid"] in paths]
    sources: dict[str, Dataset] = {}
    for f in findings:
        path = paths[f["sop_instance_uid"]]
        if Path(path).is_file():
            sources[f["sop_instance_uid"]] = _headers(path)
    if not sources and not segs:
        raise ExportBuildError(f"report {ai.report_id}: none of the analysed images is stored any more")
    # the heatmap of the highest-probability image, as the FHIR report's presentedForm
    ranked = sorted(
        (f for f in findings if f["sop_instance_uid"] in sources),
        key=lambda f: max(f["probabilities"].values(), default=0.0),
        reverse=True,
    )
    sc = None
    png = _heatmap(ranked[0].get("heatmap_artifact_id"), read_artifact) if ranked else None
    if png is not None:
        sc = build_secondary_capture(ai.report_id, sources[ranked[0]["sop_instance_uid"]], png, review)
    sr = build_sr(ai.report_id, ai.details, sources, sc, review=review, segs=segs)
    return ExportObjects(sr=sr, sc=sc, segs=tuple(segs.values()))


def stored_segs(ai: AiResult, read_artifact: Callable[[str], bytes]) -> dict[str, Dataset]:
    """The SEG of each segmentation of the result, by SOP Instance UID. A SEG missing from the artifact
    store is an ExportBuildError: unlike a heatmap it is the result itself, and an SR without it would
    point at nothing."""
    segs: dict[str, Dataset] = {}
    for found in (ai.details or {}).get("segmentations") or []:
        try:
            segs[found["sop_instance_uid"]] = seg_dataset(read_artifact(found["seg_artifact_id"]))
        except ArtifactNotFoundError as exc:
            raise ExportBuildError(f"report {ai.report_id}: its SEG is not in the artifact store") from exc
    return segs


def _heatmap(artifact_id: str | None, read_artifact: Callable[[str], bytes]) -> bytes | None:
    if not artifact_id:
        return None
    try:
        return read_artifact(artifact_id)
    except ArtifactNotFoundError:
        return None


def _set_nodelay(event: evt.Event) -> None:
    # one small PDU exchange per object: Nagle's algorithm would add ~40 ms to each on loopback
    dul_socket = event.assoc.dul.socket
    sock = dul_socket.socket if dul_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_datasets(
    datasets: list[Dataset],
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float = 30.0,
) -> None:
    """C-STORE every dataset on one association. Success and warning (0xB...) statuses count as
    stored; anything else, or an association that cannot be made, raises ExportSendError."""
    adapt_requests()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)])
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise ExportSendError(
            f"{called_ae} at {host}:{port} {what}; check the peer is running and accepts calling AE {calling_ae}"
        )
    try:
        for ds in datasets:
            sop_class = ds.SOPClassUID.name if hasattr(ds.SOPClassUID, "name") else str(ds.SOPClassUID)
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise ExportSendError(f"{called_ae} did not answer the C-STORE of a {sop_class} (timeout or abort)")
            if code != 0x0000 and (code & 0xF000) != 0xB000:
                raise ExportSendError(f"{called_ae} refused a {sop_class} with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (for tests and archives)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
