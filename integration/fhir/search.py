"""FHIR search: the registry of search parameters, their index, and the queries that use it.

One registry (``REGISTRY``) drives three things:

* indexing: ``index_rows(resource)`` turns a resource into ``fhir_search_index`` rows, written by
  ``fhir.storage.put_resource`` in the same transaction as the resource;
* searching: ``parse_search`` turns a query string into a ``SearchQuery`` (or refuses it, naming the
  parameter), and ``run_search`` executes it with SQL that the composite indexes serve;
* the CapabilityStatement: ``integration.fhir.api`` lists each type's parameters from here.

Value semantics follow FHIR R4 search (https://hl7.org/fhir/R4/search.html): comma = OR within one
parameter, a repeated parameter = AND; dates are ranges ([start, end), UTC) matched with the
eq/ne/gt/lt/ge/le/sa/eb/ap prefixes; tokens are ``system|code``, ``code``, ``system|`` or ``|code``;
strings match case- and accent-insensitively from the start.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import unquote

import orjson
from sqlalchemy import ColumnElement, Select, and_, false, func, insert, not_, or_, select
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import FhirResource, FhirResourceVersion, FhirSearchIndex, UpgradeProgress, utcnow
from integration.errors import InvalidResourceError

log = logging.getLogger(__name__)

ParamType = Literal["token", "reference", "date", "string"]
# the length of fhir_search_index.system and .value: longer values are indexed, and searched, that far
INDEX_LENGTH = 256


@dataclass(frozen=True)
class SearchParam:
    """A search parameter: ``paths`` are dotted element paths (lists are walked through);
    ``targets`` restricts a reference parameter to those resource types (empty: any)."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    documentation: str = ""
    # the parameter whose index rows serve this one (its conditions name ``targets`` as the system): a
    # reference parameter whose rows would repeat another's, such as ``patient``, a subset of ``subject``
    indexed_as: str | None = None
    # the fhir_resources column that holds this token (a plain code at ``paths[0]``, as fhir.storage.put_resource
    # writes it): searched there, with no index rows of its own
    column: str | None = None

    @property
    def index_name(self) -> str:
        """The ``param`` of this parameter's rows in fhir_search_index."""
        return self.indexed_as or self.name


def _p(name: str, ptype: ParamType, *paths: str, targets: tuple[str, ...] = (),
       indexed_as: str | None = None) -> SearchParam:
    return SearchParam(name, ptype, paths, targets, indexed_as=indexed_as)


# status is a code that every resource row carries in fhir_resources.status (the required bindings keep
# it to the value set's codes): answered from that column, it needs none of the 0.9 index rows per
# resource it had (14% of them); rows written as 'status' before 2026-12-01 are left unused
_STATUS = SearchParam("status", "token", ("status",), column="status")


def _common(*, subject: bool = True, encounter: bool = True) -> list[SearchParam]:
    params = [_p("identifier", "token", "identifier")]
    if subject:
        # patient = the subject references that point at a Patient: one index row serves both (they were
        # 13% of all rows); rows written as 'patient' before 2026-12-01 are left unused
        params += [_p("patient", "reference", "subject", targets=("Patient",), indexed_as="subject"),
                   _p("subject", "reference", "subject")]
    if encounter:
        params.append(_p("encounter", "reference", "encounter", targets=("Encounter",)))
    return params


# Parameters per resource type (names and paths from the R4 search parameter registry).
REGISTRY: dict[str, dict[str, SearchParam]] = {
    rtype: {p.name: p for p in params}
    for rtype, params in {
        "Patient": [
            _p("identifier", "token", "identifier"),
            _p("gender", "token", "gender"),
            _p("birthdate", "date", "birthDate"),
            _p("name", "string", "name.family", "name.given", "name.text", "name.prefix", "name.suffix"),
            _p("family", "string", "name.family"),
            _p("given", "string", "name.given"),
            _p("active", "token", "active"),
        ],
        "Encounter": [
            *_common(encounter=False),
            _STATUS,
            _p("class", "token", "class"),
            _p("type", "token", "type"),
            _p("date", "date", "period"),
        ],
        "Condition": [
            *_common(),
            _p("code", "token", "code"),
            _p("clinical-status", "token", "clinicalStatus"),
            _p("verification-status", "token", "verificationStatus"),
            _p("category", "token", "category"),
            _p("onset-date", "date", "onsetDateTime", "onsetPeriod"),
            _p("recorded-date", "date", "recordedDate"),
        ],
        "Observation": [
            *_common(),
            _p("code", "token", "code"),
            _STATUS,
            _p("category", "token", "category"),
            _p("date", "date", "effectiveDateTime", "effectivePeriod", "effectiveInstant"),
        ],
        "DiagnosticReport": [
            *_common(),
            _p("code", "token", "code"),
            _STATUS,
            _p("category", "token", "category"),
            _p("date", "date", "effectiveDateTime", "effectivePeriod"),
            _p("issued", "date", "issued"),
            _p("result", "reference", "result", targets=("Observation",)),
            _p("imaging-study", "reference", "imagingStudy", targets=("ImagingStudy",)),
        ],
        "ImagingStudy": [
            *_common(),
            _STATUS,
            _p("modality", "token", "modality"),
            _p("started", "date", "started"),
            _p("basedon", "reference", "basedOn", targets=("ServiceRequest",)),
        ],
        "DocumentReference": [
            *_common(encounter=False),
            _p("encounter", "reference", "context.encounter", targets=("Encounter",)),
            _STATUS,
            _p("type", "token", "type"),
            _p("category", "token", "category"),
            _p("date", "date", "date"),
        ],
        "MedicationRequest": [
            *_common(),
            _p("code", "token", "medicationCodeableConcept"),
            _STATUS,
            _p("intent", "token", "intent"),
            _p("category", "token", "category"),
            _p("authoredon", "date", "authoredOn"),
        ],
        "AllergyIntolerance": [
            _p("identifier", "token", "identifier"),
            _p("patient", "reference", "patient", targets=("Patient",)),
            _p("code", "token", "code"),
            _p("clinical-status", "token", "clinicalStatus"),
            _p("verification-status", "token", "verificationStatus"),
            _p("category", "token", "category"),
            _p("criticality", "token", "criticality"),
            _p("date", "date", "recordedDate"),
        ],
        "Procedure": [
            *_common(),
            _p("code", "token", "code"),
            _STATUS,
            _p("category", "token", "category"),
            _p("date", "date", "performedDateTime", "performedPeriod"),
        ],
        "ServiceRequest": [
            *_common(),
            _p("code", "token", "code"),
            _STATUS,
            _p("intent", "token", "intent"),
            _p("category", "token", "category"),
            _p("authored", "date", "authoredOn"),
        ],
        # the audit trail (integration.audit): who (agent: the fhirUser reference; altid: the token subject),
        # what (entity, patient), when (date), which interaction (type, subtype, action) and its outcome
        "AuditEvent": [
            _p("date", "date", "recorded"),
            _p("agent", "reference", "agent.who"),
            _p("altid", "token", "agent.altId"),
            _p("address", "string", "agent.network.address"),
            _p("entity", "reference", "entity.what"),
            _p("patient", "reference", "entity.what", targets=("Patient",), indexed_as="entity"),
            _p("type", "token", "type"),
            _p("subtype", "token", "subtype"),
            _p("action", "token", "action"),
            _p("outcome", "token", "outcome"),
        ],
        # the sign-offs of AI reports (integration.reports.review): which report version, by whom, when
        "Provenance": [
            _p("target", "reference", "target"),
            _p("agent", "reference", "agent.who"),
            _p("recorded", "date", "recorded"),
        ],
    }.items()
}

# Parameters every type has; they read columns of fhir_resources rather than the index.
COMMON_PARAMS: dict[str, ParamType] = {"_id": "token", "_lastUpdated": "date"}
# Result parameters this server implements (anything else starting with '_' is reported as unsupported).
RESULT_PARAMS = ("_count", "_offset", "_sort", "_include", "_summary", "_total", "_format")
SUMMARY_VALUES = ("count",)
# _total: none = no count (Bundle.total only when the last page gives it for free); estimate (the default) =
# exact up to the server's limit (MEDBRIDGE_FHIR_EXACT_TOTAL_LIMIT), left out above; accurate = always exact
TOTAL_VALUES = ("none", "estimate", "accurate")
DEFAULT_COUNT = 50
MAX_COUNT = 500
# The size of a search: each value is a condition in one SQL statement. ~1,000 conditions pass SQLite's
# expression depth (1,000) and fail every time, and 10,000 take PostgreSQL and SQLite seconds to plan, so a
# larger search is refused (400, naming the parameter) before it reaches the database: at most
# MAX_PARAM_VALUES comma-separated values in one parameter (ORed), MAX_SEARCH_PARAMS parameters in all
# (repeats of one are ANDed) and MAX_SEARCH_VALUES values in all.
MAX_PARAM_VALUES = 100
MAX_SEARCH_PARAMS = 100
MAX_SEARCH_VALUES = 500
# beyond any store's size; PostgreSQL's OFFSET and SQLite's refuse more than 2**63 - 1
MAX_OFFSET = 2**31 - 1


def params_for(resource_type: str) -> dict[str, SearchParam]:
    """The indexed search parameters of a type ({} for types outside the registry: only _id/_lastUpdated)."""
    return REGISTRY.get(resource_type, {})


def include_values(resource_type: str) -> list[str]:
    """The ``_include`` values a type supports: every reference parameter."""
    return [f"{resource_type}:{p.name}" for p in params_for(resource_type).values() if p.type == "reference"]


def sort_values(resource_type: str) -> list[str]:
    return ["_id", "_lastUpdated", *(p.name for p in params_for(resource_type).values() if p.type == "date")]


# Indexing -----------------------------------------------------------------------------------------
_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
MIN_DATE = datetime(1, 1, 1, tzinfo=UTC)
MAX_DATE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _shifted(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, held within [MIN_DATE, MAX_DATE] (Python's datetimes end at years 1 and 9999)."""
    try:
        return moment + delta
    except OverflowError:
        return MAX_DATE if delta > timedelta(0) else MIN_DATE


# cached: a Bundle's resources repeat their dates and references (a panel's Observations share one time,
# one patient, one encounter), and indexing parsed each again (with _reference_target, over half of
# index_tuples' time in a profile of the transaction path)
@lru_cache(maxsize=4096)
def date_range(text: str) -> tuple[datetime, datetime]:
    """The UTC range [start, end) a FHIR date, dateTime or instant denotes: '2020' is the whole year,
    '2020-03-01T10:00:00Z' one second. A time without zone is taken as UTC. ValueError if malformed."""
    m = _DATE_RE.match(text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[Z|+hh:mm])")
    g = m.groupdict()
    year = int(g["y"])
    if g["m"] is None:
        start = datetime(year, 1, 1, tzinfo=UTC)
        end = datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else MAX_DATE
        return start, end
    month = int(g["m"])
    if g["d"] is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC) if year < 9999 or month < 12 else MAX_DATE
        return start, end
    day = datetime(year, month, int(g["d"]), tzinfo=UTC)
    if g["H"] is None:
        return day, _shifted(day, timedelta(days=1))
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    start = datetime(year, month, int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"] or 0), tzinfo=tz)
    if g["f"]:
        start = _shifted(start, timedelta(microseconds=round(float(g["f"]) * 1_000_000)))
        step = timedelta(milliseconds=1)
    else:
        step = timedelta(seconds=1) if g["S"] else timedelta(minutes=1)
    try:
        start = start.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is in year 0 in UTC, 9999-12-31T23:00:00-14:00 in 10000
        start = MIN_DATE if tz.utcoffset(None) > timedelta(0) else MAX_DATE
    return start, _shifted(start, step)


def normalise_string(text: str) -> str:
    """Case- and accent-insensitive form used to index and match string parameters."""
    decomposed = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).lower().split())


def _elements(resource: dict[str, Any], path: tuple[str, ...]) -> list[Any]:
    """The values at a dotted element path (split), lists walked through at every step (None left out)."""
    nodes: list[Any] = [resource]
    for key in path:
        found: list[Any] = []
        for node in nodes:
            if isinstance(node, dict):
                value = node.get(key)
                if isinstance(value, list):
                    _flatten(value, found)
                elif value is not None:
                    found.append(value)
        nodes = found
    return nodes


def _flatten(items: list[Any], into: list[Any]) -> None:
    for item in items:
        if isinstance(item, list):
            _flatten(item, into)
        elif item is not None:
            into.append(item)


@lru_cache(maxsize=4096)
def _reference_target(ref: str) -> tuple[str, str] | None:
    """('Patient', 'x') for 'Patient/x', '…/fhir/Patient/x' or '…/Patient/x/_history/2'; None otherwise."""
    if ref.startswith(("urn:", "#")):
        return None
    parts = [p for p in ref.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None


_Entry = tuple[str | None, str | None, datetime | None, datetime | None]


def _token_values(node: Any, out: list[_Entry]) -> None:
    if isinstance(node, bool):
        out.append(("", "true" if node else "false", None, None))
    elif isinstance(node, str):
        out.append(("", node, None, None))
    elif isinstance(node, dict):
        if "coding" in node or "text" in node and "code" not in node and "value" not in node:
            for coding in node.get("coding") or []:
                _token_values(coding, out)
        elif isinstance(node.get("code"), str):  # Coding
            out.append((str(node.get("system") or ""), node["code"], None, None))
        elif isinstance(node.get("value"), str):  # Identifier
            out.append((str(node.get("system") or ""), node["value"], None, None))


def _values(param: SearchParam, node: Any) -> list[_Entry]:
    """(system, value, date_start, date_end) index entries of one element value."""
    out: list[_Entry] = []
    _values_into(param, node, out)
    return out


def _values_into(param: SearchParam, node: Any, out: list[_Entry]) -> None:
    """``_values``, appended to ``out``."""
    if param.type == "token":
        _token_values(node, out)
    elif param.type == "reference":
        if isinstance(node, dict) and isinstance(node.get("reference"), str):
            target = _reference_target(node["reference"])
            if target and (not param.targets or target[0] in param.targets):
                out.append((target[0], target[1], None, None))
    elif param.type == "date":
        try:
            if isinstance(node, str):
                start, end = date_range(node)
                out.append((None, None, start, end))
            elif isinstance(node, dict) and ("start" in node or "end" in node):  # Period
                start = date_range(node["start"])[0] if isinstance(node.get("start"), str) else MIN_DATE
                end = date_range(node["end"])[1] if isinstance(node.get("end"), str) else MAX_DATE
                out.append((None, None, start, end))
        except ValueError:
            pass  # validated content never gets here; an unparsable date is simply not indexed
    elif param.type == "string" and isinstance(node, str):
        out.append((None, normalise_string(node)[:INDEX_LENGTH], None, None))


_INDEX_PLANS: dict[str, list[tuple[SearchParam, list[tuple[str, ...]]]]] = {}


def _index_plan(resource_type: str) -> list[tuple[SearchParam, list[tuple[str, ...]]]]:
    """The parameters of a type that have index rows of their own, with their paths split."""
    plan = _INDEX_PLANS.get(resource_type)
    if plan is None:
        plan = _INDEX_PLANS[resource_type] = [
            (p, [tuple(path.split(".")) for path in p.paths])
            for p in params_for(resource_type).values() if p.indexed_as is None and p.column is None
        ]
    return plan


# the fhir_search_index columns of the tuples index_tuples gives
INDEX_COLUMNS = ("resource_type", "resource_id", "param", "system", "value", "date_start", "date_end")


def index_tuples(resource: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The ``fhir_search_index`` rows of a resource (deduplicated), per the registry, as tuples of the
    ``INDEX_COLUMNS`` values."""
    rtype, rid = resource["resourceType"], resource["id"]
    rows = []
    entries: list[_Entry] = []
    for param, paths in _index_plan(rtype):
        for path in paths:
            if len(path) == 1:  # most paths: a top-level element, read here without _elements' walk
                found = resource.get(path[0])
                if found is None:
                    continue
                if isinstance(found, list):
                    nodes: list[Any] = []
                    _flatten(found, nodes)
                    for node in nodes:
                        _values_into(param, node, entries)
                else:
                    _values_into(param, found, entries)
            else:
                for node in _elements(resource, path):
                    _values_into(param, node, entries)
        if entries:
            name = param.name
            for system, value, start, end in (dict.fromkeys(entries) if len(entries) > 1 else entries):
                rows.append((rtype, rid, name, system[:INDEX_LENGTH] if system is not None else None,
                             value[:INDEX_LENGTH] if value is not None else None, start, end))
            entries = []
    return rows


def index_rows(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """``index_tuples`` as dicts of column values."""
    return [dict(zip(INDEX_COLUMNS, row, strict=True)) for row in index_tuples(resource)]


# Parsing ------------------------------------------------------------------------------------------
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


@dataclass
class SearchQuery:
    """A parsed search: ``where`` clauses on fhir_resources, paging, sort, includes, and what was ignored."""

    resource_type: str
    where: list[ColumnElement[bool]] = field(default_factory=list)  # on fhir_resources' own columns
    # conditions on fhir_search_index rows: (selectivity rank, parameter, condition); see clauses()
    indexed: list[tuple[int, str, ColumnElement[bool]]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    includes: list[SearchParam] = field(default_factory=list)
    summary_count: bool = False
    total: str = "estimate"  # _total, one of TOTAL_VALUES
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (parameter, why)

    def clauses(self, *, drive: bool = True) -> list[ColumnElement[bool]]:
        """WHERE clauses on fhir_resources. The most selective index condition (tokens and references
        before strings before dates) drives the query as ``id IN (index lookup)``; the others are
        correlated EXISTS probes of each candidate's own index rows, so a broad condition such as
        ``date=ge2000`` never materialises every matching id. ``drive=False`` makes them all probes,
        for walking the resources in _lastUpdated order (see run_search)."""
        out = list(self.where)
        for n, (_, name, cond) in enumerate(sorted(self.indexed, key=lambda c: c[0])):
            base = (FhirSearchIndex.resource_type == self.resource_type, FhirSearchIndex.param == name, cond)
            if n == 0 and drive:
                out.append(FhirResource.id.in_(select(FhirSearchIndex.resource_id).where(*base)))
            else:
                out.append(select(FhirSearchIndex.row_id).where(
                    FhirSearchIndex.resource_id == FhirResource.id, *base).exists())
        return out


def _refuse(param: str, message: str) -> InvalidResourceError:
    return InvalidResourceError([(param, message)], 400)


def non_negative_int(name: str, raw: str, *, at_most: int, clamp: bool = False) -> int:
    """``raw`` (ASCII digits: ``str.isdigit`` also takes '²', which ``int`` refuses) as an integer, at most
    ``at_most``: a larger one is ``at_most`` with ``clamp``, else refused. InvalidResourceError (400)
    naming ``name`` otherwise."""
    if not (raw.isascii() and raw.isdigit()):
        raise _refuse(name, f"{name} must be a non-negative integer")
    value = int(raw) if len(raw) <= 18 else at_most + 1  # int() of thousands of digits is refused, and slow
    if value > at_most:
        if not clamp:
            raise _refuse(name, f"{name} must be at most {at_most}")
        return at_most
    return value


_RANK = {"token": 0, "reference": 0, "string": 1, "date": 2}


def _token_cond(raw: str) -> ColumnElement[bool]:
    # values are indexed up to INDEX_LENGTH characters (index_tuples): compared as far
    if "|" not in raw:
        return FhirSearchIndex.value == raw[:INDEX_LENGTH]
    system, _, code = raw.partition("|")
    if not code:  # value IS NOT NULL lets the (partial) value index serve it
        return and_(FhirSearchIndex.value.is_not(None), FhirSearchIndex.system == system[:INDEX_LENGTH])
    return and_(FhirSearchIndex.value == code[:INDEX_LENGTH], FhirSearchIndex.system == system[:INDEX_LENGTH])


def _column_token_cond(column: Any, raw: str) -> ColumnElement[bool]:
    """``_token_cond`` for a code held in a column: what the code's index rows (system '') would match."""
    if "|" not in raw:
        return column == raw
    system, _, code = raw.partition("|")
    if system:
        return false()
    return column.is_not(None) if not code else column == code


def _reference_cond(param: SearchParam, raw: str) -> ColumnElement[bool]:
    target = _reference_target(raw)
    if target:
        if param.targets and target[0] not in param.targets:
            raise _refuse(param.name, f"{param.name} refers to {'/'.join(param.targets)}, not {target[0]}")
        return and_(FhirSearchIndex.value == target[1][:INDEX_LENGTH],
                    FhirSearchIndex.system == target[0][:INDEX_LENGTH])
    if "/" in raw or not raw:
        raise _refuse(param.name, f"'{raw}' is not a reference (Type/id or id)")
    if len(param.targets) == 1:
        return and_(FhirSearchIndex.value == raw[:INDEX_LENGTH], FhirSearchIndex.system == param.targets[0])
    return FhirSearchIndex.value == raw[:INDEX_LENGTH]


def _split_prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and raw[2:3].isdigit():
        return raw[:2], raw[2:]
    return "eq", raw


def _date_cond(name: str, raw: str, start_col: Any, end_col: Any) -> ColumnElement[bool]:
    """Range semantics of FHIR date search: the value's range [ps, pe) against the target's [rs, re)."""
    prefix, value = _split_prefix(raw)
    try:
        ps, pe = date_range(value)
    except ValueError as exc:
        raise _refuse(name, str(exc)) from None
    if prefix == "eq":
        return and_(start_col >= ps, end_col <= pe)
    if prefix == "ne":
        return not_(and_(start_col >= ps, end_col <= pe))
    if prefix == "gt":
        return end_col > pe
    if prefix == "lt":
        return start_col < ps
    if prefix == "ge":
        return end_col > ps
    if prefix == "le":
        return start_col < pe
    if prefix == "sa":
        return start_col >= pe
    if prefix == "eb":
        return end_col <= ps
    # ap: overlap with the value widened by 10% of its distance from now (at least a day)
    now = datetime.now(UTC)
    slack = max(abs(now - ps) / 10, timedelta(days=1))
    return and_(start_col < _shifted(pe, slack), end_col > _shifted(ps, -slack))


def _string_cond(raw: str) -> ColumnElement[bool]:
    needle = normalise_string(raw)[:INDEX_LENGTH]  # indexed as far (see _values_into)
    if not needle:
        return FhirSearchIndex.value.is_not(None)
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = FhirSearchIndex.value.like(f"{escaped}%", escape="\\")
    if needle[-1] == chr(0x10FFFF):  # no character follows it: no upper bound
        return and_(FhirSearchIndex.value >= needle, like)
    upper = needle[:-1] + chr(ord(needle[-1]) + 1)
    # the range lets the index serve the prefix match; LIKE keeps it exact under any collation
    return and_(FhirSearchIndex.value >= needle, FhirSearchIndex.value < upper, like)


def _one_param(q: SearchQuery, name: str, raw: str) -> None:
    """Add the condition of one ``name=raw`` pair to ``q`` (comma-separated values are ORed)."""
    rtype = q.resource_type
    values = [v for v in raw.split(",")]
    if any(not v for v in values):
        raise _refuse(name, f"{name} has an empty value")
    if name == "_id":
        q.where.append(FhirResource.id.in_(values))
        return
    if name == "_lastUpdated":
        q.where.append(or_(*(_last_updated_cond(name, v) for v in values)))
        return
    param = params_for(rtype)[name]
    if param.column is not None:
        q.where.append(or_(*(_column_token_cond(getattr(FhirResource, param.column), v) for v in values)))
        return
    if param.type == "token":
        cond = or_(*(_token_cond(v) for v in values))
    elif param.type == "reference":
        cond = or_(*(_reference_cond(param, v) for v in values))
    elif param.type == "string":
        cond = or_(*(_string_cond(v) for v in values))
    else:
        cond = or_(*(_date_cond(name, v, FhirSearchIndex.date_start, FhirSearchIndex.date_end) for v in values))
    q.indexed.append((_RANK[param.type], param.index_name, cond))


def _last_updated_cond(name: str, raw: str) -> ColumnElement[bool]:
    """_lastUpdated compares the stored instant (a point) with the value's range, on the indexed column."""
    prefix, value = _split_prefix(raw)
    try:
        ps, pe = date_range(value)
    except ValueError as exc:
        raise _refuse(name, str(exc)) from None
    col = FhirResource.last_updated
    match prefix:
        case "eq" | "ap":
            return and_(col >= ps, col < pe)
        case "ne":
            return or_(col < ps, col >= pe)
        case "gt" | "sa":
            return col >= pe
        case "lt" | "eb":
            return col < ps
        case "ge":
            return col >= ps
        case _:  # le
            return col < pe


def _check_size(name: str, raw: str, seen: dict[str, int]) -> None:
    """Refuse the search when ``name=raw`` takes it past MAX_PARAM_VALUES, MAX_SEARCH_PARAMS or
    MAX_SEARCH_VALUES; ``seen`` counts the values of each parameter so far."""
    values = raw.count(",") + 1
    if values > MAX_PARAM_VALUES:
        raise _refuse(name, f"{name} has {values} comma-separated values; at most {MAX_PARAM_VALUES} are accepted "
                            "in one parameter: split the search into several")
    seen[name] = seen.get(name, 0) + values
    seen[""] = seen.get("", 0) + 1  # parameters in all ('' is no parameter's name)
    if seen[""] > MAX_SEARCH_PARAMS:
        most = max((n for n in seen if n), key=lambda n: seen[n])
        raise _refuse(most, f"the search has more than {MAX_SEARCH_PARAMS} parameters ({most} is repeated most): "
                            "send fewer, or split the search into several")
    if sum(v for n, v in seen.items() if n) > MAX_SEARCH_VALUES:
        raise _refuse(name, f"the search has more than {MAX_SEARCH_VALUES} values in all (at {name}): "
                            "split it into several searches")


def parse_search(resource_type: str, items: Sequence[tuple[str, str]], *, strict: bool) -> SearchQuery:
    """Parse query parameters into a SearchQuery.

    Unknown parameters, modifiers and result parameters are collected in ``ignored`` (lenient) or
    refused with InvalidResourceError 400 naming the parameter (strict). Malformed values of known
    parameters are always refused (400).
    """
    q = SearchQuery(resource_type)
    known = params_for(resource_type)
    seen: dict[str, int] = {}
    for key, raw in items:
        if "\x00" in key or "\x00" in raw:  # no FHIR value holds one, and PostgreSQL text cannot
            raise _refuse(key.replace("\x00", ""), "a search parameter cannot contain a NUL character")
        name, _, modifier = key.partition(":")
        _check_size(name, raw, seen)
        if modifier:  # no modifier is implemented (:exact, :missing, :iterate, ...): say so, never half-apply
            q.ignored.append((key, f"the modifier ':{modifier}' is not supported"))
        elif name == "_count":
            q.count = non_negative_int(name, raw, at_most=MAX_COUNT, clamp=True)
            q.summary_count = q.summary_count or q.count == 0
        elif name == "_offset":
            q.offset = non_negative_int(name, raw, at_most=MAX_OFFSET)
        elif name == "_format":
            if raw not in ("json", "application/json", "application/fhir+json"):
                raise InvalidResourceError([(name, "only JSON is supported (_format=json)")], 406)
        elif name == "_summary" and raw in SUMMARY_VALUES:
            q.summary_count = True
        elif name == "_total":
            if raw not in TOTAL_VALUES:
                raise _refuse(name, f"_total must be one of {', '.join(TOTAL_VALUES)}")
            q.total = raw
        elif name == "_sort":
            for term in raw.split(","):
                desc = term.startswith("-")
                field_name = term.lstrip("-")
                if field_name not in sort_values(resource_type):
                    q.ignored.append((key, f"sorting by '{field_name}' is not supported"))
                    continue
                q.sort.append((field_name, desc))
        elif name == "_include":
            parts = raw.split(":")
            param = known.get(parts[1]) if len(parts) in (2, 3) and parts[0] == resource_type else None
            if param is None or param.type != "reference" or (len(parts) == 3 and parts[2] not in param.targets):
                q.ignored.append((key, f"_include={raw} is not supported; supported: "
                                       f"{', '.join(include_values(resource_type)) or 'none'}"))
                continue
            q.includes.append(param)
        elif name in COMMON_PARAMS or name in known:
            _one_param(q, name, raw)
        else:
            q.ignored.append((key, f"search parameter '{key}' is not supported"))
    if strict and q.ignored:
        raise InvalidResourceError([(p, why) for p, why in q.ignored], 400)
    return q


# Execution ----------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    total: int | None  # None: more matches than the exact-count limit
    matches: list[dict[str, Any]]
    included: list[dict[str, Any]]
    has_next: bool = False


def _sort_key(rtype: str, name: str, desc: bool) -> list[Any]:
    if name == "_id":
        return [FhirResource.id.desc() if desc else FhirResource.id]
    if name == "_lastUpdated":
        return [FhirResource.last_updated.desc() if desc else FhirResource.last_updated]
    agg = func.max(FhirSearchIndex.date_end) if desc else func.min(FhirSearchIndex.date_start)
    key = (
        select(agg)
        .where(FhirSearchIndex.resource_type == rtype, FhirSearchIndex.resource_id == FhirResource.id,
               FhirSearchIndex.param == name)
        .scalar_subquery()
    )
    return [key.desc().nulls_last() if desc else key.asc().nulls_last()]


def search_statement(q: SearchQuery, *, drive: bool = True) -> Select[Any]:
    """The SELECT of the matching current resources, without paging or order."""
    return select(FhirResource).where(
        FhirResource.resource_type == q.resource_type, FhirResource.deleted.is_(False), *q.clauses(drive=drive)
    )


# Above this many matches, a page in the default order (newest first) is found by walking the
# (resource_type, last_updated) index and probing each resource, instead of sorting every match.
BROAD_MATCHES = 200


def run_search(store: Store, q: SearchQuery, *, total_limit: int = 1000) -> SearchResult:
    """Execute a parsed search: one page of matches, the resources they _include, whether a next page
    exists, and the total as ``_total`` asks (``q.total``): for ``estimate`` (the default) exact when
    there are at most ``total_limit`` matches and None above, so that a broad search does not count every
    match for each page; always exact for ``accurate`` and ``_summary=count``; for ``none`` only when the
    page is the last one (then it is known without counting)."""
    stmt = search_statement(q)
    cap = None if q.total == "accurate" else total_limit + 1  # count this far: more means "left out"
    with store.read_session() as s:
        if q.summary_count:
            return SearchResult(_count(s, q, stmt, None), [], [])
        order: list[Any] = []
        for name, desc in q.sort:
            order += _sort_key(q.resource_type, name, desc)
        if not q.sort:
            order.append(FhirResource.last_updated.desc())
        order.append(FhirResource.id)
        broad = False
        counted: int | None = None  # matches counted up to cap, when counting them first was cheap
        narrow: list[str] | None = None  # every match's id in page order, when there are few
        if not q.sort and q.indexed:
            if _index_only(q) is not None and q.total != "none" and (cap is None or cap > BROAD_MATCHES):
                counted = _count(s, q, stmt, cap)  # one index-only count: the total and the plan choice
                broad = counted > BROAD_MATCHES
            else:
                # the matches' ids and _lastUpdated, up to BROAD_MATCHES + 1 of them: few (a patient's, the
                # usual search) are sorted here, which gives the page and the total at once, where a count
                # and then the page ran the whole search twice
                found = s.execute(stmt.with_only_columns(FhirResource.id, FhirResource.last_updated)
                                  .limit(BROAD_MATCHES + 1)).all()
                broad = len(found) > BROAD_MATCHES
                if not broad:
                    found.sort(key=lambda row: row[0])
                    # stable: newest first, then by id (in code-point order, PostgreSQL's C collation; the
                    # path a search takes depends on its matches alone, so its pages keep one order)
                    found.sort(key=lambda row: row[1], reverse=True)
                    narrow = [rid for rid, _ in found]
                    counted = len(narrow)
        page: list[tuple[str, dict[str, Any]]]
        if broad:
            # the walk reads the resources newest first and stops after the page: content comes along
            rows = s.execute(search_statement(q, drive=False).with_only_columns(FhirResource.id, FhirResource.content)
                             .order_by(*order).limit(q.count + 1).offset(q.offset)).all()
            has_next = len(rows) > q.count
            page = [(rid, content) for rid, content in rows[: q.count]]
        else:
            # ids first, then their content: sorting carries (id, sort key) rows, not whole resources
            ids = narrow[q.offset: q.offset + q.count + 1] if narrow is not None else list(s.scalars(
                stmt.with_only_columns(FhirResource.id).order_by(*order).limit(q.count + 1).offset(q.offset)))
            has_next = len(ids) > q.count
            ids = ids[: q.count]
            contents: dict[str, dict[str, Any]] = {}
            if ids:
                found_content = s.execute(select(FhirResource.id, FhirResource.content).where(
                    FhirResource.resource_type == q.resource_type, FhirResource.id.in_(ids)))
                contents = {rid: content for rid, content in found_content}
            page = [(rid, contents[rid]) for rid in ids if rid in contents]
        total: int | None
        if not has_next and (page or q.offset == 0):
            total = q.offset + len(page)  # the last page: the total is known without counting
        elif q.total == "none":
            total = None
        else:
            if counted is None:
                counted = _count(s, q, stmt, cap)
            total = counted if cap is None or counted < cap else None
        matches_out = [content for _, content in page]
        included = _included(s, q, [rid for rid, _ in page])
    return SearchResult(total, matches_out, included, has_next)


def _index_only(q: SearchQuery) -> Select[Any] | None:
    """For a search on one indexed parameter and nothing else: the distinct ids of its matching index
    rows. Every index row belongs to a current resource (rows are replaced on update and removed on
    delete), so these are exactly the matches, read from the covering value index alone. None otherwise."""
    if q.where or len(q.indexed) != 1:
        return None
    _, name, cond = q.indexed[0]
    return select(FhirSearchIndex.resource_id).where(
        FhirSearchIndex.resource_type == q.resource_type, FhirSearchIndex.param == name, cond).distinct()


def _count(s: Session, q: SearchQuery, stmt: Select[Any], limit: int | None) -> int:
    """The number of matches of ``q`` (``stmt``), counted up to ``limit`` (None: all of them)."""
    ids = _index_only(q)
    if ids is None:
        ids = stmt.with_only_columns(FhirResource.id)
    if limit is not None:
        ids = ids.limit(limit)
    return s.scalar(select(func.count()).select_from(ids.subquery())) or 0


def _included(s: Session, q: SearchQuery, ids: list[str]) -> list[dict[str, Any]]:
    if not q.includes or not ids:
        return []
    # a parameter indexed as another's (patient as subject) includes only the targets it names
    params = or_(*(and_(FhirSearchIndex.param == p.index_name, FhirSearchIndex.system.in_(p.targets))
                   if p.indexed_as else FhirSearchIndex.param == p.name for p in q.includes))
    targets = s.execute(
        select(FhirSearchIndex.system, FhirSearchIndex.value).where(
            FhirSearchIndex.resource_type == q.resource_type, FhirSearchIndex.resource_id.in_(ids), params)
    ).all()
    keys = sorted({(t, i) for t, i in targets if t and i})
    if not keys:
        return []
    rows = s.scalars(select(FhirResource.content).where(_keys_clause(keys), FhirResource.deleted.is_(False)))
    return list(rows)


def _keys_clause(keys: Sequence[tuple[str, str]]) -> ColumnElement[bool]:
    """(type, id) IN keys, written per type: SQLite scans for a row-value IN but seeks the primary key here."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in keys:
        by_type.setdefault(rtype, []).append(rid)
    return or_(*(and_(FhirResource.resource_type == t, FhirResource.id.in_(i)) for t, i in by_type.items()))


def conditional_key(resource_type: str, criteria: str) -> str:
    """The key that conditional writes of ``criteria`` on ``resource_type`` are serialised by
    (``fhir.storage.serialize_conditional``): the type and the name=value pairs, split and decoded as
    ``matching_ids`` does, sorted, so that the same parameters in another order or another percent-encoding
    are one key. Nothing else is normalised (a repeated parameter, a value's case): criteria that differ here
    but match the same resources only serialise less, never wrongly. Malformed criteria give a key too;
    ``matching_ids`` refuses them after the lock."""
    pairs = sorted((unquote(key), unquote(value)) for key, _, value in
                   (part.partition("=") for part in criteria.lstrip("?").split("&")))
    return orjson.dumps([resource_type, pairs]).decode()


def matching_ids(s: Session, resource_type: str, criteria: str, *, limit: int = 2) -> list[str]:
    """Ids of current resources matching a conditional query string (``identifier=sys|val&...``),
    as used by If-None-Exist, conditional update and conditional transaction entries. Every
    parameter must be supported: criteria are refused (400) rather than partly applied."""
    items = []
    for part in criteria.lstrip("?").split("&"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise _refuse(criteria, f"'{part}' is not a name=value search criterion")
        items.append((key, value))
    if not items:
        raise _refuse(criteria, "conditional criteria are empty")
    q = parse_search(resource_type, [(unquote(k), unquote(v)) for k, v in items], strict=True)
    if not q.where and not q.indexed:
        raise _refuse(criteria, "conditional criteria need at least one search parameter that selects resources")
    stmt = select(FhirResource.id).where(
        FhirResource.resource_type == resource_type, FhirResource.deleted.is_(False), *q.clauses()
    )
    return list(s.scalars(stmt.limit(limit)))


# History ------------------------------------------------------------------------------------------
def type_history(
    store: Store, resource_type: str, *, since: datetime | None, count: int, offset: int
) -> tuple[int, list[tuple[dict[str, Any], bool]]]:
    """Versions of every resource of a type, newest first: (total, [(content, deleted)])."""
    cond = [FhirResourceVersion.resource_type == resource_type]
    if since is not None:
        cond.append(FhirResourceVersion.last_updated >= since)
    with store.read_session() as s:
        total = s.scalar(select(func.count()).select_from(FhirResourceVersion).where(*cond)) or 0
        rows = s.scalars(
            select(FhirResourceVersion)
            .where(*cond)
            .order_by(FhirResourceVersion.last_updated.desc(), FhirResourceVersion.id,
                      FhirResourceVersion.version_id.desc())
            .limit(count)
            .offset(offset)
        )
        return total, [(r.content, r.deleted) for r in rows]


def existing_resources(s: Session, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of the (type, id) pairs are stored and not deleted (primary-key lookups)."""
    found: set[tuple[str, str]] = set()
    for start in range(0, len(keys), 500):
        chunk = list(keys[start : start + 500])
        rows = s.execute(
            select(FhirResource.resource_type, FhirResource.id).where(
                _keys_clause(chunk), FhirResource.deleted.is_(False)
            )
        )
        found.update((t, i) for t, i in rows)
    return found


REINDEX_TASK = "fhir-search-reindex"


def reindex_if_empty(store: Store, batch: int = 500,
                     after_batch: Callable[[int], None] | None = None) -> int:
    """Index every current resource of a store created before the index table (the index empty, resources
    present), in batches in (resource_type, id) order. Each batch commits with its position in
    ``upgrade_progress``, so a restart after a crash resumes after the last committed batch; a finished
    (or needless) reindex is marked finished and never looked at again. ``after_batch(done so far)`` runs
    after each commit (tests interrupt the reindex there). Call it under ``store.exclusive``: one process
    reindexes. Returns how many resources this call indexed."""
    with store.session() as s:
        progress = s.get(UpgradeProgress, REINDEX_TASK)
        if progress is None:
            needed = (s.scalar(select(FhirSearchIndex.row_id).limit(1)) is None
                      and s.scalar(select(FhirResource.id).limit(1)) is not None)
            progress = UpgradeProgress(task=REINDEX_TASK, position=["", ""], done=0,
                                       finished_at=None if needed else utcnow())
            s.add(progress)
        if progress.finished_at is not None:
            return 0
        last = (str(progress.position[0]), str(progress.position[1])) if progress.position else ("", "")
    done = 0
    while True:
        with store.session() as s:
            rows = s.execute(
                select(FhirResource.resource_type, FhirResource.id, FhirResource.content)
                .where(FhirResource.deleted.is_(False),
                       or_(FhirResource.resource_type > last[0],
                           and_(FhirResource.resource_type == last[0], FhirResource.id > last[1])))
                .order_by(FhirResource.resource_type, FhirResource.id)
                .limit(batch)
            ).all()
            progress = s.get(UpgradeProgress, REINDEX_TASK, with_for_update=True)
            assert progress is not None
            if not rows:
                progress.finished_at = utcnow()
                log.info("search reindex finished: %d resources", progress.done)
                return done
            entries = [row for _, _, content in rows for row in index_rows(content)]
            if entries:
                s.connection().execute(insert(FhirSearchIndex), entries)
            last = (rows[-1][0], rows[-1][1])
            progress.position = list(last)
            progress.done += len(rows)
            done += len(rows)
        if after_batch is not None:
            after_batch(done)


def backfill_version_times(store: Store) -> int:
    """Set fhir_resource_versions.last_updated from each version's meta.lastUpdated where it is NULL
    (rows written before the column existed). Returns how many rows were set."""
    from sqlalchemy import update

    done = 0
    while True:
        with store.session() as s:
            rows = s.execute(
                select(FhirResourceVersion.resource_type, FhirResourceVersion.id, FhirResourceVersion.version_id,
                       FhirResourceVersion.content)
                .where(FhirResourceVersion.last_updated.is_(None))
                .limit(500)
            ).all()
            if not rows:
                return done
            for rtype, rid, vid, content in rows:
                stamp = ((content or {}).get("meta") or {}).get("lastUpdated")
                try:
                    when = date_range(stamp)[0] if isinstance(stamp, str) else MIN_DATE
                except ValueError:
                    when = MIN_DATE
                s.execute(update(FhirResourceVersion).where(
                    FhirResourceVersion.resource_type == rtype, FhirResourceVersion.id == rid,
                    FhirResourceVersion.version_id == vid).values(last_updated=when))
            done += len(rows)
