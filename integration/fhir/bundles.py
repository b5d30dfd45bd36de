"""Transaction and batch Bundle entries: validation, conditional entries (``ifNoneExist``, conditional
``PUT`` URLs), ids, ``urn:uuid`` resolution, reference targets, and the writes.

``prepare_entries`` refuses with InvalidResourceError naming ``Bundle.entry[i]...``; ``write_entries``
stores what it prepared. Both take the session of the one database transaction a Bundle runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from integration.db.tables import FhirResource
from integration.errors import InvalidResourceError
from integration.fhir import search as fhir_search
from integration.fhir.protected import refuse_plain_writes
from integration.fhir.resources import is_fhir_id, new_id, resource_model, store_resources
from integration.fhir.storage import serialize_conditional
from integration.fhir.validation import Outcome, Share, ValidationWorkers, outcome_of

# (method, resource type, id from URL, conditional criteria) of a Bundle entry's request
Target = tuple[str, str, str | None, str | None]


def _entry_target(entry: dict[str, Any], index: int) -> Target:
    """(method, resource type, id from URL, conditional criteria) of a Bundle entry's request."""
    req = entry.get("request") or {}
    if not isinstance(req, dict):
        raise InvalidResourceError([(f"Bundle.entry[{index}].request", "request must be an object")], 400)
    method = str(req.get("method", "")).upper()
    url = req.get("url")
    if method not in {"POST", "PUT"}:
        raise InvalidResourceError(
            [(f"Bundle.entry[{index}].request.method", f"method '{method or '?'}' is not supported in bundles")], 400
        )
    if not isinstance(url, str) or not url.strip("/"):
        raise InvalidResourceError([(f"Bundle.entry[{index}].request.url", "request.url is required")], 400)
    path, _, criteria = url.partition("?")
    parts = [p for p in path.split("/") if p]
    if method == "POST":
        condition = req.get("ifNoneExist")
        if condition is not None and not isinstance(condition, str):
            raise InvalidResourceError([(f"Bundle.entry[{index}].request.ifNoneExist", "must be a string")], 400)
        return method, parts[0], None, condition or None
    if len(parts) == 1 and criteria:
        return method, parts[0], None, criteria
    if len(parts) != 2:
        raise InvalidResourceError(
            [(f"Bundle.entry[{index}].request.url", "a PUT url is Type/id or Type?search-criteria")], 400
        )
    if not is_fhir_id(parts[1]):
        raise InvalidResourceError(
            [(f"Bundle.entry[{index}].request.url", "the id of a PUT url is 1 to 64 letters, digits, '-' or '.'")], 400
        )
    return method, parts[0], parts[1], None


def _entry_targets(entries: list[Any]) -> list[Target | InvalidResourceError]:
    """``_entry_target`` of each entry, or the refusal it raised (raised in the entry's turn by
    ``_targets_and_references``, so that the first faulty entry is the one named); a refusal too for an
    entry that is not an object."""
    targets: list[Target | InvalidResourceError] = []
    for i, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise InvalidResourceError([(f"Bundle.entry[{i}].resource", "each entry needs a resource")], 400)
            targets.append(_entry_target(entry, i))
        except InvalidResourceError as exc:
            targets.append(exc)
    return targets


def _resolve_conditional(s: Session, index: int, rtype: str, criteria: str, field: str) -> list[str]:
    try:
        return fhir_search.matching_ids(s, rtype, criteria)
    except InvalidResourceError as exc:
        raise InvalidResourceError(
            [(f"Bundle.entry[{index}].request.{field}", m) for _, m in exc.issues], 400
        ) from None


def prepare_entries(s: Session, entries: list[Any], *, check_targets: bool = True) -> list[dict[str, Any]]:
    """Validate every entry, resolve conditional entries and assign ids; resolve urn:uuid references
    between entries; refuse references to resources that are neither in the bundle nor stored.

    Returns dicts with ``resource``, ``index``, ``existing`` (an ifNoneExist entry that matched:
    nothing to write) and ``fresh`` (its id was assigned here: nothing stored has it). Runs inside
    session ``s`` so that the lookups see what the writes will see.
    """
    prepared = _targets_and_references(s, entries)
    validate_entries(prepared)
    if check_targets:
        _check_reference_targets(s, prepared)
    return prepared


def write_transaction(s: Session, entries: list[Any], workers: ValidationWorkers | None = None
                      ) -> list[tuple[dict[str, Any], bool]]:
    """``prepare_entries`` then ``write_entries`` for a transaction Bundle, except that the entries are
    validated while their rows are written where the store can overlap the two (PostgreSQL: see
    ``fhir.storage.put_resources``' ``meanwhile``), and the reference targets are checked after the writes.
    With ``workers``, a worker process validates part of a large Bundle (sent before the rows are
    prepared, its verdicts read once they are written; see integration.fhir.validation). A refusal
    raises, as from ``prepare_entries``, and the caller's transaction rolls everything back.

    Writes that fail (the database refuses a row, or the rows cannot be sent) do not hide a refusal: on
    PostgreSQL they run before the validation is done, or before it starts (the locking SELECT and the
    rows' serialisation precede it), and the reference check comes after them. So when they fail, the
    entries are validated (if they were not) and the targets checked, in a fresh transaction since the
    failed one cannot be read in, before the failure itself is raised."""
    prepared = _targets_and_references(s, entries)
    share = workers.share([p["resource"] for p in prepared]) if workers is not None else None
    own_done = False

    def validate_own() -> None:
        nonlocal own_done
        _validate_own(prepared, share)
        own_done = True

    try:
        written = write_entries(s, prepared, meanwhile=validate_own)
        # the worker's verdicts are read once the rows are written (not committed): it validates its
        # share meanwhile, and a refusal in it rolls the rows back with the rest of the transaction
        _validate_shared(prepared, share)
    except InvalidResourceError:
        raise
    except Exception:
        if not own_done:
            _validate_own(prepared, share)
        _validate_shared(prepared, share)
        s.rollback()  # nothing of this transaction is kept either way; the check reads what is stored
        _check_reference_targets(s, prepared)
        raise
    finally:
        if share is not None:
            share.outcomes()  # read, whatever happened: the worker is free again only once it has answered
    _check_reference_targets(s, prepared)
    return written


def _targets_and_references(s: Session, entries: list[Any]) -> list[dict[str, Any]]:
    """The first steps of ``prepare_entries``: each entry's target, conditional matches and id, then the
    urn:uuid references between entries resolved (``references``: the relative ones to check;
    ``unresolved``: urn:uuid references that match no entry, refused by ``validate_entries``)."""
    prepared: list[dict[str, Any]] = []
    mapping: dict[str, str] = {}
    targets = _entry_targets(entries)
    # every conditional entry's lock first, before any search (see fhir.storage.serialize_conditional: taken
    # together, in one order, they cannot deadlock against another bundle's); none without such entries
    serialize_conditional(s, [fhir_search.conditional_key(target[1], target[3]) for target in targets
                                    if not isinstance(target, InvalidResourceError) and target[3] is not None])
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise InvalidResourceError([(f"Bundle.entry[{i}].resource", "each entry needs a resource")], 400)
        target = targets[i]
        if isinstance(target, InvalidResourceError):
            raise target
        method, rtype, url_id, criteria = target
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
        resource_model(rtype)
        existing = False
        rid: str | None
        if criteria is not None:
            field = "ifNoneExist" if method == "POST" else "url"
            matches = _resolve_conditional(s, i, rtype, criteria, field)
            if len(matches) > 1:
                raise InvalidResourceError([(f"Bundle.entry[{i}].request.{field}", "more than one match")], 412)
            if method == "POST":
                existing = bool(matches)
                rid = matches[0] if matches else None
            else:
                rid = matches[0] if matches else resource.get("id")
        else:
            rid = url_id if method == "PUT" and url_id else None
        fresh = not rid
        rid = rid or new_id()
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            mapping[full_url] = f"{rtype}/{rid}"
        prepared.append({"resource": {**resource, "id": rid}, "index": i, "existing": existing, "fresh": fresh})
    # an entry that would overwrite an AI report bypasses its review: refused (one query, only for Bundles
    # that update DiagnosticReports)
    refuse_plain_writes(s, [(p["index"], p["resource"]["resourceType"], p["resource"]["id"])
                            for p in prepared if not p["fresh"] and not p["existing"]])
    for p in prepared:
        refs: list[str] = []
        unresolved: list[str] = []
        _resolve_references(p["resource"], mapping, refs, unresolved, False)
        p["references"] = refs
        p["unresolved"] = unresolved
    return prepared


def validate_entries(prepared: list[dict[str, Any]], share: Share | None = None) -> None:
    """Validate the resources of ``_targets_and_references``' entries in order; the first refusal raises,
    naming ``Bundle.entry[i]...``. Touches no database. The entries from ``share.start`` on have been
    sent to a validation worker: its outcomes are used (read once the others are validated here)."""
    _validate_own(prepared, share)
    _validate_shared(prepared, share)


def _validate_own(prepared: list[dict[str, Any]], share: Share | None) -> None:
    """``validate_entries`` for the entries not sent to a worker (all of them without ``share``)."""
    for p in prepared[: share.start if share is not None else len(prepared)]:
        _refuse_invalid(p, outcome_of(p["resource"]))


def _validate_shared(prepared: list[dict[str, Any]], share: Share | None) -> None:
    """``validate_entries`` for the entries sent to a worker: its outcomes, or where it failed, our own."""
    if share is None:
        return
    outcomes = share.outcomes()
    for i, p in enumerate(prepared[share.start:]):
        _refuse_invalid(p, outcomes[i] if outcomes is not None else outcome_of(p["resource"]))


def _refuse_invalid(p: dict[str, Any], outcome: Outcome) -> None:
    if outcome is not None:
        status, issues = outcome
        raise InvalidResourceError(
            [(f"Bundle.entry[{p['index']}].resource.{e.split('.', 1)[-1]}", m) for e, m in issues], status)
    if p["unresolved"]:
        raise InvalidResourceError(
            [(f"Bundle.entry[{p['index']}].resource", f"reference {p['unresolved'][0]} matches no entry's fullUrl")],
            400,
        )


def _resolve_references(node: dict[str, Any] | list[Any], mapping: dict[str, str], refs: list[str],
                        unresolved: list[str], contained: bool) -> None:
    """Rewrite, in place, the references ``mapping`` names inside ``node`` (the request's own parsed JSON), in
    one walk that also collects the relative references outside ``contained`` (into ``refs``: the targets
    to check) and the ``urn:uuid`` references left unresolved anywhere (into ``unresolved``).

    The walk tests each value's exact type first (what json.loads gives) and takes the isinstance checks
    only for anything else: most values are strings, and this walk over every element of every resource
    took ~18 us per resource with isinstance against ``dict | list`` for each, ~9 this way."""
    if not isinstance(node, dict):
        for v in node:
            if isinstance(v, dict | list):
                _resolve_references(v, mapping, refs, unresolved, contained)
        return
    for k, v in node.items():
        t = type(v)
        if t is dict or t is list or t is not str and isinstance(v, dict | list):
            inner = contained or k == "contained"
            if t is list:  # the items inline: most are dicts (or strings, with nothing below them)
                for item in v:
                    if type(item) is dict or isinstance(item, dict | list):
                        _resolve_references(item, mapping, refs, unresolved, inner)
            else:
                _resolve_references(v, mapping, refs, unresolved, inner)
        elif k == "reference" and isinstance(v, str):
            target = mapping.get(v)
            if target is not None:
                node[k] = v = target  # an existing key: the dict keeps its size while iterated
            if v.startswith("urn:uuid:"):
                unresolved.append(v)
            elif not contained and "://" not in v and not v.startswith(("#", "urn:")):
                refs.append(v)


def _references(node: Any, path: str) -> list[tuple[str, str]]:
    """(FHIRPath-like location, reference) of every relative Type/id reference inside ``node``."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "://" not in ref and not ref.startswith(("#", "urn:")):
            found.append((f"{path}.reference", ref))
        for k, v in node.items():
            if k not in ("reference", "contained"):
                found += _references(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _references(v, f"{path}[{i}]")
    return found


def _check_reference_targets(s: Session, prepared: list[dict[str, Any]]) -> None:
    """A transaction may only point at resources it writes or that are stored (and not deleted).

    Checks the references ``prepare_entries`` collected; the walk that names each one's location
    (``_references``) only runs when one is refused."""
    in_bundle = {(p["resource"]["resourceType"], p["resource"]["id"]) for p in prepared}
    wanted: set[tuple[str, str]] = set()
    malformed = False
    for p in prepared:
        for ref in p["references"]:
            parts = ref.split("/_history")[0].split("/")
            if len(parts) != 2 or not parts[0][:1].isupper():
                malformed = True
                break
            key = (parts[0], parts[1])
            if key not in in_bundle:
                wanted.add(key)
    stored = fhir_search.existing_resources(s, sorted(wanted)) if wanted and not malformed else set()
    if malformed or wanted - stored:
        _refuse_references(prepared, in_bundle, stored)


def _refuse_references(prepared: list[dict[str, Any]], in_bundle: set[tuple[str, str]],
                       stored: set[tuple[str, str]]) -> None:
    """InvalidResourceError (422) naming the first malformed reference, else every missing target."""
    missing: dict[tuple[str, str], str] = {}
    for p in prepared:
        for where, ref in _references(p["resource"], f"Bundle.entry[{p['index']}].resource"):
            parts = ref.split("/_history")[0].split("/")
            if len(parts) != 2 or not parts[0][:1].isupper():
                raise InvalidResourceError([(where, f"'{ref}' is not a Type/id reference")], 422)
            key = (parts[0], parts[1])
            if key not in in_bundle and key not in stored:
                missing.setdefault(key, where)
    raise InvalidResourceError(
        [(where, f"{t}/{i} is neither in this bundle nor stored") for (t, i), where in missing.items()][:20], 422
    )


def write_entries(s: Session, prepared: list[dict[str, Any]], *, meanwhile: Callable[[], None] | None = None
                  ) -> list[tuple[dict[str, Any], bool]]:
    """Write the prepared entries (multi-row INSERTs): (stored content, created) in the bundle's order;
    an ifNoneExist entry that matched gives the current resource, not created. ``meanwhile`` runs
    before the writes are done (see ``fhir.storage.put_resources``)."""
    writes = [p for p in prepared if not p["existing"]]
    written = iter(store_resources(s, [p["resource"] for p in writes], fresh=[p["fresh"] for p in writes],
                                   meanwhile=meanwhile))
    out = []
    for p in prepared:
        if p["existing"]:
            current = s.get(FhirResource, (p["resource"]["resourceType"], p["resource"]["id"]))
            out.append((current.content if current is not None else p["resource"], False))
        else:
            out.append(next(written))
    return out
