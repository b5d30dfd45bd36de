"""One query engine over what MedBridge holds, shared by C-FIND (DIMSE) and QIDO-RS (DICOMweb).

* :func:`index_fields` extracts, at ingest, the attributes queries match on (columns of
  ``DicomInstance``), from non-pixel attributes only. The DICOM JSON of the non-bulk attributes
  (``dicom_json``: includefield, WADO-RS metadata) is cached on the row the first time it is needed.
* :class:`QueryEngine` answers a :class:`Query` (level + matching keys) at the PATIENT, STUDY,
  SERIES or IMAGE level, in SQL: single value matching, wildcards ``*``/``?`` (case-sensitive,
  except PN which matches case-insensitively, PS3.4 C.2.2.2), date and time ranges, UID lists,
  universal matching, and the computed attributes (number of related series/instances,
  ModalitiesInStudy). Each match is returned as a DICOM JSON object (PS3.18 F.2).

Errors: :class:`QueryError` (a ``ValueError``) names the element that is wrong and why; the
DICOM edge answers it with a failure status, the HTTP edge with 400. No patient data is logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import ColumnElement, and_, distinct, false, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute

from integration.db.store import Store
from integration.db.tables import DicomInstance
from integration.phi import uid_hash

log = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_BULK = "medbridge:bulk"  # placeholder for bulk values, which the stored JSON leaves out


class QueryError(ValueError):
    """A matching key or the query level cannot be used; ``element`` names it (keyword)."""

    def __init__(self, element: str, message: str) -> None:
        super().__init__(f"{element}: {message}")
        self.element = element


@dataclass(frozen=True)
class Attr:
    keyword: str
    vr: str
    level: str  # the level whose entities this attribute describes
    column: InstrumentedAttribute[Any] | None = None  # None: computed from the matches


_C = DicomInstance
ATTRIBUTES: dict[str, Attr] = {
    a.keyword: a
    for a in (
        Attr("PatientName", "PN", "PATIENT", _C.patient_name),
        Attr("PatientID", "LO", "PATIENT", _C.patient_id),
        Attr("PatientBirthDate", "DA", "PATIENT", _C.patient_birth_date),
        Attr("PatientSex", "CS", "PATIENT", _C.patient_sex),
        Attr("NumberOfPatientRelatedStudies", "IS", "PATIENT"),
        Attr("NumberOfPatientRelatedSeries", "IS", "PATIENT"),
        Attr("NumberOfPatientRelatedInstances", "IS", "PATIENT"),
        Attr("StudyInstanceUID", "UI", "STUDY", _C.study_instance_uid),
        Attr("StudyDate", "DA", "STUDY", _C.study_date),
        Attr("StudyTime", "TM", "STUDY", _C.study_time),
        Attr("AccessionNumber", "SH", "STUDY", _C.accession_number),
        Attr("StudyID", "SH", "STUDY", _C.study_id),
        Attr("StudyDescription", "LO", "STUDY", _C.study_description),
        Attr("ReferringPhysicianName", "PN", "STUDY", _C.referring_physician_name),
        Attr("ModalitiesInStudy", "CS", "STUDY"),
        Attr("NumberOfStudyRelatedSeries", "IS", "STUDY"),
        Attr("NumberOfStudyRelatedInstances", "IS", "STUDY"),
        Attr("SeriesInstanceUID", "UI", "SERIES", _C.series_instance_uid),
        Attr("Modality", "CS", "SERIES", _C.modality),
        Attr("SeriesNumber", "IS", "SERIES", _C.series_number),
        Attr("SeriesDescription", "LO", "SERIES", _C.series_description),
        Attr("BodyPartExamined", "CS", "SERIES", _C.body_part_examined),
        Attr("SeriesDate", "DA", "SERIES", _C.series_date),
        Attr("NumberOfSeriesRelatedInstances", "IS", "SERIES"),
        Attr("SOPInstanceUID", "UI", "IMAGE", _C.sop_instance_uid),
        Attr("SOPClassUID", "UI", "IMAGE", _C.sop_class_uid),
        Attr("InstanceNumber", "IS", "IMAGE", _C.instance_number),
        Attr("NumberOfFrames", "IS", "IMAGE", _C.number_of_frames),
    )
}
_UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
_GROUP_COLUMN: dict[str, InstrumentedAttribute[Any]] = {
    "PATIENT": _C.patient_id, "STUDY": _C.study_instance_uid, "SERIES": _C.series_instance_uid,
    "IMAGE": _C.sop_instance_uid,
}

# ---- ingest ------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str, size: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value)[:size] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _strip_bulk(dataset: dict[str, Any]) -> dict[str, Any]:
    """Drop the values ``to_json_dict`` handed to the bulk handler (pixels, overlays, icons)."""
    out = {}
    for tag, element in dataset.items():
        if element.get("BulkDataURI") == _BULK:
            continue
        if element.get("vr") == "SQ" and element.get("Value"):
            element = {**element, "Value": [_strip_bulk(item) for item in element["Value"]]}
        out[tag] = element
    return out


# The query-index columns of DicomInstance and the attributes they hold: text columns with the
# column's size, integer columns (read by index_fields here and by the C-STORE byte scanner)
INDEX_TEXT_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("patient_name", "PatientName", 324), ("patient_birth_date", "PatientBirthDate", 8),
    ("patient_sex", "PatientSex", 16), ("study_date", "StudyDate", 8), ("study_time", "StudyTime", 16),
    ("accession_number", "AccessionNumber", 64), ("study_id", "StudyID", 16),
    ("study_description", "StudyDescription", 64), ("referring_physician_name", "ReferringPhysicianName", 324),
    ("series_description", "SeriesDescription", 64), ("body_part_examined", "BodyPartExamined", 16),
    ("series_date", "SeriesDate", 8),
)
INDEX_INT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("series_number", "SeriesNumber"), ("instance_number", "InstanceNumber"), ("number_of_frames", "NumberOfFrames"),
)


def index_fields(ds: Dataset) -> dict[str, Any]:
    """The ``DicomInstance`` query-index columns of ``ds`` (keyword arguments for the row).

    Reads only non-pixel attributes; a malformed attribute leaves its column empty rather than
    refusing the instance (the ingest checks decide that). ``dicom_json`` is not filled here: it
    costs ~40 us per element, so :meth:`QueryEngine.with_json` fills it on first use instead.
    """
    fields: dict[str, Any] = {}
    for column, keyword, size in INDEX_TEXT_COLUMNS:
        try:
            fields[column] = _text(ds, keyword, size)
        except Exception:  # noqa: BLE001 - an undecodable optional attribute is not indexed
            fields[column] = None
    for column, keyword in INDEX_INT_COLUMNS:
        try:
            fields[column] = _int(ds, keyword)
        except Exception:  # noqa: BLE001
            fields[column] = None
    return fields


def dataset_json(ds: Dataset) -> dict[str, Any]:
    """The DICOM JSON of ``ds`` without bulk values (pixel data, overlays, icons)."""
    return _strip_bulk(ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: _BULK))


# ---- queries -----------------------------------------------------------------------------------


@dataclass
class Query:
    """What to find: the level, the matching keys (keyword -> DICOM string value) and which
    attributes to return (keywords or 8-hex-digit tags; ``all_fields`` returns every stored one)."""

    level: str
    keys: dict[str, str] = field(default_factory=dict)
    return_tags: list[str] = field(default_factory=list)  # DICOM JSON tags, "0020000D"
    all_fields: bool = False


def tag_of(name: str) -> str:
    """The 8-hex-digit DICOM JSON tag of a keyword or tag (``PatientName``, ``00100010``)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(name, "not a DICOM attribute keyword or tag")
    return f"{tag:08X}"


def keyword_of(tag: str) -> str:
    return keyword_for_tag(int(tag, 16)) or tag


def _vr_of(tag: str) -> str:
    try:
        return dictionary_VR(Tag(int(tag, 16)))
    except KeyError:
        return "UN"


def query_from_identifier(identifier: Dataset, *, levels: Sequence[str] = LEVELS) -> Query:
    """A :class:`Query` from a C-FIND/C-GET/C-MOVE identifier; every element is a return key."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").upper()
    if level not in levels:
        raise QueryError("QueryRetrieveLevel", f"must be one of {', '.join(levels)}, not {level or 'empty'!r}")
    query = Query(level)
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        tag = f"{int(elem.tag):08X}"
        query.return_tags.append(tag)
        if elem.VR == "SQ" or elem.value in (None, "", b""):
            continue
        value = elem.value
        if elem.VR == "PN":
            value = str(value)
        elif not isinstance(value, str) and hasattr(value, "__iter__") and not isinstance(value, bytes):
            value = "\\".join(str(v) for v in value)
        if elem.keyword in ATTRIBUTES:
            query.keys[elem.keyword] = str(value)
        elif value not in ("*",):
            raise QueryError(elem.keyword or tag, "MedBridge cannot match on this attribute; send it empty")
    return query


# What a stored UID may hold: PS3.5 allows digits and dots only, but instances from devices that break the
# rule with letters or leading zeros are stored (and must be found); never a control character, space, '/' or
# '\\' (the SOP Instance UID names its file), nor '*', '?' or ',' (wildcards and list separators in a query)
STORABLE_UID = re.compile(r"[!-)+\-.0->@-\[\]-~]{1,64}")
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
INT32_LIMIT = 2**31  # the store's Integer columns are 32-bit on PostgreSQL: values lie in [-limit, limit)


class QueryEngine:
    """Finds matches in the store; every method is read-only and safe to call from any thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sqlite = store.engine.dialect.name == "sqlite"

    # -- matching ----------------------------------------------------------------------------
    def _pattern(self, column: Any, value: str, *, ignore_case: bool) -> ColumnElement[bool]:
        if self._sqlite:
            # GLOB is case-sensitive and uses * and ? as DICOM does; '[' is its only other special
            pattern = value.replace("[", "[[]")
            if ignore_case:
                return func.upper(column).op("GLOB")(pattern.upper())
            return column.op("GLOB")(pattern)
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = pattern.replace("*", "%").replace("?", "_")
        return column.ilike(pattern, escape="\\") if ignore_case else column.like(pattern, escape="\\")

    def _condition(self, attr: Attr, value: str) -> ColumnElement[bool] | None:
        # the ingest drops NUL from the query columns (PostgreSQL refuses it in text; some devices pad
        # with it), so a matching value drops it too: it matches what was stored, on either engine
        value = value.replace("\x00", "").strip()
        if value in ("", "*"):
            return None  # universal matching
        if attr.keyword == "ModalitiesInStudy":
            modalities = [v for v in value.split("\\") if v]
            if not modalities:
                return None  # only separators: universal matching
            inner = select(_C.study_instance_uid).where(
                or_(*(self._string_condition(_C.modality, m, "CS") for m in modalities))
            )
            return _C.study_instance_uid.in_(inner)
        if attr.column is None:
            raise QueryError(attr.keyword, "is computed by MedBridge and can only be returned; send it empty")
        column = attr.column
        if attr.vr == "UI":
            uids = [v.strip() for v in value.split("\\") if v.strip()]
            if not uids or any(not STORABLE_UID.fullmatch(u) for u in uids):
                raise QueryError(attr.keyword, "a UID (list) holds digits and dots, at most 64 per UID, "
                                               "separated by commas or backslashes; wildcards are not allowed")
            return column.in_(uids) if len(uids) > 1 else column == uids[0]
        if attr.vr == "DA":
            return self._range(attr, column, value, _DATE, "YYYYMMDD")
        if attr.vr == "TM":
            return self._range(attr, column, value.replace(":", ""), _TIME, "HHMMSS.FFFFFF")
        if attr.vr == "IS":
            texts = [v.strip() for v in value.split("\\")]
            if any(not _INTEGER.fullmatch(v) for v in texts):  # int() would take '١' and '1_0'
                raise QueryError(attr.keyword, f"{value!r} is not an integer (or a list of integers separated "
                                               "by backslashes)")
            # the ingest stores no number beyond 32 bits (PostgreSQL's Integer), so such a value matches
            # nothing; sent to the database it would not fit the column's type (a driver error, not a match)
            numbers = [n for n in (int(v) for v in texts if len(v) <= 12) if -INT32_LIMIT <= n < INT32_LIMIT]
            if not numbers:
                return false()
            return column.in_(numbers) if len(numbers) > 1 else column == numbers[0]
        values = [v for v in value.split("\\")] if attr.vr != "PN" else [value]
        return or_(*(self._string_condition(column, v, attr.vr) for v in values))

    def _string_condition(self, column: Any, value: str, vr: str) -> ColumnElement[bool]:
        ignore_case = vr == "PN"
        if "*" in value or "?" in value:
            return self._pattern(column, value, ignore_case=ignore_case)
        if ignore_case:
            return func.upper(column) == value.upper()
        return column == value

    @staticmethod
    def _range(attr: Attr, column: Any, value: str, form: re.Pattern[str], shape: str) -> ColumnElement[bool]:
        if value.count("-") > 1:
            raise QueryError(attr.keyword, f"{value!r} is not a {shape} value or range")
        lo, sep, hi = value.partition("-")
        for bound in (lo, hi):
            if bound and not form.fullmatch(bound):
                raise QueryError(attr.keyword, f"{value!r} is not a {shape} value or range (e.g. 20200101-20201231)")
        if not sep:
            # a partial time ("13") matches every time within that hour
            return column == lo if attr.vr == "DA" else and_(column >= lo, column <= lo + "~")
        conditions = []
        if lo:
            conditions.append(column >= lo)
        if hi:
            conditions.append(column <= (hi if attr.vr == "DA" else hi + "~"))
        if not conditions:
            raise QueryError(attr.keyword, "a range needs at least one bound")
        return and_(*conditions)

    def conditions(self, query: Query) -> list[ColumnElement[bool]]:
        """The SQL conditions of the matching keys; keys below the query level are refused."""
        depth = LEVELS.index(query.level)
        out = []
        for keyword, value in query.keys.items():
            attr = ATTRIBUTES.get(keyword)
            if attr is None:
                raise QueryError(keyword, "MedBridge cannot match on this attribute")
            if LEVELS.index(attr.level) > depth and value.strip() not in ("", "*"):
                raise QueryError(keyword, f"is a {attr.level}-level key and cannot be matched in a "
                                          f"{query.level}-level query")
            condition = self._condition(attr, value)
            if condition is not None:
                out.append(condition)
        return out

    def with_json(self, rows: Sequence[DicomInstance]) -> None:
        """Fill ``dicom_json`` of ``rows`` that lack it from their files, and keep it on the row."""
        filled = []
        for row in rows:
            if row.dicom_json is not None:
                continue
            try:
                row.dicom_json = dataset_json(dcmread(row.path, stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - an unreadable file answers with the indexed columns only
                log.warning("instance %s: metadata not readable (%s)", uid_hash(row.sop_instance_uid),
                            type(exc).__name__)
                continue
            filled.append(row)
        if filled:
            with self.store.session() as s:
                for row in filled:
                    s.execute(update(_C).where(_C.sop_instance_uid == row.sop_instance_uid)
                              .values(dicom_json=row.dicom_json))

    # -- searching ---------------------------------------------------------------------------
    def count(self, query: Query) -> int:
        group = _GROUP_COLUMN[query.level]
        with self.store.session() as s:
            return int(s.scalar(select(func.count(distinct(group))).where(*self.conditions(query))) or 0)

    def instances(self, query: Query) -> list[DicomInstance]:
        """Every instance under the matches of ``query`` (what C-GET/C-MOVE and WADO-RS send)."""
        where = self.conditions(query)
        group = _GROUP_COLUMN[query.level]
        with self.store.session() as s:
            keys = select(group).where(*where).distinct().scalar_subquery()
            rows = s.scalars(
                select(_C).where(group.in_(keys))
                .order_by(_C.study_instance_uid, _C.series_instance_uid, _C.instance_number, _C.received_at)
            )
            return list(rows)

    def find(self, query: Query, *, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The matches of ``query`` as DICOM JSON objects holding the requested return keys, the
        unique keys down to the query level, and ``QueryRetrieveLevel`` is left to the caller."""
        where = self.conditions(query)
        level = query.level
        group = _GROUP_COLUMN[level]
        with self.store.session() as s:
            stmt = (
                select(group, func.min(_C.sop_instance_uid))
                .where(*where).where(group.is_not(None))
                .group_by(group).order_by(group).offset(offset)
            )
            if limit is not None:
                stmt = stmt.limit(limit)
            found = list(s.execute(stmt).all())
            if not found:
                return []
            keys = [k for k, _ in found]
            reps = {r.sop_instance_uid: r for r in s.scalars(select(_C).where(_C.sop_instance_uid.in_(
                [sop for _, sop in found])))}
            computed = self._computed(s, level, keys, query)
        self.with_json(list(reps.values()))
        return [self._identifier(reps[sop], level, query, computed.get(key, {})) for key, sop in found]

    def _computed(self, s: Any, level: str, keys: list[str], query: Query) -> dict[str, dict[str, Any]]:
        group = _GROUP_COLUMN[level]
        out: dict[str, dict[str, Any]] = {k: {} for k in keys}
        if level == "IMAGE":
            return out
        counts = select(group, func.count(), func.count(distinct(_C.series_instance_uid)),
                        func.count(distinct(_C.study_instance_uid))).where(group.in_(keys)).group_by(group)
        for key, n_instances, n_series, n_studies in s.execute(counts):
            prefix = {"PATIENT": "Patient", "STUDY": "Study", "SERIES": "Series"}[level]
            out[key][f"NumberOf{prefix}RelatedInstances"] = n_instances
            if level in ("PATIENT", "STUDY"):
                out[key][f"NumberOf{prefix}RelatedSeries"] = n_series
            if level == "PATIENT":
                out[key]["NumberOfPatientRelatedStudies"] = n_studies
        if level == "STUDY":
            pairs = s.execute(select(group, _C.modality).where(group.in_(keys), _C.modality.is_not(None))
                              .distinct().order_by(_C.modality))
            for key, modality in pairs:
                out[key].setdefault("ModalitiesInStudy", []).append(modality)
        return out

    def _identifier(self, row: DicomInstance, level: str, query: Query, computed: Mapping[str, Any]) -> dict[str, Any]:
        stored: dict[str, Any] = row.dicom_json or {}
        depth = LEVELS.index(level)
        tags: list[str] = []
        for keyword in ("STUDY", "SERIES", "IMAGE")[: max(depth, 0)]:
            tags.append(tag_of(_UNIQUE_KEY[keyword]))
        if level == "PATIENT":
            tags.append(tag_of("PatientID"))
        tags.extend(query.return_tags)
        if query.all_fields:
            if level == "IMAGE":
                tags.extend(stored)
            else:  # only what describes the level's entity, not one instance's own attributes
                tags.extend(tag_of(a.keyword) for a in ATTRIBUTES.values() if LEVELS.index(a.level) <= depth)
        if "00080005" in stored:
            tags.insert(0, "00080005")
        out: dict[str, Any] = {}
        for tag in tags:
            if tag in out:
                continue
            keyword = keyword_of(tag)
            attr = ATTRIBUTES.get(keyword)
            if attr is not None and LEVELS.index(attr.level) > depth:
                continue  # below the level (e.g. SOPInstanceUID asked in a STUDY query): not returned
            if keyword in computed:
                value = computed[keyword]
                out[tag] = {"vr": attr.vr if attr else _vr_of(tag),
                            "Value": value if isinstance(value, list) else [value]}
            elif tag in stored:
                out[tag] = stored[tag]
            elif attr is not None and attr.column is not None:
                out[tag] = _element(attr, getattr(row, attr.column.key))
            else:
                out[tag] = {"vr": attr.vr if attr else _vr_of(tag)}
        return dict(sorted(out.items()))


def _element(attr: Attr, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": attr.vr}
    if attr.vr == "PN":
        return {"vr": "PN", "Value": [{"Alphabetic": value}]}
    if attr.vr == "IS":
        return {"vr": "IS", "Value": [int(value)]}
    return {"vr": attr.vr, "Value": str(value).split("\\")}


def to_dataset(identifier: Mapping[str, Any]) -> Dataset:
    """A DICOM JSON object as a pydicom Dataset (for C-FIND responses)."""
    return Dataset.from_json(dict(identifier))
