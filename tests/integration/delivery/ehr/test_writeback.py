"""Writeback to a real upstream FHIR server (Medplum's router, in Node): what lands, with which auth,
and that every report arrives exactly once through refusals, 503s, hangs and a MedBridge restart.

Most tests run MedBridge's real runtime (HTTP API, sender loop, store) with only the report writer
and call ``write_report`` directly for the AI results, so that a test controls exactly how many
reports exist and when; ``test_cstore_study_reaches_the_upstream_ehr`` drives the whole pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from integration.app.runtime import Runtime
from integration.db.store import Store
from integration.db.tables import DeliveryJob, FhirResource
from integration.delivery.plan import Destinations
from integration.fhir.resources import store_resource
from integration.reports.writer import write_report
from schemas.events import ClinicalInferenceCompleted, EvidencePassage, ImagingInferenceCompleted, InstanceFinding
from tests import authorized
from tests.conftest import stack_settings
from tests.integration.delivery.ehr.conftest import eventually, key_pair

REPORT_SYSTEM = "urn:medbridge:report"
MRN_SYSTEM = "urn:test:mrn"


def seed_patient(store: Store, mrn: str) -> str:
    patient = {"resourceType": "Patient", "id": f"p-{mrn}", "identifier": [{"system": MRN_SYSTEM, "value": mrn}]}
    with store.session() as s:
        store_resource(s, patient, track=False)
    return f"Patient/p-{mrn}"


def imaging_event(patient_ref: str | None, n: int = 0) -> ImagingInferenceCompleted:
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}.{n}"
    return ImagingInferenceCompleted(
        source_event_id=str(uuid.uuid4()),
        study_instance_uid=study,
        revision=1,
        patient_ref=patient_ref,
        imaging_study_ref=None,
        model_name="demo-lesion-densenet",
        model_version="1.2.0",
        findings=[
            InstanceFinding(sop_instance_uid=f"{study}.1", series_instance_uid=f"{study}.0",
                            probabilities={"synthetic_round_lesion": 0.81}),
            InstanceFinding(sop_instance_uid=f"{study}.2", series_instance_uid=f"{study}.0",
                            probabilities={"synthetic_round_lesion": 0.12}),
        ],
    )


@pytest.fixture
async def medbridge(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts MedBridge's runtime (report writer, sender, HTTP; no DICOM, no inference) for an upstream."""
    runtimes: list[Runtime] = []

    async def start(upstream_url: str, *, settings: Any = None, **overrides: Any) -> Runtime:
        if settings is None:
            values: dict[str, Any] = {
                "upstream_fhir_url": upstream_url,
                "upstream_timeout_seconds": 2.0,
                "upstream_backoff_base_seconds": 0.2,
                "upstream_backoff_max_seconds": 1.0,
                "upstream_poll_seconds": 0.2,
                "workers": "reports",
                "dicom_enabled": False,
            }
            values.update(overrides)
            settings = stack_settings(tmp_path, **values)
        rt = Runtime(settings)
        await rt.start()
        runtimes.append(rt)
        return rt

    yield start
    for rt in runtimes:
        await rt.stop()


def api(rt: Runtime) -> httpx.AsyncClient:
    return authorized.AsyncClient(base_url=f"http://127.0.0.1:{rt.settings.http_port}", timeout=30)


async def issue(rt: Runtime, event: ImagingInferenceCompleted) -> str:
    report_id = await asyncio.to_thread(write_report, rt.store, event, Destinations.from_settings(rt.settings))
    rt.notify_outbox()
    return report_id


async def pending(rt: Runtime) -> int:
    async with api(rt) as client:
        text = (await client.get("/metrics")).text
    line = next(ln for ln in text.splitlines() if ln.startswith("medbridge_writeback_pending "))
    return int(line.split()[1])


async def test_report_lands_as_one_transaction_with_observations_devices_provenance_and_aiast(
    upstream_fhir, medbridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="integration")
    up = upstream_fhir(UPSTREAM_BEARER_TOKEN="s3cret-token")
    rt = await medbridge(up.base, upstream_auth="bearer", upstream_token="s3cret-token")
    report_id = await issue(rt, imaging_event(seed_patient(rt.store, "MRN-0001")))

    def found() -> list[dict[str, Any]]:
        return up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}", token="s3cret-token")

    (report,) = await eventually(found, what="the report upstream")
    assert report["status"] == "preliminary"
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
            "display": "Artificial Intelligence asserted"} in report["meta"]["security"]
    assert report["subject"] == {"type": "Patient", "identifier": {"system": MRN_SYSTEM, "value": "MRN-0001"}}
    assert "demo-lesion-densenet" in report["conclusion"]

    # one AI-asserted Observation per finding, referenced from the report
    (obs,) = [up.search(r["reference"].replace("/", "?_id="), token="s3cret-token")[0] for r in report["result"]]
    assert obs["meta"]["security"][0]["code"] == "AIAST"
    assert obs["valueQuantity"]["value"] == pytest.approx(0.81)

    # the model and MedBridge as Devices; a Provenance with the model as author
    devices = {d["deviceName"][0]["name"]: d for d in up.search("Device", token="s3cret-token")}
    assert devices["demo-lesion-densenet"]["version"][0]["value"] == "1.2.0"
    assert "MedBridge" in devices
    (prov,) = up.search(f"Provenance?target=DiagnosticReport/{report['id']}", token="s3cret-token")
    targets = {t["reference"] for t in prov["target"]}
    assert targets == {f"DiagnosticReport/{report['id']}", f"Observation/{obs['id']}"}
    author = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "author")
    assert author["who"]["reference"] == f"Device/{devices['demo-lesion-densenet']['id']}"
    assert obs["device"]["reference"] == author["who"]["reference"]

    async with api(rt) as client:
        (job,) = (await client.get("/api/writebacks", params={"state": "sent"})).json()
        assert job["report_id"] == report_id and job["upstream_ref"] == f"DiagnosticReport/{report['id']}"
        health = (await client.get("/health")).json()
        assert health["details"]["writeback"]["pending"] == 0
        assert health["checks"]["upstream_writeback"] is True
    # the token is really checked: without it the upstream refuses
    assert httpx.get(f"{up.base}/DiagnosticReport", timeout=10).status_code == 401
    # the logs name the report and the job, never the patient or the token
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("integration"))
    assert f"report {report_id}" in ours
    for secret in ("MRN-0001", "s3cret-token"):
        assert secret not in ours


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_reviewer_actions_reach_upstream_as_updates_with_if_match(
    engine: str, request: pytest.FixtureRequest, upstream_fhir, medbridge
) -> None:
    up = upstream_fhir()
    database = request.getfixturevalue("postgres_url") if engine == "postgresql" else ""
    rt = await medbridge(up.base, database_url=database)
    report_id = await issue(rt, imaging_event(seed_patient(rt.store, "MRN-0002")))
    query = f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"
    (created,) = await eventually(lambda: up.search(query), what="the report upstream")

    async with api(rt) as client:
        resp = await client.post(f"/api/reports/{report_id}/review", json={"action": "final"},
                                 headers={"If-Match": 'W/"1"'})
        assert resp.status_code == 200, resp.text

    def status_is(status: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            rows = up.search(query)
            return rows[0] if len(rows) == 1 and rows[0]["status"] == status else None
        return check

    final = await eventually(status_is("final"), what="status final upstream")
    assert final["id"] == created["id"] and final["meta"]["versionId"] != created["meta"]["versionId"]
    assert final["result"] == created["result"]  # the Observations stay attached
    # the reviewer travels with the status: the authenticated caller (the tests' token is for "pytest")
    assert final["resultsInterpreter"] == [{"display": "pytest", "identifier": {
        "system": "urn:medbridge:sub", "value": "pytest"}}]

    # someone edits the report in the EHR (a field the EHR owns): MedBridge's recorded version is stale, so
    # its next PUT gets 412; it reads the current version and merges the reviewer's amendment onto it
    edited = {**final, "performer": [{"display": "Radiology, edited in the EHR"}]}
    edited.pop("meta")
    resp = httpx.put(f"{up.base}/DiagnosticReport/{final['id']}", json=edited, timeout=10,
                     headers={"If-Match": f'W/"{final["meta"]["versionId"]}"'})
    assert resp.status_code == 200, resp.text
    async with api(rt) as client:
        resp = await client.post(f"/api/reports/{report_id}/review",
                                 json={"action": "amended", "conclusion": "Amended: no lesion."},
                                 headers={"If-Match": 'W/"2"'})
        assert resp.status_code == 200, resp.text
    amended = await eventually(status_is("amended"), what="status amended upstream")
    assert amended["conclusion"] == "Amended: no lesion."
    assert amended["performer"] == [{"display": "Radiology, edited in the EHR"}]  # the EHR's edit stays
    assert amended["result"] == created["result"]
    assert len(up.search(query)) == 1
    async with api(rt) as client:
        jobs = (await client.get("/api/writebacks")).json()
    assert [(j["kind"], j["state"]) for j in jobs] == [("create", "sent"), ("update", "sent"), ("update", "sent")]


@pytest.mark.parametrize("key_kind", ["rsa", "ec"])
async def test_smart_backend_services_token_is_fetched_cached_and_refreshed_on_401(
    key_kind: str, tmp_path: Path, upstream_fhir, medbridge
) -> None:
    private, public = key_pair(tmp_path, key_kind)
    up = upstream_fhir(UPSTREAM_SMART_PUBLIC_KEY=str(public), UPSTREAM_SMART_CLIENT_ID="medbridge-client")
    rt = await medbridge(
        up.base, upstream_auth="smart-backend", upstream_token_url=up.token_url,
        upstream_client_id="medbridge-client", upstream_private_key=private, upstream_key_id="k1",
    )
    first = await issue(rt, imaging_event(None, 1))
    second = await issue(rt, imaging_event(None, 2))
    await eventually(lambda: _sent_count(rt.store) == 2, what="both reports sent")
    assert up.stats()["tokensIssued"] == 1  # one token served both sends

    up.revoke_tokens()  # the EHR forgets the token: the next request gets 401, MedBridge fetches another
    async with api(rt) as client:
        resp = await client.post(f"/api/reports/{first}/review", json={"action": "final"},
                                 headers={"If-Match": 'W/"1"'})
        assert resp.status_code == 200
    await eventually(lambda: _sent_count(rt.store) == 3, what="the review sent after a token refresh")
    stats = up.stats()
    assert stats["tokensIssued"] == 2 and stats["unauthorized"] >= 1
    refused = httpx.post(up.token_url, data={}, timeout=10)
    assert refused.status_code == 400  # the token endpoint refuses a request without a client assertion
    async with httpx.AsyncClient(timeout=10) as client:
        auth = await rt.upstream.auth.headers(client)  # type: ignore[union-attr]  # the sender's cached token
    token = auth["Authorization"].removeprefix("Bearer ")
    assert up.stats()["tokensIssued"] == 2  # still cached
    for report_id in (first, second):
        (report,) = up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}", token=token)
        assert report["status"] == ("final" if report_id == first else "preliminary")


def _sent_count(store: Store) -> int:
    from integration.delivery import queue

    return queue.counts(store, "ehr")["sent"]


async def test_every_report_arrives_exactly_once_through_outages_and_a_restart(
    upstream_fhir, fault_proxy, medbridge
) -> None:
    up = upstream_fhir()
    proxy = fault_proxy(up.port)
    rt = await medbridge(proxy.base, upstream_max_attempts=10_000)
    patient = seed_patient(rt.store, "MRN-0003")
    ids = [await issue(rt, imaging_event(patient, 0))]
    await eventually(lambda: _sent_count(rt.store) == 1, what="the first report sent")

    # the upstream refuses connections, then answers 503, then hangs after doing the work
    proxy.set_mode("refuse")
    ids += [await issue(rt, imaging_event(patient, n)) for n in (1, 2)]
    await eventually(lambda: _attempts(rt.store) >= 2, what="failed attempts while refused")
    assert await pending(rt) == 2
    proxy.set_mode("503")
    ids.append(await issue(rt, imaging_event(patient, 3)))
    await eventually(lambda: proxy.requests_by_mode.get("503", 0) >= 2, what="503 answers")
    proxy.set_mode("hang")
    await eventually(lambda: proxy.requests_by_mode.get("hang", 0) >= 1, what="a request that hangs")
    await asyncio.sleep(2.5)  # past the 2 s client timeout: the sender gave up without an answer
    # the hung transaction was applied upstream although MedBridge never heard back
    upstream_before = len(up.search("DiagnosticReport?_count=100"))
    assert upstream_before >= 2
    proxy.set_mode("refuse")
    assert await pending(rt) == 3

    # MedBridge restarts during the outage (same database): the queue survives
    settings = rt.settings
    await rt.stop()
    rt2 = await medbridge(proxy.base, settings=settings)
    assert await pending(rt2) == 3
    ids.append(await issue(rt2, imaging_event(patient, 4)))
    assert await pending(rt2) == 4

    proxy.set_mode("pass")
    await eventually(lambda: _sent_count(rt2.store) == 5, what="every report sent after the outage")
    assert await pending(rt2) == 0
    for report_id in ids:
        assert len(up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}")) == 1, report_id
    assert len(up.search("DiagnosticReport?_count=100")) == 5
    assert len(up.search("Observation?_count=100")) == 5
    assert len(up.search("Provenance?_count=100")) == 5
    assert len(up.search("Device?_count=100")) == 2  # the model and MedBridge, created once


def _attempts(store: Store) -> int:
    from sqlalchemy import func, select

    from integration.db.tables import DeliveryJob

    with store.session() as s:
        return int(s.scalar(select(func.coalesce(func.sum(DeliveryJob.attempts), 0)).where(
            DeliveryJob.kind == "ehr", DeliveryJob.state == "pending")) or 0)


async def test_permanent_rejection_goes_to_the_dead_list_and_replay_sends_it(
    upstream_fhir, fault_proxy, medbridge
) -> None:
    up = upstream_fhir()
    proxy = fault_proxy(up.port)
    proxy.set_mode("422")
    rt = await medbridge(proxy.base)
    report_id = await issue(rt, imaging_event(None, 7))
    async with api(rt) as client:

        async def dead() -> list[dict[str, Any]]:
            return (await client.get("/api/writebacks", params={"state": "dead"})).json()

        for _ in range(300):
            jobs = await dead()
            if jobs:
                break
            await asyncio.sleep(0.2)
        (job,) = jobs
        assert job["report_id"] == report_id and job["attempts"] == 1  # not retried: 422 is permanent
        assert "HTTP 422" in job["last_error"] and "replay" in job["last_error"]
        assert "medbridge_writeback_dead 1" in (await client.get("/metrics")).text
        assert up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}") == []

        assert (await client.post("/api/writebacks/999999/replay")).status_code == 404
        proxy.set_mode("pass")  # the administrator fixes the upstream, then replays
        resp = await client.post(f"/api/writebacks/{job['id']}/replay")
        assert resp.status_code == 200 and resp.json()["state"] == "pending"
        await eventually(lambda: up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"),
                         what="the replayed report upstream")
        await eventually(lambda: _sent_count(rt.store) == 1, what="the job marked sent")
        assert (await client.post(f"/api/writebacks/{job['id']}/replay")).status_code == 409
        assert (await client.get("/api/writebacks", params={"state": "bogus"})).status_code == 422


async def test_incomplete_smart_settings_refuse_to_start_with_the_setting_to_fix(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, upstream_fhir_url="http://127.0.0.1:1/fhir", upstream_auth="smart-backend",
                              upstream_client_id="x", workers="", dicom_enabled=False)
    rt = Runtime(settings)
    from integration.delivery.ehr.sender import UpstreamConfigError

    with pytest.raises(UpstreamConfigError, match="MEDBRIDGE_UPSTREAM_TOKEN_URL, MEDBRIDGE_UPSTREAM_PRIVATE_KEY"):
        await rt.start()
    await rt.stop()


CT_SMALL = get_testdata_file("CT_small.dcm")


async def test_cstore_study_reaches_the_upstream_ehr(tmp_path: Path, imaging_weights: Path, upstream_fhir,
                                                     medbridge) -> None:
    """The whole pipeline: dcmtk storescu -> MedBridge -> imaging AI -> report -> upstream EHR."""
    up = upstream_fhir()
    rt = await medbridge(up.base, workers="imaging,reports", dicom_enabled=True, imaging_model=imaging_weights)
    proc = await asyncio.to_thread(
        subprocess.run, ["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(rt.dicom.port), CT_SMALL],  # type: ignore[union-attr]
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    reports = await eventually(lambda: up.search("DiagnosticReport"), timeout=180, what="the AI report upstream")
    (report,) = reports
    assert report["status"] == "preliminary" and report["meta"]["security"][0]["code"] == "AIAST"
    study_uid = dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    assert report["presentedForm"][0]["contentType"] == "image/png"
    assert len(up.search("Provenance")) == 1


async def test_clinical_report_names_its_inputs_by_identifier_in_the_provenance(upstream_fhir, medbridge) -> None:
    up = upstream_fhir()
    rt = await medbridge(up.base)
    patient = seed_patient(rt.store, "MRN-0004")
    observation = {
        "resourceType": "Observation", "id": "bp-1", "status": "final",
        "identifier": [{"system": "urn:test:lab", "value": "LAB-77"}],
        "code": {"text": "Blood pressure"}, "subject": {"reference": patient},
    }
    with rt.store.session() as s:
        store_resource(s, observation, track=False)
    event = ClinicalInferenceCompleted(
        source_event_id=str(uuid.uuid4()), patient_ref=patient, revision=1, model_name="tiny-llm",
        impression="Elevated blood pressure [1].",
        evidence=[EvidencePassage(passage_id="i10", source="icd10cm", title="I10 Essential hypertension",
                                  text="...", score=0.9, cited=True, code="I10")],
        input_refs=["Observation/bp-1"], conclusion_codes=[("I10", "Essential (primary) hypertension")],
    )
    report_id = await issue(rt, event)
    (report,) = await eventually(lambda: up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"),
                                 what="the clinical report upstream")
    assert report["conclusionCode"][0]["coding"][0]["code"] == "I10"
    assert "result" not in report  # the inputs are the EHR's own data, not results of this report
    (prov,) = up.search(f"Provenance?target=DiagnosticReport/{report['id']}")
    assert prov["entity"] == [{"role": "source", "what": {"type": "Observation",
                                                          "identifier": {"system": "urn:test:lab", "value": "LAB-77"}}}]
    (device,) = [d for d in up.search("Device") if d["deviceName"][0]["name"] == "tiny-llm"]
    author = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "author")
    assert author["who"]["reference"] == f"Device/{device['id']}"


async def test_a_writeback_that_keeps_failing_goes_dead_after_max_attempts(
    upstream_fhir, fault_proxy, medbridge
) -> None:
    up = upstream_fhir()
    proxy = fault_proxy(up.port)
    proxy.set_mode("503")
    rt = await medbridge(proxy.base, upstream_max_attempts=3, upstream_retry_for_seconds=0)
    report_id = await issue(rt, imaging_event(None, 9))
    async with api(rt) as client:
        for _ in range(300):
            dead = (await client.get("/api/writebacks", params={"state": "dead"})).json()
            if dead:
                break
            await asyncio.sleep(0.2)
        (job,) = dead
        assert job["report_id"] == report_id and job["attempts"] == 3 and "HTTP 503" in job["last_error"]
        assert proxy.requests_by_mode["503"] == 3
        assert await pending(rt) == 0
        proxy.set_mode("pass")
        assert (await client.post(f"/api/writebacks/{job['id']}/replay")).status_code == 200
    await eventually(lambda: _sent_count(rt.store) == 1, what="the replayed job sent")
    assert len(up.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}")) == 1


async def test_each_upstream_gets_the_report_and_one_outage_does_not_hold_back_the_other(
    upstream_fhir, fault_proxy, medbridge
) -> None:
    up_a, up_b = upstream_fhir(), upstream_fhir()
    proxy_b = fault_proxy(up_b.port)
    proxy_b.set_mode("refuse")
    rt = await medbridge(f"{up_a.base},{proxy_b.base}", upstream_max_attempts=10_000)
    report_id = await issue(rt, imaging_event(None, 11))
    query = f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"
    await eventually(lambda: up_a.search(query), what="the report at the first upstream")
    assert await pending(rt) == 1  # the second upstream's copy waits
    proxy_b.set_mode("pass")
    await eventually(lambda: up_b.search(query), what="the report at the second upstream")
    await eventually(lambda: _sent_count(rt.store) == 2, what="both jobs sent")
    assert len(up_a.search(query)) == len(up_b.search(query)) == 1


def test_a_model_impression_with_control_characters_still_makes_a_valid_report() -> None:
    """A language model may emit any character: the report keeps its text without those a FHIR string
    may not hold (the FHIR edge refuses them, and the report was dead-lettered)."""
    from integration.fhir.resources import validate_resource
    from integration.reports.writer import clinical_report

    event = ClinicalInferenceCompleted(
        source_event_id=str(uuid.uuid4()), patient_ref="Patient/p1", revision=1, model_name="tiny-llm",
        impression="Elevated\x19 blood pressure\x00 [1].\tSee\nnotes.", evidence=[], input_refs=[],
    )
    report, _details = clinical_report(event)
    assert report["conclusion"] == "Elevated blood pressure [1].\tSee\nnotes."
    validate_resource(report, "DiagnosticReport")


def _edit_upstream(up: Any, report: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """What a clinician does in the EHR: a PUT of the report with ``changes``, on its current version."""
    edited = {k: v for k, v in report.items() if k != "meta"} | changes
    resp = httpx.put(f"{up.base}/DiagnosticReport/{report['id']}", json=edited, timeout=10,
                     headers={"If-Match": f'W/"{report["meta"]["versionId"]}"'})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_an_ehr_edit_of_a_field_medbridge_owns_is_never_overwritten_blindly(
    engine: str, request: pytest.FixtureRequest, upstream_fhir, medbridge
) -> None:
    up = upstream_fhir()
    database = request.getfixturevalue("postgres_url") if engine == "postgresql" else ""
    rt = await medbridge(up.base, database_url=database)
    report_id = await issue(rt, imaging_event(seed_patient(rt.store, "MRN-0412")))
    query = f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"
    (created,) = await eventually(lambda: up.search(query), what="the report upstream")
    ehr = _edit_upstream(up, created, conclusion="Corrected in the EHR by Dr B.")

    async with api(rt) as client:
        resp = await client.post(f"/api/reports/{report_id}/review", json={"action": "final"},
                                 headers={"If-Match": 'W/"1"'})
        assert resp.status_code == 200, resp.text

        async def dead() -> list[dict[str, Any]]:
            return (await client.get("/api/writebacks", params={"state": "dead"})).json()

        for _ in range(300):
            jobs = await dead()
            if jobs:
                break
            await asyncio.sleep(0.2)
        (job,) = jobs
        assert job["kind"] == "update" and job["attempts"] == 1
        assert "the EHR changed conclusion of DiagnosticReport/" in job["last_error"]
        assert job["conflict"] == {"fields": ["conclusion"], "upstream_version": ehr["meta"]["versionId"]}
        assert "Corrected" not in str(job)  # the versions' content is patient data: not in the listing
        with rt.store.session() as s:
            conflict = s.get(DeliveryJob, job["id"]).payload["conflict"]  # type: ignore[union-attr]
        assert conflict["upstream"]["conclusion"] == "Corrected in the EHR by Dr B."  # both versions kept
        assert conflict["ours"]["conclusion"] == created["conclusion"] and conflict["ours"]["status"] == "final"
        (now,) = up.search(query)
        assert now["meta"]["versionId"] == ehr["meta"]["versionId"]  # nothing written over the edit
        assert (now["conclusion"], now["status"]) == ("Corrected in the EHR by Dr B.", "preliminary")

        # the administrator reconciles (here: MedBridge's conclusion is to stand) and replays: the values
        # recorded in the conflict are overridden, the rest of the EHR's version kept
        resp = await client.post(f"/api/writebacks/{job['id']}/replay")
        assert resp.status_code == 200, resp.text

    def final() -> dict[str, Any] | None:
        rows = up.search(query)
        return rows[0] if rows and rows[0]["status"] == "final" else None

    landed = await eventually(final, what="the replayed update upstream")
    assert landed["conclusion"] == created["conclusion"] and landed["result"] == created["result"]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_a_report_rewritten_after_its_create_was_sent_is_sent_again(
    engine: str, request: pytest.FixtureRequest, upstream_fhir, medbridge
) -> None:
    up = upstream_fhir()
    database = request.getfixturevalue("postgres_url") if engine == "postgresql" else ""
    rt = await medbridge(up.base, database_url=database)
    event = imaging_event(seed_patient(rt.store, "MRN-0413"))
    report_id = await issue(rt, event)
    query = f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"
    (created,) = await eventually(lambda: up.search(query), what="the report upstream")
    assert "synthetic round lesion" in created["conclusion"].lower()
    await eventually(lambda: _sent_count(rt.store) == 1, what="the create marked sent")
    _edit_upstream(up, created, performer=[{"display": "Radiology, edited in the EHR"}])

    # the same result again (a replayed event: the same report id) with no finding above the threshold
    low = [f.model_copy(update={"probabilities": {"synthetic_round_lesion": 0.05}}) for f in event.findings]
    assert await issue(rt, event.model_copy(update={"findings": low})) == report_id
    with rt.store.session() as s:
        rewritten = s.get(FhirResource, ("DiagnosticReport", report_id))
        assert rewritten is not None and rewritten.content["conclusion"] != created["conclusion"]
        expected = rewritten.content["conclusion"]

    def resent() -> dict[str, Any] | None:
        rows = up.search(query)
        return rows[0] if len(rows) == 1 and rows[0]["conclusion"] == expected else None

    landed = await eventually(resent, what="the rewritten report upstream")
    assert landed["id"] == created["id"] and landed["result"] == created["result"]
    assert landed["performer"] == [{"display": "Radiology, edited in the EHR"}]  # merged onto the EHR's edit
    async with api(rt) as client:
        jobs = (await client.get("/api/writebacks")).json()
    assert sorted((j["kind"], j["state"]) for j in jobs) == [("create", "sent"), ("update", "sent")]
    assert await issue(rt, event.model_copy(update={"findings": low})) == report_id  # the same again: nothing new
    async with api(rt) as client:
        assert len((await client.get("/api/writebacks")).json()) == 2
