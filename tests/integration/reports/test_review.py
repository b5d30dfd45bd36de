"""The review of an AI report over HTTP: the state machine, If-Match, coded rejection reasons, the
Provenance and resultsInterpreter each decision writes, and the plain FHIR writes that are refused.

The reviewer is the authenticated identity: a bearer token from the tests' embedded issuer, made for the
identity each test names."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.auth.principal import ROLES
from integration.db.store import Store
from integration.db.tables import AiResult, Review
from integration.fhir.resources import AI_ASSERTED, MEDBRIDGE_IDENTIFIER_SYSTEM, store_resource, validate_resource
from integration.reports.review import TRANSITIONS
from tests import authorized
from tests.conftest import serve_app, stack_settings

_ids = itertools.count(1)


def add_ai_report(store: Store, report_id: str | None = None) -> str:
    """An AI report as the report writer stores it (AIAST label, MedBridge identifier, AiResult row)."""
    rid = report_id or f"ai-{next(_ids)}"
    report = {"resourceType": "DiagnosticReport", "id": rid, "status": "preliminary",
              "meta": {"security": [AI_ASSERTED]},
              "identifier": [{"system": MEDBRIDGE_IDENTIFIER_SYSTEM, "value": rid}],
              "subject": {"reference": "Patient/p1"}, "code": {"text": "AI imaging analysis"},
              "conclusion": "lesion: suspected"}
    with store.session() as s:
        store_resource(s, validate_resource(report), track=False)
        s.add(AiResult(report_id=rid, kind="imaging", source_event_id=f"e-{rid}", details={"instances": []}))
    return rid


def as_identity(request: httpx.Request) -> None:
    """An httpx request hook: the identity named by ``x-test-sub``/``x-test-name``/``x-test-fhir-user``
    becomes a real bearer token from the tests' embedded issuer (validated by MedBridge's authentication
    like any other), holding every role, so each test reaches the rule it is about."""
    sub = request.headers.pop("x-test-sub", None)
    name = request.headers.pop("x-test-name", None)
    fhir_user = request.headers.pop("x-test-fhir-user", None)
    if sub:
        token = authorized.issuer().mint(subject=sub, roles=list(ROLES), name=name or None,
                                         fhir_user=fhir_user or None, client_id="viewer")
        request.headers["Authorization"] = f"Bearer {token}"


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path), store) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, event_hooks={"request": [as_identity]},
        headers={"x-test-sub": "u-123", "x-test-name": "Dr Ada Reviewer", "x-test-fhir-user": "Practitioner/ada"},
    ) as client:
        yield client


def version_of(api: httpx.Client, rid: str) -> str:
    r = api.get(f"/api/reports/{rid}")
    assert r.status_code == 200
    assert r.headers["ETag"] == f'W/"{r.json()["fhir"]["meta"]["versionId"]}"'
    return r.headers["ETag"]


def decide(api: httpx.Client, rid: str, action: str, etag: str | None = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"action": action, **extra}
    if action == "amended":
        body.setdefault("conclusion", "No lesion on review.")
    if action == "entered-in-error":
        body.setdefault("reason", "wrong-finding")
    headers = {"If-Match": etag or version_of(api, rid)}
    return api.post(f"/api/reports/{rid}/review", json=body, headers=headers)


# the shortest path of decisions from preliminary to each status
PATH_TO = {"preliminary": [], "final": ["final"], "amended": ["amended"], "entered-in-error": ["entered-in-error"]}


@pytest.mark.parametrize("status", list(TRANSITIONS))
def test_every_transition_from_a_status_is_allowed_or_refused_with_an_outcome_naming_the_status(
    api: httpx.Client, store: Store, status: str
) -> None:
    for action in ("final", "amended", "entered-in-error"):
        rid = add_ai_report(store)
        for step in PATH_TO[status]:
            assert decide(api, rid, step).status_code == 200
        r = decide(api, rid, action)
        if action in TRANSITIONS[status]:
            assert r.status_code == 200, (status, action, r.text)
            assert r.json()["status"] == action == r.json()["fhir"]["status"]
        else:
            assert r.status_code == 409, (status, action, r.text)
            outcome = r.json()
            assert outcome["resourceType"] == "OperationOutcome"
            issue = outcome["issue"][0]
            assert issue["code"] == "business-rule" and issue["expression"] == ["DiagnosticReport.status"]
            assert f"the report is {status}" in issue["diagnostics"]
            assert api.get(f"/api/reports/{rid}").json()["status"] == status  # nothing changed


def test_a_rejected_report_stays_rejected(api: httpx.Client, store: Store) -> None:
    rid = add_ai_report(store)
    assert decide(api, rid, "entered-in-error", reason="missed-finding").status_code == 200
    for action in ("final", "amended", "entered-in-error"):
        r = decide(api, rid, action)
        assert r.status_code == 409 and "entered-in-error" in r.json()["issue"][0]["diagnostics"]


def test_a_review_without_if_match_is_428_and_a_stale_one_412(api: httpx.Client, store: Store) -> None:
    rid = add_ai_report(store)
    r = api.post(f"/api/reports/{rid}/review", json={"action": "final"})
    assert r.status_code == 428
    assert r.json()["issue"][0]["expression"] == ["If-Match"] and "ETag" in r.json()["issue"][0]["diagnostics"]
    assert api.post(f"/api/reports/{rid}/review", json={"action": "final"},
                    headers={"If-Match": "three"}).status_code == 400
    first = version_of(api, rid)
    assert decide(api, rid, "final", first).status_code == 200
    stale = decide(api, rid, "amended", first)
    assert stale.status_code == 412
    assert "version 2, not 1" in stale.json()["issue"][0]["diagnostics"]
    with store.session() as s:
        assert s.query(Review).filter_by(report_id=rid).count() == 1


def test_two_reviewers_on_the_same_version_one_wins_the_other_gets_412(
    api: httpx.Client, store: Store
) -> None:
    rid = add_ai_report(store)
    etag = version_of(api, rid)
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def reviewer(action: str, sub: str) -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=30, event_hooks={"request": [as_identity]}) as client:
            barrier.wait()
            answers.append(client.post(
                f"/api/reports/{rid}/review", headers={"If-Match": etag, "x-test-sub": sub},
                json={"action": action, **({"reason": "not-applicable"} if action == "entered-in-error" else {})}))

    threads = [threading.Thread(target=reviewer, args=a) for a in (("final", "u-a"), ("entered-in-error", "u-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [200, 412], [r.text for r in answers]
    winner = next(r for r in answers if r.status_code == 200).json()
    assert winner["fhir"]["meta"]["versionId"] == "2" and len(winner["reviews"]) == 1
    with store.session() as s:
        assert s.query(Review).filter_by(report_id=rid).count() == 1
    assert len(api.get("/fhir/Provenance", params={"target": f"DiagnosticReport/{rid}"}).json().get("entry", [])) == 1


@pytest.mark.parametrize("body, says", [
    ({"action": "entered-in-error"}, "needs a reason"),
    ({"action": "entered-in-error", "reason": "other"}, "needs a comment"),
    ({"action": "entered-in-error", "reason": "because"}, "wrong-finding"),
    ({"action": "final", "reason": "wrong-finding"}, "only for a rejection"),
])
def test_a_rejection_needs_a_coded_reason(api: httpx.Client, store: Store, body: dict[str, Any], says: str) -> None:
    rid = add_ai_report(store)
    r = api.post(f"/api/reports/{rid}/review", json=body, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 422 and says in r.text
    assert api.get(f"/api/reports/{rid}").json()["status"] == "preliminary"


def test_a_decision_writes_provenance_results_interpreter_and_the_authenticated_reviewer(
    api: httpx.Client, store: Store
) -> None:
    rid = add_ai_report(store)
    r = decide(api, rid, "entered-in-error", reason="other", comment="the lesion is a skin fold",
               reviewer="typed name, ignored")
    assert r.status_code == 200
    detail = r.json()
    assert r.headers["ETag"] == 'W/"2"'
    assert detail["fhir"]["resultsInterpreter"] == [{"reference": "Practitioner/ada", "display": "Dr Ada Reviewer"}]
    (review,) = detail["reviews"]
    assert review["reviewer"] == "Dr Ada Reviewer" and review["reviewer_sub"] == "u-123"
    assert review["reason"] == "other" and review["report_version"] == 2

    bundle = api.get("/fhir/Provenance", params={"target": f"DiagnosticReport/{rid}"}).json()
    (entry,) = bundle["entry"]
    prov = entry["resource"]
    validate_resource(prov)
    assert prov["target"] == [{"reference": f"DiagnosticReport/{rid}/_history/2"}]
    assert prov["entity"] == [{"role": "revision", "what": {"reference": f"DiagnosticReport/{rid}/_history/1"}}]
    assert prov["activity"]["coding"][0]["code"] == "NULLIFY"
    assert prov["agent"][0]["who"] == {"reference": "Practitioner/ada", "display": "Dr Ada Reviewer"}
    assert prov["reason"][0]["coding"][0]["code"] == "other"
    assert prov["reason"][0]["text"] == "the lesion is a skin fold"
    # the report version the Provenance names is the one that says entered-in-error
    assert api.get(f"/fhir/DiagnosticReport/{rid}/_history/2").json()["status"] == "entered-in-error"


def test_without_a_fhir_user_the_reviewer_is_named_by_subject(api: httpx.Client, store: Store) -> None:
    rid = add_ai_report(store)
    r = api.post(f"/api/reports/{rid}/review", json={"action": "final"},
                 headers={"If-Match": 'W/"1"', "x-test-sub": "u-9", "x-test-name": "Dr Bo",
                          "x-test-fhir-user": ""})
    assert r.status_code == 200
    who = {"display": "Dr Bo", "identifier": {"system": "urn:medbridge:sub", "value": "u-9"}}
    assert r.json()["fhir"]["resultsInterpreter"] == [who]
    prov = api.get("/fhir/Provenance", params={"target": f"DiagnosticReport/{rid}"}).json()["entry"][0]["resource"]
    assert prov["agent"][0]["who"] == who and prov["activity"]["coding"][0]["code"] == "LA"


def test_plain_fhir_writes_to_an_ai_report_are_refused_pointing_at_the_review(
    api: httpx.Client, store: Store
) -> None:
    rid = add_ai_report(store)
    current = api.get(f"/fhir/DiagnosticReport/{rid}").json()
    signed = {**current, "status": "final"}
    unlabelled = {k: v for k, v in current.items() if k not in ("meta", "identifier")}
    fhir = {"Content-Type": "application/fhir+json"}
    for body in (signed, unlabelled):
        r = api.put(f"/fhir/DiagnosticReport/{rid}", json=body, headers=fhir)
        assert r.status_code == 409, r.text
        assert f"/api/reports/{rid}/review" in r.json()["issue"][0]["diagnostics"]
    r = api.put("/fhir/DiagnosticReport", params={"identifier": f"{MEDBRIDGE_IDENTIFIER_SYSTEM}|{rid}"},
                json=signed, headers=fhir)
    assert r.status_code == 409
    assert api.delete(f"/fhir/DiagnosticReport/{rid}").status_code == 409
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": signed, "request": {"method": "PUT", "url": f"DiagnosticReport/{rid}"}}]}
    r = api.post("/fhir", json=bundle, headers=fhir)
    assert r.status_code == 409 and "Bundle.entry[1]" in r.json()["issue"][0]["diagnostics"]
    assert api.get(f"/fhir/DiagnosticReport/{rid}").json() == current  # untouched
    # a DiagnosticReport MedBridge did not write is the EHR's: written as before
    other = {"resourceType": "DiagnosticReport", "id": "ehr-1", "status": "final", "code": {"text": "CT"}}
    assert api.put("/fhir/DiagnosticReport/ehr-1", json=other, headers=fhir).status_code == 201
    assert api.put("/fhir/DiagnosticReport/ehr-1", json={**other, "status": "amended"}, headers=fhir).status_code == 200


def test_the_review_is_audited_with_the_reviewer_and_the_new_version(api: httpx.Client, store: Store) -> None:
    rid = add_ai_report(store)
    assert decide(api, rid, "final").status_code == 200
    events = api.get("/fhir/AuditEvent", params={"subtype": "review-final"}).json()["entry"]
    (event,) = [e["resource"] for e in events]
    validate_resource(event)
    assert event["action"] == "U" and event["outcome"] == "0"
    user = event["agent"][0]
    assert user["requestor"] is True and user["altId"] == "u-123" and user["who"]["reference"] == "Practitioner/ada"
    assert user["network"]["address"] == "127.0.0.1"
    whats = [e.get("what", {}).get("reference") for e in event["entity"]]
    assert f"DiagnosticReport/{rid}/_history/2" in whats and "Patient/p1" in whats
    # a refused decision is audited too, as a minor failure
    assert decide(api, rid, "final").status_code == 409
    refused = api.get("/fhir/AuditEvent", params={"subtype": "review-final", "outcome": "4"}).json()["entry"]
    assert len(refused) == 1 and refused[0]["resource"]["outcomeDesc"] == "409: ReviewRefusedError"
