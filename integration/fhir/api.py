"""The FHIR edge: a FHIR R4 REST facade under /fhir.

Interactions: create (also conditional, If-None-Exist), read, vread, update (If-Match; conditional by
search criteria), delete, instance and type ``_history``, search (parameters from the registry in
``integration.fhir.search``), transaction and batch Bundles, and ``metadata`` (generated from this
router and that registry). Every refusal is a 4xx with an OperationOutcome whose ``expression``
names the element.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from integration.app.auditing import RequestAudit, audited
from integration.app.services import Services, body_within, get_services
from integration.audit import events as audit_events
from integration.auth.policy import check_bundle_entries
from integration.db.tables import FhirResource
from integration.errors import (
    ConcurrentWriteError,
    ExplanationUnavailableError,
    InvalidResourceError,
    PreconditionRequiredError,
    ProtectedResourceError,
    QueryTooComplexError,
    ResourceGoneError,
    ResourceNotFoundError,
    ReviewRefusedError,
    StoreUnavailableError,
    VersionConflictError,
)
from integration.fhir import bundles as fhir_bundles
from integration.fhir import search as fhir_search
from integration.fhir.protected import refuse_plain_write
from integration.fhir.resources import (
    is_fhir_id,
    new_id,
    resource_model,
    store_resource,
    subject_of,
    validate_resource,
)
from integration.fhir.storage import (
    delete_resource,
    get_resource,
    get_version,
    history,
    json_text,
    serialize_conditional,
)

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

router = APIRouter(prefix="/fhir", tags=["FHIR R4"])
ServicesDep = Annotated[Services, Depends(get_services)]
T = TypeVar("T")

# Two writers creating the same new id at the same moment (two MedBridge processes on one database, or a
# worker and a request) both find no row: PostgreSQL's SELECT ... FOR UPDATE locks no row that does not
# exist yet, and SQLite takes its write lock only at the first INSERT. The second INSERT then breaks the
# primary key. FHIR R4 (http.html#update, #concurrency) gives an update without If-Match no version
# expectation, and a transaction is all or nothing: the loser, arriving a moment later, would have become
# the next version. So it runs again in a fresh transaction (nothing of the first try was kept), where it
# finds and locks the winner's row; If-Match is checked again there. HAPI FHIR answers this race 409
# Conflict ("version constraint failure ... this request was chosen as the failing request") and runs it
# again when the client sends X-Retry-On-Version-Conflict; running it again is the default here, and the
# 409, telling the client to send it again, is left for a race that outlasts the attempts.
WRITE_ATTEMPTS = 4


def _is_unique_violation(exc: Exception) -> bool:
    orig = getattr(exc, "orig", exc)  # the pipelined INSERTs (fhir.storage.put_resources) raise the driver's own
    return getattr(orig, "sqlstate", None) == "23505" or getattr(orig, "sqlite_errorname", None) in (
        "SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE")


def write_retrying(services: Services, write: Callable[[Session], T]) -> T:
    """``write(session)`` in one transaction, run again (up to WRITE_ATTEMPTS times in all) when a
    concurrent writer created the same key first; ConcurrentWriteError when every attempt lost."""
    driver_error = services.store.engine.dialect.dbapi.IntegrityError  # type: ignore[union-attr]
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with services.store.session(durable=True) as s:
                return write(s)
        except (IntegrityError, driver_error) as exc:
            if not _is_unique_violation(exc):
                raise
            log.info("write lost a race to create the same id (attempt %d of %d)", attempt, WRITE_ATTEMPTS)
    raise ConcurrentWriteError(
        f"other requests wrote the same new resource at the same moment {WRITE_ATTEMPTS} times; nothing of "
        "this request was kept: send it again")


def fhir_response(body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=json_text(body),
        status_code=status_code,
        media_type=FHIR_JSON,
        headers=headers,
    )


def operation_outcome(issues: list[tuple[str, str]], code: str = "invalid", severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": severity, "code": code, "diagnostics": msg, **({"expression": [expr]} if expr else {})}
            for expr, msg in issues
        ],
    }


def outcome_response(status_code: int, issues: list[tuple[str, str]], code: str = "invalid") -> Response:
    return fhir_response(operation_outcome(issues, code), status_code)


async def read_json_body(request: Request, max_bytes: int) -> Any:
    body = await body_within(request, max_bytes)
    if body is None:
        raise InvalidResourceError([("", f"request body exceeds {max_bytes} bytes")], 413)
    # orjson: 3x json.loads (~7 us a resource of a Bundle). It reads an integer beyond 64 bits as the
    # nearest double: more than the 18 digits a FHIR decimal must keep (datatypes.html#decimal). What it
    # refuses goes to json, which says what is wrong, or reads what JSON allows and orjson does not (a
    # lone surrogate escape, which validation then refuses naming the element)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidResourceError([("", f"body is not valid JSON: {exc}")], 400) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def json_body(request: Request, services: ServicesDep) -> Any:
    """The request's JSON, read on the event loop; the route that takes it runs on the thread pool."""
    return await read_json_body(request, services.settings.max_request_bytes)


# The routes below are plain functions, which FastAPI runs on its thread pool: their store work (SQL,
# validation) would otherwise hold the event loop, which this process shares with the broker's
# consumers, the outbox relay and every other request, for as long as a transaction Bundle takes.
# A thread hop costs ~0.2 ms a request.
JsonBody = Annotated[Any, Depends(json_body)]


# the route parameter of a request audited as each interaction (one AuditEvent per request)
ReadAudit = Annotated[RequestAudit, audited(audit_events.FHIR_READ)]
VreadAudit = Annotated[RequestAudit, audited(audit_events.FHIR_VREAD)]
InstanceHistoryAudit = Annotated[RequestAudit, audited(audit_events.FHIR_HISTORY_INSTANCE)]
TypeHistoryAudit = Annotated[RequestAudit, audited(audit_events.FHIR_HISTORY_TYPE)]
SearchAudit = Annotated[RequestAudit, audited(audit_events.FHIR_SEARCH)]
CreateAudit = Annotated[RequestAudit, audited(audit_events.FHIR_CREATE)]
UpdateAudit = Annotated[RequestAudit, audited(audit_events.FHIR_UPDATE)]
DeleteAudit = Annotated[RequestAudit, audited(audit_events.FHIR_DELETE)]
BundleAudit = Annotated[RequestAudit, audited(audit_events.FHIR_TRANSACTION)]


def patient_of(resource: dict[str, Any]) -> str | None:
    """The Patient a resource is about (itself, for a Patient), for the AuditEvent's patient entity."""
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource.get('id')}"
    return subject_of(resource)


def _audit_write(audit: RequestAudit, s: Session, stored: dict[str, Any]) -> None:
    """Record the write of ``stored`` (its new version) in the write's own transaction."""
    audit.about(_location(stored), patient_of(stored))
    audit.within(s)


def _location(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _parse_if_match(value: str | None) -> int | None:
    if not value:
        return None
    digits = value.replace("W/", "").strip('"')
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidResourceError([("If-Match", 'If-Match must be an ETag like W/"3"')], 400)
    return int(digits)


@router.get("/metadata")
async def capability_statement(services: ServicesDep) -> Response:
    return fhir_response(capability_statement_body())


def _preferred(request: Request, stored: dict[str, Any], status_code: int) -> Response:
    """Honour ``Prefer: return=minimal | representation | OperationOutcome``."""
    headers = {"Location": _location(stored), "ETag": _etag(stored), "Last-Modified": stored["meta"]["lastUpdated"]}
    prefer = request.headers.get("prefer", "").replace(" ", "").lower()
    if "return=minimal" in prefer:
        return Response(status_code=status_code, headers=headers)
    if "return=operationoutcome" in prefer:
        body = operation_outcome([("", f"{_location(stored)} stored")], code="informational", severity="information")
        return fhir_response(body, status_code, headers)
    return fhir_response(stored, status_code, headers)


def _conditional_matches(s: Session, resource_type: str, criteria: str, header: str) -> list[str]:
    """Ids of resources matching conditional criteria (at most two: enough to tell 0, 1 or many), searched
    in ``s`` once it holds the criteria's lock (``fhir.storage.serialize_conditional``): the caller writes in the
    same transaction, so no concurrent request of the same criteria can create a match meanwhile."""
    serialize_conditional(s, [fhir_search.conditional_key(resource_type, criteria)])
    try:
        return fhir_search.matching_ids(s, resource_type, criteria)
    except InvalidResourceError as exc:
        raise InvalidResourceError([(header, f"{m} (in {e})") for e, m in exc.issues], 400) from None


@router.post("/{resource_type}")
def create(resource_type: str, request: Request, services: ServicesDep, audit: CreateAudit, data: JsonBody
           ) -> Response:
    resource = validate_resource(data, resource_type)
    # the standard carries the criteria in If-None-Exist; some clients (fhirpy's get_or_create) send them as
    # the query string: both are honoured, never ignored
    header = "If-None-Exist" if request.headers.get("if-none-exist") else "url"
    condition = request.headers.get("if-none-exist") or request.url.query
    resource = {**resource, "id": new_id()}  # the server assigns ids on create
    if condition:
        def create_unless_matched(s: Session) -> tuple[dict[str, Any], bool]:
            existing = _conditional_matches(s, resource_type, condition, header)
            if len(existing) > 1:
                raise InvalidResourceError([(header, "more than one resource matches")], 412)
            current = s.get(FhirResource, (resource_type, existing[0])) if existing else None
            if current is not None and not current.deleted:  # (a DELETE does not take the criteria's lock)
                _audit_write(audit, s, current.content)
                return current.content, False  # already there: nothing is created
            written = store_resource(s, resource)
            _audit_write(audit, s, written[0])
            return written

        stored, created = write_retrying(services, create_unless_matched)
        if not created:
            return _preferred(request, stored, 200)
    else:
        with services.store.session(durable=True) as s:
            stored, _ = store_resource(s, resource)
            _audit_write(audit, s, stored)
    services.notify_outbox()
    log.info("created %s %s", resource_type, stored["id"])
    return _preferred(request, stored, 201)


@router.put("/{resource_type}")
def conditional_update(resource_type: str, request: Request, services: ServicesDep, audit: UpdateAudit,
                       data: JsonBody) -> Response:
    """``PUT /fhir/Patient?identifier=sys|val``: no match creates, one match updates it, more is 412."""
    criteria = request.url.query
    if not criteria:
        raise InvalidResourceError([("", "PUT needs an id in the URL (Type/id) or search criteria (Type?...)")], 400)
    resource = validate_resource(data, resource_type)
    if_match = _parse_if_match(request.headers.get("if-match"))
    fresh_id = resource.get("id") or new_id()

    def update_or_create(s: Session) -> tuple[dict[str, Any], bool]:
        # searched and written in one transaction under the criteria's lock: two of these with no match
        # make one resource, the second updating the first's, as it would arriving a moment later
        matches = _conditional_matches(s, resource_type, criteria, "url")
        if len(matches) > 1:
            raise InvalidResourceError([("url", f"{len(matches)} or more resources match {criteria}")], 412)
        rid = matches[0] if matches else fresh_id
        if resource.get("id") not in (None, rid):
            raise InvalidResourceError([(f"{resource_type}.id", f"the body's id differs from the match {rid}")], 400)
        refuse_plain_write(s, resource_type, rid)
        written = store_resource(s, {**resource, "id": rid}, if_match=if_match)
        _audit_write(audit, s, written[0])
        return written

    stored, created = write_retrying(services, update_or_create)
    services.notify_outbox()
    return _preferred(request, stored, 201 if created else 200)


@router.put("/{resource_type}/{resource_id}")
def update(resource_type: str, resource_id: str, request: Request, services: ServicesDep, audit: UpdateAudit,
           data: JsonBody) -> Response:
    resource = validate_resource(data, resource_type)
    if resource.get("id") != resource_id:
        raise InvalidResourceError([(f"{resource_type}.id", "the body's id must equal the id in the URL")], 400)
    if_match = _parse_if_match(request.headers.get("if-match"))

    def write(s: Session) -> tuple[dict[str, Any], bool]:
        refuse_plain_write(s, resource_type, resource_id)
        written = store_resource(s, resource, if_match=if_match)
        _audit_write(audit, s, written[0])
        return written

    stored, created = write_retrying(services, write)
    services.notify_outbox()
    return _preferred(request, stored, 201 if created else 200)


def _history_bundle(versions: list[tuple[dict[str, Any], bool]], total: int, links: list[dict[str, str]]) -> Response:
    entries = []
    for content, deleted in versions:
        rtype, rid, vid = content["resourceType"], content["id"], content["meta"]["versionId"]
        entry: dict[str, Any] = {
            "fullUrl": f"{rtype}/{rid}",
            "request": {
                "method": "DELETE" if deleted else ("POST" if vid == "1" else "PUT"),
                "url": f"{rtype}/{rid}" if vid != "1" or deleted else rtype,
            },
            "response": {
                "status": "204" if deleted else ("201" if vid == "1" else "200"),
                "etag": f'W/"{vid}"',
                "lastModified": content["meta"]["lastUpdated"],
            },
        }
        if not deleted:
            entry["resource"] = content
        entries.append(entry)
    body: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": total, "entry": entries}
    if links:
        body["link"] = links
    return fhir_response(body)


def _page_links(request: Request, offset: int, count: int, has_next: bool) -> list[dict[str, str]]:
    """self, and next/previous as the same query with another _offset."""
    links = [{"relation": "self", "url": str(request.url)}]
    if count and has_next:
        links.append({"relation": "next", "url": str(request.url.include_query_params(_offset=offset + count,
                                                                                       _count=count))})
    if count and offset > 0:
        prev = request.url.include_query_params(_offset=max(offset - count, 0), _count=count)
        links.append({"relation": "previous", "url": str(prev)})
    return links


@router.get("/{resource_type}/_history")
def type_history(resource_type: str, request: Request, services: ServicesDep, audit: TypeHistoryAudit) -> Response:
    """Every version of every resource of a type, newest first; ``_since`` (instant), ``_count``, ``_offset``."""
    resource_model(resource_type)
    audit.add(audit_events.query_entity(request.url.query, f"{resource_type}/_history"))
    params = request.query_params
    unknown = sorted(set(params) - {"_since", "_count", "_offset", "_format"})
    if unknown:
        raise InvalidResourceError([(p, f"'{p}' is not supported by _history (use _since, _count)") for p in unknown])
    since = None
    if "_since" in params:
        try:
            since = datetime.fromisoformat(params["_since"].replace("Z", "+00:00"))
        except ValueError:
            raise InvalidResourceError([("_since", "_since must be an instant like 2026-01-01T00:00:00Z")]) from None
        if since.tzinfo is None:
            raise InvalidResourceError([("_since", "_since must carry a time zone (Z or +hh:mm)")])
    count = fhir_search.non_negative_int("_count", params.get("_count", str(fhir_search.DEFAULT_COUNT)),
                                         at_most=fhir_search.MAX_COUNT, clamp=True)
    offset = fhir_search.non_negative_int("_offset", params.get("_offset", "0"), at_most=fhir_search.MAX_OFFSET)
    total, versions = fhir_search.type_history(services.store, resource_type, since=since, count=count, offset=offset)
    return _history_bundle(versions, total, _page_links(request, offset, count, offset + count < total))


def _storable_id(resource_type: str, resource_id: str) -> str:
    """``resource_id``, if it is an id a resource can be stored under; else ResourceNotFoundError (404, as
    for any unknown id), without asking the database (PostgreSQL refuses a NUL in it, for one)."""
    if not is_fhir_id(resource_id):
        raise ResourceNotFoundError(resource_type, resource_id)
    return resource_id


@router.get("/{resource_type}/{resource_id}")
def read(resource_type: str, resource_id: str, services: ServicesDep, audit: ReadAudit) -> Response:
    audit.about(f"{resource_type}/{resource_id}")
    _storable_id(resource_type, resource_id)
    stored = get_resource(services.store, resource_type, resource_id)
    audit.about(f"{resource_type}/{resource_id}", patient_of(stored))
    return fhir_response(stored, 200, {"ETag": _etag(stored), "Last-Modified": stored["meta"]["lastUpdated"]})


@router.get("/{resource_type}/{resource_id}/_history/{version_id}")
def vread(resource_type: str, resource_id: str, version_id: str, services: ServicesDep, audit: VreadAudit
          ) -> Response:
    if not (version_id.isascii() and version_id.isdigit()):
        raise InvalidResourceError([("", "a version id is a positive integer")], 400)
    _storable_id(resource_type, resource_id)
    if len(version_id) > 9:  # beyond the version column's range (32 bits): no resource has that many versions
        raise ResourceNotFoundError(resource_type, f"{resource_id}/_history/{version_id}")
    audit.about(f"{resource_type}/{resource_id}/_history/{version_id}")
    stored = get_version(services.store, resource_type, resource_id, int(version_id))
    audit.about(f"{resource_type}/{resource_id}/_history/{version_id}", patient_of(stored))
    return fhir_response(stored, 200, {"ETag": _etag(stored), "Last-Modified": stored["meta"]["lastUpdated"]})


@router.get("/{resource_type}/{resource_id}/_history")
def instance_history(resource_type: str, resource_id: str, services: ServicesDep, audit: InstanceHistoryAudit
                     ) -> Response:
    _storable_id(resource_type, resource_id)
    audit.about(f"{resource_type}/{resource_id}")
    versions = history(services.store, resource_type, resource_id)
    audit.about(f"{resource_type}/{resource_id}", patient_of(versions[0][0]) if not versions[0][1] else None)
    return _history_bundle(versions, len(versions), [])


@router.delete("/{resource_type}/{resource_id}")
def delete(resource_type: str, resource_id: str, services: ServicesDep, audit: DeleteAudit) -> Response:
    audit.about(f"{resource_type}/{resource_id}")
    if not is_fhir_id(resource_id):  # nothing is stored under it: deleted already, as an unknown id is
        return Response(status_code=204)
    with services.store.session(durable=True) as s:
        refuse_plain_write(s, resource_type, resource_id)
        version = delete_resource(s, resource_type, resource_id)
        if version:
            audit.about(f"{resource_type}/{resource_id}/_history/{version}")
        audit.within(s)
    headers = {"ETag": f'W/"{version}"'} if version else {}
    return Response(status_code=204, headers=headers)


@router.get("/{resource_type}")
def search(resource_type: str, request: Request, services: ServicesDep, audit: SearchAudit) -> Response:
    """Search with the registry's parameters. Lenient handling (the default) ignores what it cannot
    process and says so in an OperationOutcome entry (search.mode=outcome); ``Prefer: handling=strict``
    refuses the same with 400."""
    resource_model(resource_type)  # 404 for anything that is not a resource type
    strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
    query = fhir_search.parse_search(resource_type, request.query_params.multi_items(), strict=strict)
    audit.about(patient=_searched_patient(request))
    audit.add(audit_events.query_entity(request.url.query, f"{resource_type} search"))
    result = fhir_search.run_search(services.store, query, total_limit=services.settings.fhir_exact_total_limit)
    base = str(request.url).split("?")[0]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        **({"total": result.total} if result.total is not None else {}),
        "link": _page_links(request, query.offset, 0 if query.summary_count else query.count, result.has_next),
        "entry": [{"fullUrl": f"{base}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                  for r in result.matches],
    }
    root = base.rsplit("/", 1)[0]
    bundle["entry"] += [
        {"fullUrl": f"{root}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "include"}}
        for r in result.included
    ]
    if query.ignored:
        outcome = operation_outcome(query.ignored, code="not-supported", severity="warning")
        bundle["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
    if not bundle["entry"]:
        del bundle["entry"]
    return fhir_response(bundle)


def _searched_patient(request: Request) -> str | None:
    """The Patient a search is restricted to (``patient=`` or ``subject=Patient/...``), for its AuditEvent."""
    for name in ("patient", "subject", "_id" if request.url.path.endswith("/Patient") else ""):
        value = request.query_params.get(name) if name else None
        if value and "," not in value:
            value = value.rsplit("/", 1)[-1]
            return f"Patient/{value}" if is_fhir_id(value) else None
    return None


# Bundles ------------------------------------------------------------------------------------------
def _response_entry(stored: dict[str, Any], created: bool) -> dict[str, Any]:
    return {
        "fullUrl": f"{stored['resourceType']}/{stored['id']}",
        "response": {
            "status": "201 Created" if created else "200 OK",
            "location": _location(stored),
            "etag": _etag(stored),
            "lastModified": stored["meta"]["lastUpdated"],
        },
    }


def _apply(s: Any, prepared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_response_entry(stored, created) for stored, created in fhir_bundles.write_entries(s, prepared)]


@router.post("")
@router.post("/")
def transaction_or_batch(request: Request, services: ServicesDep, audit: BundleAudit, data: JsonBody) -> Response:
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise InvalidResourceError([("resourceType", "POST to the base URL takes a Bundle")], 400)
    kind = data.get("type")
    entries = data.get("entry") or []
    if kind not in {"transaction", "batch"}:
        raise InvalidResourceError([("Bundle.type", "Bundle.type must be 'transaction' or 'batch'")], 400)
    if not isinstance(entries, list):
        raise InvalidResourceError([("Bundle.entry", "Bundle.entry must be a list")], 400)
    # the router's policy checked the token; each entry needs the scope its interaction alone would
    check_bundle_entries(request.state.principal, entries)
    # one AuditEvent for the Bundle, not one per entry: an EHR's push stays one small extra row
    audit.add(audit_events.Entity(None, "2", "4", description=f"{kind} Bundle of {len(entries)} entries"))
    if kind == "transaction":
        # all or nothing: one session, and any refused entry rolls back the whole bundle
        workers = services.fhir_validation

        def write(s: Session) -> list[tuple[dict[str, Any], bool]]:
            done = fhir_bundles.write_transaction(s, entries, workers)
            audit.within(s)  # with the entries, in their transaction
            return done

        written = write_retrying(services, write)
        results = [_response_entry(stored, created) for stored, created in written]
        services.notify_outbox()
        return fhir_response({"resourceType": "Bundle", "type": "transaction-response", "entry": results})
    audit.record.interaction = audit_events.FHIR_BATCH  # recorded after the entries, each its own transaction
    out = []
    for i, entry in enumerate(entries):
        try:
            # batch entries are independent: like a plain create, they may point at what comes later
            out += write_retrying(services, lambda s, entry=entry: _apply(
                s, fhir_bundles.prepare_entries(s, [entry], check_targets=False)))
        except (InvalidResourceError, VersionConflictError, ConcurrentWriteError) as exc:
            issues = exc.issues if isinstance(exc, InvalidResourceError) else [("", str(exc))]
            status = exc.status_code if isinstance(exc, InvalidResourceError) else (
                412 if isinstance(exc, VersionConflictError) else 409)
            out.append(
                {
                    "response": {
                        "status": f"{status}",
                        "outcome": operation_outcome(
                            [(e.replace("Bundle.entry[0]", f"Bundle.entry[{i}]"), m) for e, m in issues]
                        ),
                    }
                }
            )
    services.notify_outbox()
    return fhir_response({"resourceType": "Bundle", "type": "batch-response", "entry": out})


# CapabilityStatement ------------------------------------------------------------------------------
# The interaction each route implements; metadata lists a route's interaction only if the route exists.
_TYPE_INTERACTIONS = {
    read: "read",
    vread: "vread",
    update: "update",
    delete: "delete",
    instance_history: "history-instance",
    type_history: "history-type",
    create: "create",
    search: "search-type",
}
_SYSTEM_INTERACTIONS = {transaction_or_batch: ("transaction", "batch")}
SOFTWARE_VERSION = "0.1.0"


def capability_statement_body() -> dict[str, Any]:
    """The CapabilityStatement, generated from this router's routes and the search registry."""
    endpoints = {getattr(r, "endpoint", None) for r in router.routes}
    interactions = [{"code": code} for fn, code in _TYPE_INTERACTIONS.items() if fn in endpoints]
    common = [{"name": n, "type": t} for n, t in fhir_search.COMMON_PARAMS.items()]
    resources = []
    for rtype in sorted(fhir_search.REGISTRY):
        params = fhir_search.params_for(rtype).values()
        resources.append(
            {
                "type": rtype,
                "interaction": interactions,
                "versioning": "versioned",
                "readHistory": vread in endpoints,
                "updateCreate": True,
                "conditionalCreate": create in endpoints,
                "conditionalUpdate": conditional_update in endpoints,
                "conditionalDelete": "not-supported",
                "searchInclude": fhir_search.include_values(rtype),
                "searchParam": common + [{"name": p.name, "type": p.type} for p in params],
            }
        )
    system = [{"code": c} for fn, codes in _SYSTEM_INTERACTIONS.items() if fn in endpoints for c in codes]
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "kind": "instance",
        "software": {"name": "MedBridge", "version": SOFTWARE_VERSION},
        "implementation": {"description": "MedBridge FHIR facade"},
        "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": "Search result parameters: " + ", ".join(fhir_search.RESULT_PARAMS)
                + "; _summary=count; _sort by " + "/".join(["_id", "_lastUpdated", "date parameters"])
                + "; _total=" + "|".join(fhir_search.TOTAL_VALUES) + " (default estimate: Bundle.total is exact"
                " up to MEDBRIDGE_FHIR_EXACT_TOTAL_LIMIT matches and left out above; accurate always counts;"
                " none counts nothing and gives the total only on the last page)",
                "resource": resources,
                "interaction": system,
            }
        ],
    }
    get_fhir_model_class("CapabilityStatement").model_validate(body)
    return body


def install_exception_handlers(app: Any) -> None:
    """Translate MedBridge errors into FHIR OperationOutcomes (one of the three translation points)."""

    @app.exception_handler(InvalidResourceError)
    async def _invalid(_: Request, exc: InvalidResourceError) -> Response:
        code = "not-supported" if exc.status_code == 404 else ("too-costly" if exc.status_code == 413 else "invalid")
        return outcome_response(exc.status_code, exc.issues, code)

    @app.exception_handler(ResourceNotFoundError)
    async def _missing(_: Request, exc: ResourceNotFoundError) -> Response:
        if isinstance(exc, ResourceGoneError):
            return outcome_response(410, [("", str(exc))], "deleted")
        return outcome_response(404, [("", str(exc))], "not-found")

    @app.exception_handler(VersionConflictError)
    async def _conflict(_: Request, exc: VersionConflictError) -> Response:
        return outcome_response(412, [("", str(exc))], "conflict")

    @app.exception_handler(ConcurrentWriteError)
    async def _concurrent(_: Request, exc: ConcurrentWriteError) -> Response:
        return outcome_response(409, [("", str(exc))], "conflict")

    @app.exception_handler(ProtectedResourceError)
    async def _protected(_: Request, exc: ProtectedResourceError) -> Response:
        return outcome_response(409, [("", str(exc))], "business-rule")

    @app.exception_handler(ReviewRefusedError)
    async def _refused(_: Request, exc: ReviewRefusedError) -> Response:
        return outcome_response(409, [("DiagnosticReport.status", str(exc))], "business-rule")

    @app.exception_handler(ExplanationUnavailableError)
    async def _unexplained(_: Request, exc: ExplanationUnavailableError) -> Response:
        return outcome_response(409, [("sop_instance_uid", str(exc))], "business-rule")

    @app.exception_handler(PreconditionRequiredError)
    async def _precondition(_: Request, exc: PreconditionRequiredError) -> Response:
        return outcome_response(428, [("If-Match", str(exc))], "required")

    @app.exception_handler(QueryTooComplexError)
    async def _too_complex(_: Request, exc: QueryTooComplexError) -> Response:
        # it fails again however often it is retried: 400, never 503 transient (the database says no more)
        return outcome_response(400, [("", "the search has more conditions than the database can evaluate; "
                                           "send fewer repeated parameters or comma-separated values")],
                                "too-costly")

    @app.exception_handler(StoreUnavailableError)
    async def _unavailable(_: Request, exc: StoreUnavailableError) -> Response:
        return outcome_response(503, [("", "the store is unavailable; retry later")], "transient")
