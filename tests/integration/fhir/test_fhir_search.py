"""FHIR search over HTTP, on SQLite and PostgreSQL: tokens, references, dates with prefixes, strings,
_lastUpdated, _sort, paging links, _include, _summary=count, and what is refused or reported."""

from __future__ import annotations

import time
from typing import Any

import httpx

from integration.db.store import Store
from integration.fhir import search as fhir_search
from tests import authorized

LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def observation(code: str, *, system: str = LOINC, when: dict[str, Any] | None = None,
                categories: tuple[str, ...] = ("laboratory",), patient: str = "Patient/p1",
                status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "category": [{"coding": [{"system": CATEGORY, "code": c}]} for c in categories],
        "code": {"coding": [{"system": system, "code": code}] if system else [{"code": code}]},
        "subject": {"reference": patient},
        **(when or {"effectiveDateTime": "2020-01-15"}),
    }


def post(client: httpx.Client, resource: dict[str, Any]) -> str:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ids(client: httpx.Client, path: str, params: Any) -> set[str]:
    r = client.get(path, params=params, headers={"Prefer": "handling=strict"})
    assert r.status_code == 200, r.text
    body = r.json()
    matches = {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}
    assert body["total"] == len(matches)
    return matches


def test_token_search_by_system_and_code_with_or_and_and(fhir_client: httpx.Client) -> None:
    hb = post(fhir_client, observation("718-7"))
    glucose = post(fhir_client, observation("2339-0", categories=("laboratory", "vital-signs")))
    local = post(fhir_client, observation("718-7", system="urn:local"))
    bare = post(fhir_client, observation("718-7", system=""))
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"code": f"{LOINC}|718-7"}) == {hb}
    assert ids(fhir_client, obs, {"code": "718-7"}) == {hb, local, bare}
    assert ids(fhir_client, obs, {"code": "|718-7"}) == {bare}
    assert ids(fhir_client, obs, {"code": f"{LOINC}|"}) == {hb, glucose}
    assert ids(fhir_client, obs, {"code": f"{LOINC}|718-7,{LOINC}|2339-0"}) == {hb, glucose}  # comma: OR
    both = [("category", f"{CATEGORY}|laboratory"), ("category", "vital-signs")]  # repeated: AND
    assert ids(fhir_client, obs, both) == {glucose}
    assert ids(fhir_client, obs, {"code": "71"}) == set()  # tokens match whole codes, not prefixes
    assert ids(fhir_client, obs, {"_id": f"{hb},{local}"}) == {hb, local}


def test_status_token_forms_match_the_code_without_a_system(fhir_client: httpx.Client) -> None:
    final, amended = post(fhir_client, observation("a")), post(fhir_client, observation("b", status="amended"))
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"status": "final"}) == {final}
    assert ids(fhir_client, obs, {"status": "final,amended"}) == {final, amended}
    assert ids(fhir_client, obs, {"status": "|amended"}) == {amended}
    assert ids(fhir_client, obs, {"status": "|"}) == {final, amended}
    assert ids(fhir_client, obs, {"status": "http://hl7.org/fhir/observation-status|final"}) == set()
    assert ids(fhir_client, obs, {"status": "http://hl7.org/fhir/observation-status|"}) == set()
    assert ids(fhir_client, obs, [("status", "final"), ("status", "amended")]) == set()
    assert ids(fhir_client, obs, {"status": "amended", "code": "b", "patient": "Patient/p1"}) == {amended}


def test_identifier_matches_exactly_not_as_a_substring(fhir_client: httpx.Client) -> None:
    a = post(fhir_client, {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "123"}]})
    b = post(fhir_client, {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "1234"},
                                                                     {"system": "urn:other", "value": "123 x"}]})
    c = post(fhir_client, {"resourceType": "Patient", "identifier": [{"system": "urn:other", "value": "123"}]})
    pat = "/fhir/Patient"
    assert ids(fhir_client, pat, {"identifier": "urn:mrn|123"}) == {a}
    assert ids(fhir_client, pat, {"identifier": "123"}) == {a, c}
    assert ids(fhir_client, pat, {"identifier": "urn:other|"}) == {b, c}
    assert ids(fhir_client, pat, {"identifier": "%"}) == set()


def test_date_prefixes_and_partial_dates_are_ranges(fhir_client: httpx.Client) -> None:
    jan = post(fhir_client, observation("a", when={"effectiveDateTime": "2020-01-15"}))
    jun = post(fhir_client, observation("a", when={"effectiveDateTime": "2020-06-01T10:00:00+02:00"}))
    period = post(fhir_client, observation("a", when={"effectivePeriod": {"start": "2021-01-01",
                                                                          "end": "2021-02-01"}}))
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"date": "2020"}) == {jan, jun}
    assert ids(fhir_client, obs, {"date": "eq2020-01"}) == {jan}
    assert ids(fhir_client, obs, {"date": "2020-06-01T08:00:00Z"}) == {jun}  # the same instant in UTC
    assert ids(fhir_client, obs, {"date": "ge2020-06-01"}) == {jun, period}
    assert ids(fhir_client, obs, {"date": "lt2020-06"}) == {jan}
    assert ids(fhir_client, obs, {"date": "gt2020"}) == {period}
    assert ids(fhir_client, obs, {"date": "le2020-01-15"}) == {jan}
    assert ids(fhir_client, obs, {"date": "sa2020-12-31"}) == {period}
    assert ids(fhir_client, obs, {"date": "eb2021"}) == {jan, jun}
    assert ids(fhir_client, obs, {"date": "ne2020"}) == {period}
    assert jun in ids(fhir_client, obs, {"date": "ap2020-06-01"})
    assert ids(fhir_client, obs, {"date": "2021-01-15"}) == set()  # inside the period but not all of it
    assert ids(fhir_client, obs, [("date", "ge2020"), ("date", "lt2021")]) == {jan, jun}
    assert ids(fhir_client, obs, {"date": "2019,2021"}) == {period}
    bad = fhir_client.get(obs, params={"date": "last-tuesday"})
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["date"]


def test_last_updated_compares_the_stored_instant(fhir_client: httpx.Client) -> None:
    first = fhir_client.post("/fhir/Observation", json=observation("a")).json()
    time.sleep(0.05)
    second = fhir_client.post("/fhir/Observation", json=observation("a")).json()
    obs = "/fhir/Observation"
    stamp = first["meta"]["lastUpdated"]
    assert ids(fhir_client, obs, {"_lastUpdated": f"gt{stamp}"}) == {second["id"]}
    assert ids(fhir_client, obs, {"_lastUpdated": f"ge{stamp}"}) == {first["id"], second["id"]}
    assert ids(fhir_client, obs, {"_lastUpdated": f"lt{second['meta']['lastUpdated']}"}) == {first["id"]}
    assert ids(fhir_client, obs, {"_lastUpdated": "lt2000"}) == set()


def test_reference_and_string_parameters(fhir_client: httpx.Client) -> None:
    smith = post(fhir_client, {"resourceType": "Patient", "name": [{"family": "Smith", "given": ["Ann"]}]})
    smid = post(fhir_client, {"resourceType": "Patient", "name": [{"family": "Šmídová", "given": ["Eva"]}]})
    post(fhir_client, {"resourceType": "Patient", "name": [{"family": "Jones", "given": ["Smitty"]}]})
    pat = "/fhir/Patient"
    assert ids(fhir_client, pat, {"family": "smi"}) == {smith, smid}  # prefix, case and accents ignored
    assert ids(fhir_client, pat, {"family": "SMITH"}) == {smith}
    assert len(ids(fhir_client, pat, {"name": "smi"})) == 3  # family or given
    assert ids(fhir_client, pat, {"given": "eva,ann"}) == {smith, smid}
    assert ids(fhir_client, pat, {"family": "sm_th"}) == set()  # LIKE wildcards are plain characters
    mine = post(fhir_client, observation("a", patient=f"Patient/{smith}"))
    post(fhir_client, observation("a", patient=f"Patient/{smid}"))
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"patient": f"Patient/{smith}"}) == {mine}
    assert ids(fhir_client, obs, {"patient": smith}) == {mine}
    assert ids(fhir_client, obs, {"subject": f"http://elsewhere/fhir/Patient/{smith}"}) == {mine}
    wrong = fhir_client.get(obs, params={"patient": "Group/1"})
    assert wrong.status_code == 400 and wrong.json()["issue"][0]["expression"] == ["patient"]


def test_patient_is_the_subjects_that_are_patients_in_searches_and_includes(fhir_client: httpx.Client) -> None:
    patient = post(fhir_client, {"resourceType": "Patient", "gender": "female"})
    group = post(fhir_client, {"resourceType": "Group", "type": "person", "actual": True})
    of_patient = post(fhir_client, observation("a", patient=f"Patient/{patient}"))
    of_group = post(fhir_client, observation("a", patient=f"Group/{group}"))
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"patient": patient}) == {of_patient}
    assert ids(fhir_client, obs, {"subject": group}) == {of_group}
    assert ids(fhir_client, obs, {"subject": f"Patient/{patient}"}) == {of_patient}
    assert ids(fhir_client, obs, {"code": "a", "patient": f"Patient/{patient}"}) == {of_patient}  # a probe
    body = fhir_client.get(obs, params={"_include": "Observation:patient"}).json()
    assert [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"] == [patient]
    body = fhir_client.get(obs, params={"_include": "Observation:subject"}).json()
    assert {e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"} == {patient, group}


def test_sort_and_paging_links_walk_every_page_both_ways(fhir_client: httpx.Client) -> None:
    days = ["2020-01-05", "2020-01-01", "2020-01-04", "2020-01-02", "2020-01-03"]
    by_day = {post(fhir_client, observation("a", when={"effectiveDateTime": d})): d for d in days}
    obs = "/fhir/Observation"
    ascending = fhir_client.get(obs, params={"_sort": "date"}).json()
    assert [by_day[e["resource"]["id"]] for e in ascending["entry"]] == sorted(days)
    descending = fhir_client.get(obs, params={"_sort": "-date"}).json()
    assert [by_day[e["resource"]["id"]] for e in descending["entry"]] == sorted(days, reverse=True)
    by_id = fhir_client.get(obs, params={"_sort": "_id"}).json()
    assert [e["resource"]["id"] for e in by_id["entry"]] == sorted(by_day)

    page = fhir_client.get(obs, params={"_sort": "date", "_count": 2}).json()
    seen: list[str] = []
    pages = [page]
    while True:
        seen += [by_day[e["resource"]["id"]] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert "self" in links
        if "next" not in links:
            break
        page = authorized.get(links["next"]).json()
        pages.append(page)
    assert seen == sorted(days) and len(pages) == 3
    previous = {link["relation"]: link["url"] for link in pages[1]["link"]}["previous"]
    assert authorized.get(previous).json()["entry"] == pages[0]["entry"]
    assert "previous" not in {link["relation"] for link in pages[0]["link"]}


def test_include_adds_referenced_resources_marked_include(fhir_client: httpx.Client) -> None:
    patient = post(fhir_client, {"resourceType": "Patient", "gender": "female"})
    result = post(fhir_client, observation("a", patient=f"Patient/{patient}"))
    report = post(fhir_client, {
        "resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT chest"},
        "subject": {"reference": f"Patient/{patient}"}, "result": [{"reference": f"Observation/{result}"}],
    })
    body = fhir_client.get("/fhir/DiagnosticReport", params=[
        ("_include", "DiagnosticReport:result"), ("_include", "DiagnosticReport:subject"),
    ], headers={"Prefer": "handling=strict"}).json()
    modes = {(e["resource"]["resourceType"], e["resource"]["id"]): e["search"]["mode"] for e in body["entry"]}
    assert modes == {("DiagnosticReport", report): "match", ("Observation", result): "include",
                     ("Patient", patient): "include"}
    assert body["total"] == 1  # included resources do not count as matches
    obs = fhir_client.get("/fhir/Observation", params={"_include": "Observation:patient"}).json()
    assert [e["resource"]["id"] for e in obs["entry"] if e["search"]["mode"] == "include"] == [patient]


def test_summary_count_returns_the_total_only(fhir_client: httpx.Client) -> None:
    for _ in range(3):
        post(fhir_client, observation("a"))
    body = fhir_client.get("/fhir/Observation", params={"_summary": "count", "code": "a"}).json()
    assert body["total"] == 3 and "entry" not in body
    assert fhir_client.get("/fhir/Observation", params={"_count": 0}).json()["total"] == 3


def test_updates_and_deletes_replace_the_index_rows(fhir_client: httpx.Client) -> None:
    rid = post(fhir_client, observation("old-code"))
    current = fhir_client.get(f"/fhir/Observation/{rid}").json()
    changed = {**current, "status": "amended", "code": {"coding": [{"system": LOINC, "code": "new-code"}]}}
    assert fhir_client.put(f"/fhir/Observation/{rid}", json=changed).status_code == 200
    obs = "/fhir/Observation"
    assert ids(fhir_client, obs, {"code": "old-code"}) == set()
    assert ids(fhir_client, obs, {"status": "final"}) == set()
    assert ids(fhir_client, obs, {"code": "new-code", "status": "amended"}) == {rid}
    assert fhir_client.delete(f"/fhir/Observation/{rid}").status_code == 204
    assert ids(fhir_client, obs, {"code": "new-code"}) == set()


def test_unsupported_parameters_are_reported_or_refused(fhir_client: httpx.Client) -> None:
    post(fhir_client, observation("a"))
    params = {"code:text": "x", "value-quantity": "5", "_sort": "value", "_include": "Observation:performer",
              "_summary": "true", "_include:iterate": "Observation:patient", "status": "final"}
    lenient = fhir_client.get("/fhir/Observation", params=params)
    assert lenient.status_code == 200
    body = lenient.json()
    assert body["total"] == 1  # the supported parameter still applied
    (outcome,) = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "outcome"]
    reported = {i["expression"][0] for i in outcome["issue"]}
    assert reported == {"code:text", "value-quantity", "_sort", "_include", "_summary", "_include:iterate"}
    assert all(i["severity"] == "warning" and i["code"] == "not-supported" for i in outcome["issue"])
    strict = fhir_client.get("/fhir/Observation", params=params, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert {i["expression"][0] for i in strict.json()["issue"]} == reported
    for bad in ({"_count": "-1"}, {"_count": "many"}, {"status": ""}, {"_offset": "x"}, {"code": "\x00"}):
        r = fhir_client.get("/fhir/Observation", params=bad)
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == [next(iter(bad))], bad


def test_total_is_exact_up_to_the_limit_and_paging_goes_on_beyond(fhir_client: httpx.Client, store: Store) -> None:
    for _ in range(5):
        post(fhir_client, observation("a"))
    query = fhir_search.parse_search("Observation", [("code", "a"), ("_count", "2")], strict=True)
    broad = fhir_search.run_search(store, query, total_limit=3)
    assert broad.total is None and broad.has_next and len(broad.matches) == 2
    assert fhir_search.run_search(store, query, total_limit=5).total == 5
    last = fhir_search.parse_search("Observation", [("code", "a"), ("_count", "2"), ("_offset", "4")], strict=True)
    assert fhir_search.run_search(store, last, total_limit=3).total == 5  # the last page knows
    counted = fhir_search.parse_search("Observation", [("code", "a"), ("_summary", "count")], strict=True)
    assert fhir_search.run_search(store, counted, total_limit=3).total == 5


def test_total_parameter_none_estimate_and_accurate(fhir_client: httpx.Client, store: Store) -> None:
    for _ in range(5):
        post(fhir_client, observation("a"))
    twice = observation("a")
    twice["code"]["coding"].append({"system": "urn:local", "code": "a"})  # two index rows, one match
    post(fhir_client, twice)
    deleted = post(fhir_client, observation("a"))
    fhir_client.delete(f"/fhir/Observation/{deleted}")
    moved = post(fhir_client, observation("a"))
    assert fhir_client.put(f"/fhir/Observation/{moved}", json={**observation("b"), "id": moved}).status_code == 200

    def bundle(**params: Any) -> dict[str, Any]:
        r = fhir_client.get("/fhir/Observation", params={"code": "a", "_count": 2, **params})
        assert r.status_code == 200, r.text
        return r.json()

    assert bundle()["total"] == 6  # estimate, the default: exact under MEDBRIDGE_FHIR_EXACT_TOTAL_LIMIT
    assert bundle(_total="estimate")["total"] == 6 and bundle(_total="accurate")["total"] == 6
    none = bundle(_total="none")
    assert "total" not in none and len(none["entry"]) == 2
    assert bundle(_total="none", _offset=4)["total"] == 6  # the last page tells it without counting
    refused = fhir_client.get("/fhir/Observation", params={"code": "a", "_total": "exact"})
    assert refused.status_code == 400 and refused.json()["issue"][0]["expression"] == ["_total"]
    capability = fhir_client.get("/fhir/metadata").json()
    assert "_total=none|estimate|accurate" in capability["rest"][0]["documentation"]

    for params in ([("code", "a")], [("code", "a"), ("status", "final")], [("_id", moved), ("code", "b")]):
        expected = 1 if params[0][0] == "_id" else 6
        for limit in (3, 250):  # below and above BROAD_MATCHES: counted by the probe or by the index alone
            estimate = fhir_search.parse_search("Observation", [*params, ("_count", "1")], strict=True)
            got = fhir_search.run_search(store, estimate, total_limit=limit).total
            assert got == (None if expected > limit else expected), (params, limit)
            accurate = fhir_search.parse_search("Observation", [*params, ("_count", "1"), ("_total", "accurate")],
                                                strict=True)
            assert fhir_search.run_search(store, accurate, total_limit=limit).total == expected, (params, limit)


def test_a_broad_search_pages_newest_first_with_its_total(store: Store) -> None:
    from integration.fhir.resources import store_resources

    batches = []
    for b in range(3):  # three transactions: three lastUpdated instants
        batch = [{**observation("wide"), "id": f"w{b}-{i:03d}"} for i in range(90)]
        with store.session() as s:
            store_resources(s, batch)
        batches.append(sorted(r["id"] for r in batch))
        time.sleep(0.01)
    newest_first = batches[2] + batches[1] + batches[0]
    query = fhir_search.parse_search("Observation", [("code", "wide"), ("_count", "10"), ("_offset", "85")],
                                     strict=True)
    result = fhir_search.run_search(store, query)
    assert fhir_search.BROAD_MATCHES < 270
    assert [r["id"] for r in result.matches] == newest_first[85:95] and result.has_next
    assert result.total == 270
    assert fhir_search.run_search(store, query, total_limit=250).total is None
