"""The FHIR edge: a FHIR R4 REST facade under /fhir.

Interactions: create, read, update, search (``_id``, ``subject``/``patient``, ``status``,
``identifier``, ``_count``, ``_offset``), transaction and batch Bundles, and ``metadata``.
Every refusal is a 4xx with an OperationOutcome whose ``expression`` names the element.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fhir.resources.R4B import get_fhir_model_class

from integration.errors import (
    InvalidResourceError,
    ResourceGoneError,
    ResourceNotFoundError,
    StoreUnavailableError,
    VersionConflictError,
)
from integration.fhir_resources import (
    new_id,
    normalise_reference,
    resource_model,
    store_resource,
    validate_resource,
)
from integration.services import Services, get_services

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
SEARCH_PARAMS = {"_id", "subject", "patient", "status", "identifier", "_count", "_offset", "_format"}

router = APIRouter(prefix="/fhir", tags=["FHIR R4"])
ServicesDep = Annotated[Services, Depends(get_services)]


def fhir_response(body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=json.dumps(body, separators=(",", ":")),
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


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def read_json_body(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidResourceError([("", f"request body exceeds {max_bytes} bytes")], 413)
    body = await request.body()
    if len(body) > max_bytes:
        raise InvalidResourceError([("", f"request body exceeds {max_bytes} bytes")], 413)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidResourceError([("", f"body is not valid JSON: {exc}")], 400) from None


def _location(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _parse_if_match(value: str | None) -> int | None:
    if not value:
        return None
    digits = value.replace("W/", "").strip('"')
    if not digits.isdigit():
        raise InvalidResourceError([("If-Match", 'If-Match must be an ETag like W/"3"')], 400)
    return int(digits)


@router.get("/metadata")
async def capability_statement(services: ServicesDep) -> Response:
    search = [
        {"name": n, "type": t}
        for n, t in (
            ("_id", "token"),
            ("subject", "reference"),
            ("patient", "reference"),
            ("status", "token"),
            ("identifier", "token"),
        )
    ]
    types = [
        "Patient",
        "Condition",
        "Observation",
        "Encounter",
        "MedicationRequest",
        "AllergyIntolerance",
        "Procedure",
        "DocumentReference",
        "ImagingStudy",
        "DiagnosticReport",
        "ServiceRequest",
    ]
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "kind": "instance",
        "software": {"name": "MedBridge", "version": "0.1.0"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": t,
                        "interaction": [
                            {"code": c}
                            for c in ("read", "vread", "create", "update", "delete", "history-instance", "search-type")
                        ],
                        "versioning": "versioned",
                        "conditionalCreate": True,
                        "searchParam": search,
                    }
                    for t in types
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
    get_fhir_model_class("CapabilityStatement").model_validate(body)
    return fhir_response(body)


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


def _conditional_matches(services: Services, resource_type: str, criteria: str) -> list[dict[str, Any]]:
    """Resources matching an If-None-Exist query (``identifier=system|value`` or ``_id=...``)."""
    params = dict(p.split("=", 1) for p in criteria.lstrip("?").split("&") if "=" in p)
    unknown = set(params) - {"identifier", "_id"}
    if unknown or not params:
        raise InvalidResourceError(
            [("If-None-Exist", "If-None-Exist supports the identifier and _id search parameters")], 400
        )
    rows, _ = services.store.search_resources(
        resource_type,
        ids=params["_id"].split(",") if "_id" in params else None,
        identifier=params.get("identifier"),
        limit=2,
    )
    return rows


@router.post("/{resource_type}")
async def create(resource_type: str, request: Request, services: ServicesDep) -> Response:
    data = await read_json_body(request, services.settings.max_request_bytes)
    resource = validate_resource(data, resource_type)
    condition = request.headers.get("if-none-exist")
    if condition:
        existing = _conditional_matches(services, resource_type, condition)
        if len(existing) > 1:
            raise InvalidResourceError([("If-None-Exist", "more than one resource matches")], 412)
        if existing:
            return _preferred(request, existing[0], 200)  # already there: nothing is created
    resource = {**resource, "id": new_id()}  # the server assigns ids on create
    with services.store.session() as s:
        stored, _ = store_resource(s, resource)
    services.notify_outbox()
    log.info("created %s %s", resource_type, stored["id"])
    return _preferred(request, stored, 201)


@router.put("/{resource_type}/{resource_id}")
async def update(resource_type: str, resource_id: str, request: Request, services: ServicesDep) -> Response:
    data = await read_json_body(request, services.settings.max_request_bytes)
    resource = validate_resource(data, resource_type)
    if resource.get("id") != resource_id:
        raise InvalidResourceError([(f"{resource_type}.id", "the body's id must equal the id in the URL")], 400)
    if_match = _parse_if_match(request.headers.get("if-match"))
    with services.store.session() as s:
        stored, created = store_resource(s, resource, if_match=if_match)
    services.notify_outbox()
    return _preferred(request, stored, 201 if created else 200)


@router.get("/{resource_type}/{resource_id}")
async def read(resource_type: str, resource_id: str, services: ServicesDep) -> Response:
    stored = services.store.get_resource(resource_type, resource_id)
    return fhir_response(stored, 200, {"ETag": _etag(stored), "Last-Modified": stored["meta"]["lastUpdated"]})


@router.get("/{resource_type}/{resource_id}/_history/{version_id}")
async def vread(resource_type: str, resource_id: str, version_id: str, services: ServicesDep) -> Response:
    if not version_id.isdigit():
        raise InvalidResourceError([("", "a version id is a positive integer")], 400)
    stored = services.store.get_version(resource_type, resource_id, int(version_id))
    return fhir_response(stored, 200, {"ETag": _etag(stored), "Last-Modified": stored["meta"]["lastUpdated"]})


@router.get("/{resource_type}/{resource_id}/_history")
async def instance_history(resource_type: str, resource_id: str, services: ServicesDep) -> Response:
    versions = services.store.history(resource_type, resource_id)
    entries = []
    for content, deleted in versions:
        vid = content["meta"]["versionId"]
        entry: dict[str, Any] = {
            "fullUrl": f"{resource_type}/{resource_id}",
            "request": {
                "method": "DELETE" if deleted else ("POST" if vid == "1" else "PUT"),
                "url": f"{resource_type}/{resource_id}" if vid != "1" or deleted else resource_type,
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
    return fhir_response({"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries})


@router.delete("/{resource_type}/{resource_id}")
async def delete(resource_type: str, resource_id: str, services: ServicesDep) -> Response:
    with services.store.session() as s:
        version = services.store.delete_resource(s, resource_type, resource_id)
    headers = {"ETag": f'W/"{version}"'} if version else {}
    return Response(status_code=204, headers=headers)


@router.get("/{resource_type}")
async def search(resource_type: str, request: Request, services: ServicesDep) -> Response:
    resource_model(resource_type)  # 404 for anything that is not a resource type
    params = request.query_params
    unknown = sorted(set(params.keys()) - SEARCH_PARAMS)
    ignored = [(p, f"search parameter '{p}' is not supported and was ignored") for p in unknown]
    # FHIR search: lenient handling (the default) ignores what it cannot process and says so in an
    # OperationOutcome entry; Prefer: handling=strict turns the same into an error.
    if unknown and "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower():
        return outcome_response(
            400, [(p, f"search parameter '{p}' is not supported") for p in unknown], "not-supported"
        )
    try:
        count = min(int(params.get("_count", "50")), 500)
        offset = max(int(params.get("_offset", "0")), 0)
    except ValueError:
        return outcome_response(400, [("_count", "_count and _offset must be integers")])
    subject = normalise_reference(params.get("subject") or params.get("patient"))
    if subject and "/" not in subject:
        subject = f"Patient/{subject}"
    status = params.get("status")
    rows, total = services.store.search_resources(
        resource_type,
        ids=params.get("_id", "").split(",") if params.get("_id") else None,
        subject_ref=subject,
        status=status.split(",") if status else None,
        identifier=params.get("identifier"),
        limit=count,
        offset=offset,
    )
    base = str(request.url).split("?")[0]
    links = [{"relation": "self", "url": str(request.url)}]
    if offset + count < total:
        nxt = request.url.include_query_params(_offset=offset + count, _count=count)
        links.append({"relation": "next", "url": str(nxt)})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [{"fullUrl": f"{base}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in rows],
    }
    if ignored:
        outcome = operation_outcome(ignored, code="not-supported", severity="warning")
        bundle["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
    return fhir_response(bundle)


# Bundles ------------------------------------------------------------------------------------------
def _rewrite_references(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in mapping:
                out[k] = mapping[v]
            else:
                out[k] = _rewrite_references(v, mapping)
        return out
    if isinstance(node, list):
        return [_rewrite_references(v, mapping) for v in node]
    return node


def _entry_target(entry: dict[str, Any], index: int) -> tuple[str, str, str | None]:
    """(method, resource type, id from URL) of a Bundle entry's request."""
    req = entry.get("request") or {}
    method = str(req.get("method", "")).upper()
    url = str(req.get("url", ""))
    if method not in {"POST", "PUT"}:
        raise InvalidResourceError(
            [(f"Bundle.entry[{index}].request.method", f"method '{method or '?'}' is not supported in bundles")], 400
        )
    parts = [p for p in url.split("?")[0].split("/") if p]
    if not parts:
        raise InvalidResourceError([(f"Bundle.entry[{index}].request.url", "request.url is required")], 400)
    return method, parts[0], parts[1] if method == "PUT" and len(parts) > 1 else None


def _prepare_entries(entries: list[Any]) -> list[dict[str, Any]]:
    """Validate every entry and assign ids; resolve urn:uuid references between entries."""
    prepared: list[dict[str, Any]] = []
    mapping: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise InvalidResourceError([(f"Bundle.entry[{i}].resource", "each entry needs a resource")], 400)
        method, rtype, url_id = _entry_target(entry, i)
        resource = entry["resource"]
        if resource.get("resourceType") != rtype:
            raise InvalidResourceError(
                [
                    (
                        f"Bundle.entry[{i}].resource.resourceType",
                        f"entry is a {resource.get('resourceType')}, request.url names {rtype}",
                    )
                ],
                400,
            )
        rid = url_id if method == "PUT" else new_id()
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            mapping[full_url] = f"{rtype}/{rid}"
        prepared.append({"resource": {**resource, "id": rid}, "index": i})
    for p in prepared:
        p["resource"] = _rewrite_references(p["resource"], mapping)
        try:
            validate_resource(p["resource"])
        except InvalidResourceError as exc:
            exc.issues = [(f"Bundle.entry[{p['index']}].resource.{e.split('.', 1)[-1]}", m) for e, m in exc.issues]
            raise
        unresolved = _unresolved_urns(p["resource"])
        if unresolved:
            raise InvalidResourceError(
                [(f"Bundle.entry[{p['index']}].resource", f"reference {unresolved} matches no entry's fullUrl")], 400
            )
    return prepared


def _unresolved_urns(node: Any) -> str | None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.startswith("urn:uuid:"):
            return ref
        for v in node.values():
            found = _unresolved_urns(v)
            if found:
                return found
    elif isinstance(node, list):
        for v in node:
            found = _unresolved_urns(v)
            if found:
                return found
    return None


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


@router.post("")
@router.post("/")
async def transaction_or_batch(request: Request, services: ServicesDep) -> Response:
    data = await read_json_body(request, services.settings.max_request_bytes)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise InvalidResourceError([("resourceType", "POST to the base URL takes a Bundle")], 400)
    kind = data.get("type")
    entries = data.get("entry") or []
    if kind not in {"transaction", "batch"}:
        raise InvalidResourceError([("Bundle.type", "Bundle.type must be 'transaction' or 'batch'")], 400)
    if not isinstance(entries, list):
        raise InvalidResourceError([("Bundle.entry", "Bundle.entry must be a list")], 400)
    if kind == "transaction":
        prepared = _prepare_entries(entries)  # all or nothing: any invalid entry refuses the whole bundle
        with services.store.session() as s:
            results = [store_resource(s, p["resource"]) for p in prepared]
        services.notify_outbox()
        return fhir_response(
            {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [_response_entry(st, c) for st, c in results],
            }
        )
    out = []
    for i, entry in enumerate(entries):
        try:
            (p,) = _prepare_entries([entry])
            with services.store.session() as s:
                stored, created = store_resource(s, p["resource"])
            out.append(_response_entry(stored, created))
        except InvalidResourceError as exc:
            out.append(
                {
                    "response": {
                        "status": f"{exc.status_code}",
                        "outcome": operation_outcome(
                            [(e.replace("Bundle.entry[0]", f"Bundle.entry[{i}]"), m) for e, m in exc.issues]
                        ),
                    }
                }
            )
    services.notify_outbox()
    return fhir_response({"resourceType": "Bundle", "type": "batch-response", "entry": out})


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

    @app.exception_handler(StoreUnavailableError)
    async def _unavailable(_: Request, exc: StoreUnavailableError) -> Response:
        return outcome_response(503, [("", "the store is unavailable; retry later")], "transient")
