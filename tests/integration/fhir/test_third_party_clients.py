"""The FHIR API driven by a client nobody here wrote (fhirpy), and fuzzed for 5xx with hypothesis."""

from __future__ import annotations

import json

import httpx
from fhirpy import SyncFHIRClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import authorized


def test_fhirpy_create_read_search_with_paging_and_delete(fhir_client: httpx.Client) -> None:
    base = str(fhir_client.base_url).rstrip("/")
    client = SyncFHIRClient(f"{base}/fhir", authorization=f"Bearer {authorized.token('integration')}",
                            extra_headers={"Accept": "application/fhir+json"})
    patient = client.resource("Patient", identifier=[{"system": "urn:mrn", "value": "fp-1"}], gender="female",
                              birthDate="1970-01-01")
    patient.save()
    assert patient.id
    fetched = client.reference("Patient", patient.id).to_resource()
    assert fetched["gender"] == "female"
    for value in range(7):
        client.resource("Observation", status="final", code={"text": "glucose"}, subject=patient.to_reference(),
                        valueQuantity={"value": value, "unit": "mg/dL"}).save()
    observations = client.resources("Observation").search(subject=f"Patient/{patient.id}").limit(3).fetch_all()
    assert sorted(o["valueQuantity"]["value"] for o in observations) == list(range(7))  # followed 'next' links
    assert client.resources("Patient").search(identifier="urn:mrn|fp-1").count() == 1
    fetched.delete()
    assert client.resources("Patient").search(identifier="urn:mrn|fp-1").count() == 0

    # conditional create twice (fhirpy sends the criteria as the query string), then conditional update
    mrn = client.resources("Patient").search(identifier="urn:mrn|fp-2")
    first, created = mrn.get_or_create(client.resource("Patient", identifier=[{"system": "urn:mrn", "value": "fp-2"}]))
    again, created_again = mrn.get_or_create(client.resource("Patient",
                                                             identifier=[{"system": "urn:mrn", "value": "fp-2"}]))
    assert (created, created_again) == (True, False) and first.id == again.id
    updated, created = mrn.update(client.resource("Patient", identifier=[{"system": "urn:mrn", "value": "fp-2"}],
                                                  gender="other"))
    assert not created and updated.id == first.id and mrn.count() == 1
    assert client.reference("Patient", first.id).to_resource()["gender"] == "other"

    # a transaction through the client's raw request API
    response = client.execute("", method="post", data={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:fp-3", "resource": {"resourceType": "Patient", "gender": "male"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                      "subject": {"reference": "urn:uuid:fp-3"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]})
    assert response["type"] == "transaction-response"
    new_patient = response["entry"][0]["fullUrl"]
    assert client.resources("Observation").search(subject=new_patient).count() == 1


# strings a database column may not hold: control characters (NUL above all: PostgreSQL's text and jsonb
# refuse it), lone surrogates, and lengths past the columns' (status 32, ids 64, subject 128, index 256)
def _hostile_text(*fills: str) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8") | st.characters(max_codepoint=0x1F), max_size=20) | st.builds(
        lambda fill, n: fill * n, st.sampled_from(["x", "\x00", "a\x00", "\U0010ffff", *fills]),
        st.sampled_from([33, 65, 129, 257]))


hostile_text = _hostile_text("\ud800")  # JSON carries a lone surrogate (as an escape); a URL cannot
json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | hostile_text
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=20)
# references that are ids no resource can have, and dates at the calendar's ends
hostile_reference = st.builds(lambda t: {"reference": f"Patient/{t}"}, hostile_text)
status = st.sampled_from(["final", "requested"]) | hostile_text | json_value
identifiers = st.lists(st.fixed_dictionaries({"value": hostile_text}, optional={"system": hostile_text}), max_size=2)
hostile_date = st.sampled_from(["9999-12-31", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999-14:00"])
resource_like = (
    st.fixed_dictionaries(
        {"resourceType": st.sampled_from(["Observation", "Patient", "Condition", "Bundle", "Nope", ""])},
        optional={"status": json_value, "code": json_value, "subject": json_value | hostile_reference,
                  "entry": json_value, "type": st.sampled_from(["transaction", "batch", "collection"]),
                  "id": json_value},
    )
    # per type, valid often enough that the hostile values reach the store rather than stop at a refusal
    | st.fixed_dictionaries(
        {"resourceType": st.just("Observation"), "status": status,
         "code": st.fixed_dictionaries({"text": hostile_text}) | json_value},
        optional={"subject": hostile_reference, "identifier": identifiers, "effectiveDateTime": hostile_date,
                  "id": hostile_text},
    )
    | st.fixed_dictionaries({"resourceType": st.just("Patient")}, optional={
        "identifier": identifiers, "name": st.lists(st.fixed_dictionaries({"family": hostile_text}), max_size=2),
        "birthDate": hostile_date, "id": hostile_text})
    # Task and ResearchStudy: a status whose value set is not checked here, stored in a 32-character column
    | st.fixed_dictionaries({"resourceType": st.just("Task"), "status": status, "intent": st.just("order")},
                            optional={"for": hostile_reference, "identifier": identifiers})
    | st.fixed_dictionaries({"resourceType": st.just("ResearchStudy"), "status": status})
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=resource_like | json_value,
       path=st.sampled_from(["/fhir", "/fhir/Observation", "/fhir/Patient", "own type", "own type"]))
def test_hostile_bodies_never_cause_a_server_error(fhir_client: httpx.Client, body: object, path: str) -> None:
    if path == "own type":  # the body's type, which gets past the type check to validation and the store
        rtype = body.get("resourceType") if isinstance(body, dict) else None
        path = f"/fhir/{rtype}" if isinstance(rtype, str) and rtype.isalpha() else "/fhir"
    # sent as Python's json writes it, NaN and Infinity tokens included (not JSON, but clients send them)
    r = fhir_client.post(path, content=json.dumps(body).encode())
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["resourceType"] == "OperationOutcome"


def test_fhirclient_create_read_search_pages_transaction_and_conditional_create(fhir_client: httpx.Client) -> None:
    """SMART on FHIR's fhirclient (its own R4 models parse everything we send back, strictly)."""
    from fhirclient import client as smart_client
    from fhirclient.models.bundle import Bundle
    from fhirclient.models.observation import Observation
    from fhirclient.models.patient import Patient

    base = str(fhir_client.base_url).rstrip("/") + "/fhir/"
    smart = smart_client.FHIRClient(settings={"app_id": "medbridge-tests", "api_base": base})
    server = smart.server
    # fhirclient gets tokens by its own SMART launch only; a system client's bearer goes on its session
    server.session.headers["Authorization"] = f"Bearer {authorized.token('integration')}"
    server.get_capability()  # our CapabilityStatement, parsed by fhirclient's own (strict) models
    assert server.capabilityStatement.fhirVersion == "4.0.1"
    assert "Observation" in {r.type for r in server.capabilityStatement.rest[0].resource}

    patient = Patient({"identifier": [{"system": "urn:mrn", "value": "fc-1"}], "gender": "male",
                       "birthDate": "1961-05-04"})
    created = patient.create(server)
    assert created["resourceType"] == "Patient"
    fetched = Patient.read(created["id"], server)
    assert fetched.gender == "male" and fetched.birthDate.isostring == "1961-05-04"

    for value in range(7):
        Observation({"status": "final", "code": {"text": "glucose"}, "subject": {"reference": f"Patient/{fetched.id}"},
                     "valueQuantity": {"value": value, "unit": "mg/dL"}}).create(server)
    search = Observation.where(struct={"subject": f"Patient/{fetched.id}", "_count": "3"})
    pages = list(search.perform_iter(server))
    assert [len(p.entry) for p in pages] == [3, 3, 1]  # fhirclient followed our 'next' links
    values = sorted(e.resource.valueQuantity.value for p in pages for e in p.entry)
    assert values == list(range(7))

    def conditional_bundle() -> Bundle:
        return Bundle({"type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:0b1e8e1e-0000-4000-8000-000000000001",
             "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "fc-2"}]},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|fc-2"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "HbA1c"},
                          "subject": {"reference": "urn:uuid:0b1e8e1e-0000-4000-8000-000000000001"}},
             "request": {"method": "POST", "url": "Observation"}},
        ]})

    first = Bundle(conditional_bundle().create(server))
    second = Bundle(conditional_bundle().create(server))
    assert first.type == second.type == "transaction-response"
    assert first.entry[0].response.status.startswith("201") and second.entry[0].response.status.startswith("200")
    matches = Patient.where(struct={"identifier": "urn:mrn|fc-2"}).perform_iter(server)
    (only,) = [e.resource for page in matches for e in page.entry or []]
    assert only.id == first.entry[0].fullUrl.split("/")[-1] == second.entry[0].fullUrl.split("/")[-1]
    hba1c = Observation.where(struct={"subject": f"Patient/{only.id}"}).perform_iter(server)
    assert sum(len(page.entry or []) for page in hba1c) == 2  # the transaction ran twice, the patient once


GOOD_OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
hostile_entry = st.fixed_dictionaries(
    {"resource": resource_like | json_value},
    optional={
        "fullUrl": st.sampled_from(["urn:uuid:a", "urn:uuid:b", "Patient/1", ""]) | st.text(max_size=12),
        "request": st.fixed_dictionaries(
            {"method": st.sampled_from(["POST", "PUT", "GET", "DELETE", "PATCH", ""]) | json_value,
             "url": st.sampled_from(["Observation", "Patient", "Observation?identifier=a|b", "Patient/x",
                                     "Observation?bogus=1", "", "/", "Task"]) | json_value
                    | st.builds(lambda t: f"Patient/{t}", hostile_text)},
            optional={"ifNoneExist": st.sampled_from(["identifier=a|b", "name=%", "&&", "_id="]) | json_value},
        ),
    },
)
good_entry = st.builds(
    lambda n, ref: {"fullUrl": f"urn:uuid:good-{n}", "request": {"method": "POST", "url": "Observation"},
                    "resource": {**GOOD_OBSERVATION, **({"subject": {"reference": ref}} if ref else {})}},
    st.integers(0, 3), st.sampled_from([None, "urn:uuid:good-0", "Patient/missing", "urn:uuid:nowhere",
                                        f"Patient/{'x' * 200}"]),
)


def _totals(client: httpx.Client) -> tuple[int, int]:
    return tuple(client.get(f"/fhir/{t}", params={"_summary": "count"}).json()["total"]  # type: ignore[return-value]
                 for t in ("Observation", "Patient"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(good_entry | hostile_entry, min_size=1, max_size=4))
def test_hostile_transactions_are_refused_whole_and_leave_nothing_visible(
    fhir_client: httpx.Client, entries: list[object]
) -> None:
    before = _totals(fhir_client)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    r = fhir_client.post("/fhir", content=json.dumps(bundle).encode())  # NaN tokens included, as above
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        created = sum(e["response"]["status"].startswith("201") for e in r.json()["entry"])
        assert sum(_totals(fhir_client)) == sum(before) + created
    else:
        assert r.json()["resourceType"] == "OperationOutcome"
        assert _totals(fhir_client) == before  # all or nothing: no partial transaction is visible


search_key = st.sampled_from(["code", "date", "patient", "subject", "_id", "_lastUpdated", "identifier", "status",
                              "_count", "_offset", "_sort", "_include", "_summary", "category", "code:text",
                              "_format"]) | st.text(max_size=8)


# values past what the columns and Python's numbers and dates hold
search_value = st.text(max_size=24) | _hostile_text() | st.sampled_from([
    "9" * 30, "9223372036854775808", "\u00b2", "gt9999-12-31", "ap0001", "ap9999", "9999-12-31T23:00:00-14:00",
    "0001-01-01T00:00:00+14:00", "Patient/" + "x" * 300, "a|" + "b" * 300])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.lists(st.tuples(search_key, search_value), max_size=4),
       strict=st.booleans(), path=st.sampled_from(["/fhir/Observation", "/fhir/Patient", "/fhir/Patient/_history"]))
def test_hostile_searches_never_cause_a_server_error(
    fhir_client: httpx.Client, params: list[tuple[str, str]], strict: bool, path: str
) -> None:
    headers = {"Prefer": "handling=strict"} if strict else {}
    r = fhir_client.get(path, params=params, headers=headers)
    assert r.status_code < 500, r.text
    body = r.json()
    assert body["resourceType"] == ("Bundle" if r.status_code == 200 else "OperationOutcome")
