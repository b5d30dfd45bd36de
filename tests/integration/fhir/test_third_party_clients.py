"""The FHIR API driven by a client nobody here wrote (fhirpy), and fuzzed for 5xx with hypothesis."""

from __future__ import annotations

import json

import httpx
from fhirpy import SyncFHIRClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def test_fhirpy_create_read_search_with_paging_and_delete(fhir_client: httpx.Client) -> None:
    base = str(fhir_client.base_url).rstrip("/")
    client = SyncFHIRClient(f"{base}/fhir", extra_headers={"Accept": "application/fhir+json"})
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


json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=20)
resource_like = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Observation", "Patient", "Condition", "Bundle", "Nope", ""])},
    optional={"status": json_value, "code": json_value, "subject": json_value, "entry": json_value,
              "type": st.sampled_from(["transaction", "batch", "collection"]), "id": json_value},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=resource_like | json_value, path=st.sampled_from(["/fhir", "/fhir/Observation", "/fhir/Patient"]))
def test_hostile_bodies_never_cause_a_server_error(fhir_client: httpx.Client, body: object, path: str) -> None:
    # sent as Python's json writes it, NaN and Infinity tokens included (not JSON, but clients send them)
    r = fhir_client.post(path, content=json.dumps(body).encode())
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["resourceType"] == "OperationOutcome"
