"""Patient data stays out of logs and error text, and the data dir is private."""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from integration import phi
from integration.db.store import Store
from tests import authorized
from tests.conftest import serve_app, stack_settings


def test_log_hashes_are_keyed_hmac_not_a_plain_hash(tmp_path: Path) -> None:
    mrn = "MRN-0012345"
    one, two = phi.load_or_create_key(tmp_path / "a"), phi.load_or_create_key(tmp_path / "b")
    assert one != two and phi.keyed_hash(one, mrn) != phi.keyed_hash(two, mrn)
    assert phi.keyed_hash(one, mrn) not in hashlib.sha256(mrn.encode()).hexdigest()
    phi.install_key(one)
    assert phi.uid_hash(mrn) == phi.keyed_hash(one, mrn) and phi.uid_hash(None) == "-"
    # the key is made once and kept, readable by its owner only
    assert phi.load_or_create_key(tmp_path / "a") == one
    assert stat.S_IMODE((tmp_path / "a" / phi.KEY_FILE).stat().st_mode) == 0o600


@pytest.fixture(autouse=True)
def _key_dirs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()


def test_sql_errors_do_not_carry_the_values(store: Store) -> None:
    insert = text("INSERT INTO reviews (id, report_id, action, reviewer, at) "
                  "VALUES (:id, 'r', 'final', 'Jane Secretname', CURRENT_TIMESTAMP)")
    with store.engine.begin() as conn:
        conn.execute(insert, {"id": 77})
    with pytest.raises(IntegrityError) as refused, store.engine.begin() as conn:
        conn.execute(text("INSERT INTO reviews (id, report_id, action, reviewer, at) "
                          "VALUES (:id, :rid, 'final', :who, CURRENT_TIMESTAMP)"),
                     {"id": 77, "rid": "r", "who": "Jane Secretname"})
    assert "Secretname" not in str(refused.value)


def test_fhir_traffic_logs_no_patient_data(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    patient = {"resourceType": "Patient", "name": [{"family": "Loggable", "given": ["Zelda"]}],
               "identifier": [{"system": "urn:mrn", "value": "MRN-99881"}]}
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Content-Type": "application/fhir+json"}) as c:
        pid = c.post("/fhir/Patient", json=patient).json()["id"]
        c.get("/fhir/Patient", params={"identifier": "urn:mrn|MRN-99881"})
        c.put(f"/fhir/Patient/{pid}", json={**patient, "id": pid, "gender": "Loggable-gender"})
    # what the server side logged (the test's own HTTP client logs the URLs it calls)
    server = ("integration", "inference", "uvicorn", "sqlalchemy", "fastapi", "starlette")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(server))
    assert logged or caplog.records
    for value in ("Loggable", "Zelda", "MRN-99881"):
        assert value not in logged


def test_dicom_files_and_folders_written_by_stow_are_private(store: Store, tmp_path: Path) -> None:
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + raw + b"\r\n--b--\r\n"
    settings = stack_settings(tmp_path, min_free_bytes=0)
    with serve_app(settings, store) as port:
        r = authorized.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=body, timeout=30,
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        assert r.status_code == 200
    files = list(settings.dicom_dir.rglob("*.dcm"))
    assert files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700, f.parent


def test_api_error_text_gives_the_kind_of_error_not_patient_data(store: Store, tmp_path: Path) -> None:
    from integration.delivery import queue

    store.record_dead_letter("report-writer", "medbridge.x.v1", "e1",
                             "PermanentEventError: generated report for DOE^JANE is not valid FHIR", b"{}")
    with store.session() as s:
        job = queue.enqueue(s, "ehr", "http://ehr", "r1", "issued", {})
        job.state = "dead"
        job.last_error = ("POST / answered HTTP 422: Patient DOE^JANE MRN-77 refused; fix the cause, "
                          "then replay it with POST /api/writebacks/{id}/replay")
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        (dead,) = client.get("/api/dead-letters").json()
        (job,) = client.get("/api/writebacks").json()
    assert dead["error"] == "PermanentEventError"
    assert "DOE" not in job["last_error"] and "MRN-77" not in job["last_error"]
    assert "HTTP 422" in job["last_error"] and "replay" in job["last_error"]  # what to do next stays


def test_processes_starting_together_on_a_new_data_dir_share_one_log_hash_key(tmp_path: Path) -> None:
    """Listener processes (or pods on one volume) may make the key at the same moment, in a data dir that
    does not exist yet: every one ends with the same whole key, and the file is the owner's alone."""
    import multiprocessing

    from integration.phi import KEY_FILE, load_or_create_key

    data_dir = tmp_path / "not-yet" / "var"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(load_or_create_key, [data_dir] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE((data_dir / KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == [KEY_FILE]  # no draft left behind
