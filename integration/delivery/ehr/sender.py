"""Writeback to the upstream EHR: every issued report and every reviewer action, exactly once.

The report writer and the review action add a ``WritebackJob`` row in the same database
transaction as the change itself (``enqueue_report_issued`` / ``enqueue_report_reviewed``), so
nothing is lost between the two. ``UpstreamSender`` (started by the runtime when
``MEDBRIDGE_UPSTREAM_FHIR_URL`` is set) sends due jobs in order per report:

- an issued report goes as one FHIR ``transaction`` Bundle: the DiagnosticReport, an Observation per
  AI finding, the model as a Device, MedBridge as a Device, and a Provenance naming the model as
  author (HL7 AI Transparency on FHIR). AI-asserted resources carry the ``AIAST`` security label.
  Every entry is a conditional create (``ifNoneExist`` on a MedBridge identifier or tag), so a retry
  after a lost response never duplicates anything upstream;
- a reviewer action goes as a ``PUT`` of the upstream report with ``If-Match`` on the version the
  last send returned (one GET and one retry on 412).

Failures: connection errors, timeouts, 408/409/412/429 and 5xx are retried with exponential backoff
and full jitter; any other 4xx, or more than ``MEDBRIDGE_UPSTREAM_MAX_ATTEMPTS`` attempts, makes the job
dead: an administrator sees it at ``GET /api/writebacks?state=dead`` and replays it with
``POST /api/writebacks/{id}/replay``. Logs carry job and report ids only, never report content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, aliased

from integration.app.settings import Settings
from integration.db.store import Store
from integration.db.tables import FhirResource, UpstreamReport, WritebackJob, stable_id, utcnow
from integration.errors import MedBridgeError
from integration.fhir.resources import AI_ASSERTED, MEDBRIDGE_IDENTIFIER_SYSTEM

log = logging.getLogger(__name__)

OBSERVATION_SYSTEM = "urn:medbridge:observation"
DEVICE_SYSTEM = "urn:medbridge:device"
PROVENANCE_TAG_SYSTEM = "urn:medbridge:provenance"
AI_PROVENANCE_PROFILE = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance"
MEDBRIDGE_VERSION = "0.1.0"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RETRYABLE_STATUS = {408, 409, 412, 429}
STATES = ("pending", "sent", "dead")


class UpstreamError(MedBridgeError):
    """A send failed. ``permanent`` ones make the job dead at once; the rest are retried."""

    def __init__(self, message: str, *, permanent: bool, brief: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        # what the log gets: the upstream's OperationOutcome text may quote patient data, so it stays out
        self.brief = brief or message


class UpstreamConfigError(MedBridgeError):
    """The upstream settings are incomplete; the message names the setting to fix."""




# Enqueueing: called inside the writer's and the review's own transaction ------------------------
def _logical_reference(s: Session, ref: str | None) -> dict[str, Any] | None:
    """A local reference as the upstream server can resolve it: by the target's identifier."""
    if not ref or "/" not in ref:
        return None
    rtype, rid = ref.split("/", 1)
    row = s.get(FhirResource, (rtype, rid))
    for ident in (row.content.get("identifier") or []) if row is not None else []:
        if ident.get("system") and ident.get("value"):
            return {"type": rtype, "identifier": {"system": ident["system"], "value": ident["value"]}}
    return None


def _upstream_report(s: Session, report: dict[str, Any]) -> dict[str, Any]:
    """The local report reshaped for the upstream server: no local id, references by identifier."""
    out = {k: v for k, v in report.items() if k not in ("id", "meta", "result", "subject", "imagingStudy")}
    out["meta"] = {"security": [AI_ASSERTED]}
    subject = _logical_reference(s, (report.get("subject") or {}).get("reference"))
    if subject:
        out["subject"] = subject
    studies = [_logical_reference(s, r.get("reference")) for r in report.get("imagingStudy") or []]
    if any(studies):
        out["imagingStudy"] = [r for r in studies if r]
    return out


def _finding_observations(
    report_id: str, report: dict[str, Any], details: dict[str, Any], subject: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One AI-asserted Observation per finding label: its highest probability over the images."""
    instances = details.get("instances") or []
    if not instances:
        return []
    out = []
    for name in instances[0].get("probabilities", {}):
        top = max(float(i["probabilities"].get(name, 0.0)) for i in instances)
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"security": [AI_ASSERTED]},
            "identifier": [{"system": OBSERVATION_SYSTEM, "value": stable_id("upstream-observation", report_id, name)}],
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": {"text": f"AI probability of {name.replace('_', ' ')}"},
            "valueQuantity": {"value": round(top, 4), "unit": "probability", "system": "http://unitsofmeasure.org",
                              "code": "1"},
            "issued": report.get("issued"),
        }
        if subject:
            obs["subject"] = subject
        out.append(obs)
    return out


def _device(name: str, version: str, kind: str) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": stable_id("device", name, version)}],
        "deviceName": [{"name": name, "type": "model-name"}],
        "version": [{"value": version}],
        "type": {"text": kind},
        "manufacturer": "MedBridge",
    }


def _entry(resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist},
    }


def _ident_query(resource: dict[str, Any]) -> str:
    ident = resource["identifier"][0]
    return f"identifier={ident['system']}|{ident['value']}"


def report_transaction(s: Session, report: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The transaction Bundle for an issued report: DiagnosticReport, Observations, Devices, Provenance.

    Entry 0 is always the DiagnosticReport and entries 1..n its Observations (the sender reads the
    upstream ids back from those positions of the transaction-response)."""
    report_id = report["id"]
    body = _upstream_report(s, report)
    model = _device(details.get("model_name") or "unknown model", details.get("model_version") or "unversioned",
                    "AI model")
    medbridge = _device("MedBridge", MEDBRIDGE_VERSION, "integration software")
    observations = _finding_observations(report_id, report, details, body.get("subject"))
    dr_entry = _entry(body, _ident_query(body))
    obs_entries = [_entry(o, _ident_query(o)) for o in observations]
    model_entry = _entry(model, _ident_query(model))
    medbridge_entry = _entry(medbridge, _ident_query(medbridge))
    for o in obs_entries:
        o["resource"]["device"] = {"reference": model_entry["fullUrl"]}
    if obs_entries:
        body["result"] = [{"reference": o["fullUrl"]} for o in obs_entries]
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"profile": [AI_PROVENANCE_PROFILE], "tag": [{"system": PROVENANCE_TAG_SYSTEM, "code": report_id}]},
        "target": [{"reference": dr_entry["fullUrl"]}] + [{"reference": o["fullUrl"]} for o in obs_entries],
        "recorded": report.get("issued") or utcnow().isoformat(),
        "policy": ["http://hl7.org/fhir/uv/aitransparency"],
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                         "code": "author"}
                    ]
                },
                "who": {"reference": model_entry["fullUrl"]},
            },
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                         "code": "assembler"}
                    ]
                },
                "who": {"reference": medbridge_entry["fullUrl"]},
            },
        ],
    }
    sources = [_logical_reference(s, r) for r in (details.get("input_refs") or [])]
    if any(sources):
        provenance["entity"] = [{"role": "source", "what": r} for r in sources if r]
    prov_entry = _entry(provenance, f"_tag={PROVENANCE_TAG_SYSTEM}|{report_id}")
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [dr_entry, *obs_entries, model_entry, medbridge_entry, prov_entry],
    }


def enqueue_report_issued(
    s: Session, report: dict[str, Any], details: dict[str, Any], upstreams: Sequence[str]
) -> None:
    """Queue the transaction for a newly written report, once per upstream (in the caller's transaction).

    A report rewritten before it was sent refreshes the queued transaction instead of adding one."""
    for upstream in upstreams:
        bundle = report_transaction(s, report, details)
        existing = s.scalars(
            select(WritebackJob).where(
                WritebackJob.upstream == upstream,
                WritebackJob.report_id == report["id"],
                WritebackJob.kind == "create",
                WritebackJob.state != "dead",
            )
        ).first()
        if existing is None:
            s.add(WritebackJob(upstream=upstream, report_id=report["id"], kind="create", payload=bundle,
                               state="pending", attempts=0, next_attempt_at=utcnow()))
        elif existing.state == "pending":
            existing.payload = bundle


def enqueue_report_reviewed(s: Session, report: dict[str, Any], upstreams: Sequence[str]) -> None:
    """Queue the update carrying a reviewer's action, once per upstream (in the caller's transaction)."""
    for upstream in upstreams:
        s.add(WritebackJob(upstream=upstream, report_id=report["id"], kind="update",
                           payload={"report": _upstream_report(s, report)}, state="pending", attempts=0,
                           next_attempt_at=utcnow()))


# Reading and replaying (the API) ---------------------------------------------------------------
def job_summary(job: WritebackJob) -> dict[str, Any]:
    """What an administrator sees of a job (no payload: it holds patient data)."""
    return {
        "id": job.id,
        "upstream": job.upstream,
        "report_id": job.report_id,
        "kind": job.kind,
        "state": job.state,
        "attempts": job.attempts,
        "next_attempt_at": job.next_attempt_at,
        "last_error": job.last_error,
        "created_at": job.created_at,
        "sent_at": job.sent_at,
        "upstream_ref": job.upstream_ref,
    }


def list_jobs(store: Store, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    with store.session() as s:
        q = select(WritebackJob).order_by(WritebackJob.id).limit(limit)
        if state:
            q = q.where(WritebackJob.state == state)
        return [job_summary(j) for j in s.scalars(q)]


def replay_job(store: Store, job_id: int) -> dict[str, Any] | None:
    """Put a dead job back in the queue with a fresh attempt count. None when no such job; raises
    ``ValueError`` when the job is not dead."""
    with store.session() as s:
        job = s.get(WritebackJob, job_id)
        if job is None:
            return None
        if job.state != "dead":
            raise ValueError(f"writeback {job_id} is {job.state}; only dead writebacks can be replayed")
        job.state, job.attempts, job.next_attempt_at, job.last_error = "pending", 0, utcnow(), None
        log.info("writeback %d (report %s) replayed", job.id, job.report_id)
        return job_summary(job)


def writeback_counts(store: Store) -> dict[str, int]:
    """Jobs per state: the pending count is the writeback backlog metric."""
    with store.session() as s:
        rows = s.execute(select(WritebackJob.state, func.count()).group_by(WritebackJob.state)).all()
    counts = {state: 0 for state in STATES}
    counts.update({state: int(n) for state, n in rows})
    return counts


def _due_jobs(store: Store, limit: int) -> list[WritebackJob]:
    """Pending jobs whose time has come and that have no earlier unsent job for the same report."""
    earlier = aliased(WritebackJob)
    blocker = (
        select(earlier.id)
        .where(
            and_(
                earlier.upstream == WritebackJob.upstream,
                earlier.report_id == WritebackJob.report_id,
                earlier.id < WritebackJob.id,
                earlier.state != "sent",
            )
        )
        .exists()
    )
    with store.session() as s:
        q = (
            select(WritebackJob)
            .where(WritebackJob.state == "pending", WritebackJob.next_attempt_at <= utcnow(), ~blocker)
            .order_by(WritebackJob.id)
            .limit(limit)
        )
        return list(s.scalars(q))


def _claim(store: Store, job: WritebackJob, lease_seconds: float) -> bool:
    """Takes a job for ``lease_seconds``: a second MedBridge process on the same database skips it,
    and if this one dies mid-send the job is due again when the lease ends."""
    with store.session() as s:
        result = s.execute(
            update(WritebackJob)
            .where(WritebackJob.id == job.id, WritebackJob.claim == job.claim, WritebackJob.state == "pending")
            .values(claim=job.claim + 1, next_attempt_at=utcnow() + timedelta(seconds=lease_seconds))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


# Authentication ------------------------------------------------------------------------------
class UpstreamAuth:
    """No authentication; the base of the others."""

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        """Forget a cached credential after a 401 (only SMART tokens can be refreshed)."""

    @property
    def refreshable(self) -> bool:
        return False


class BearerAuth(UpstreamAuth):
    def __init__(self, token: str) -> None:
        self.token = token

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class SmartBackendAuth(UpstreamAuth):
    """SMART Backend Services: client_credentials with a signed JWT assertion (RS384 or ES384, by key type).

    The access token is cached until ``refresh_margin`` seconds before it expires, and dropped on a 401."""

    refresh_margin = 30.0

    def __init__(self, token_url: str, client_id: str, private_key_pem: bytes, key_id: str, scope: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self.algorithm = "ES384"
        else:
            raise UpstreamConfigError("MEDBRIDGE_UPSTREAM_PRIVATE_KEY must be an RSA or EC private key (PEM)")
        self.key = key
        self.token_url, self.client_id, self.key_id, self.scope = token_url, client_id, key_id, scope
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    @property
    def refreshable(self) -> bool:
        return True

    def assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url, "iat": now,
                  "exp": now + 240, "jti": str(uuid.uuid4())}
        headers = {"typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=headers)

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires - self.refresh_margin:
                await self._fetch(client)
        return {"Authorization": f"Bearer {self._token}"}

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        try:
            resp = await client.post(self.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"token endpoint unreachable ({type(exc).__name__})", permanent=False) from exc
        if resp.status_code != 200:
            detail = _oauth_error(resp)
            raise UpstreamError(
                f"token endpoint answered {resp.status_code} ({detail}); check MEDBRIDGE_UPSTREAM_CLIENT_ID, "
                "MEDBRIDGE_UPSTREAM_KEY_ID and that the EHR holds the public key of MEDBRIDGE_UPSTREAM_PRIVATE_KEY",
                permanent=resp.status_code < 500 and resp.status_code not in RETRYABLE_STATUS,
            )
        body = resp.json()
        self._token = body["access_token"]
        self._expires = time.monotonic() + float(body.get("expires_in", 300))

    def invalidate(self) -> None:
        self._token = None


def _oauth_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{body.get('error', '')}: {body.get('error_description', '')}".strip(": ")
    except ValueError:
        return "no details"


def build_auth(settings: Settings) -> UpstreamAuth:
    """The authentication the settings ask for; raises UpstreamConfigError naming what is missing."""
    mode = settings.upstream_auth
    if mode == "none":
        return UpstreamAuth()
    if mode == "bearer":
        if not settings.upstream_token:
            raise UpstreamConfigError("MEDBRIDGE_UPSTREAM_AUTH=bearer needs MEDBRIDGE_UPSTREAM_TOKEN")
        return BearerAuth(settings.upstream_token)
    if mode == "smart-backend":
        missing = [name for name, value in (
            ("MEDBRIDGE_UPSTREAM_TOKEN_URL", settings.upstream_token_url),
            ("MEDBRIDGE_UPSTREAM_CLIENT_ID", settings.upstream_client_id),
            ("MEDBRIDGE_UPSTREAM_PRIVATE_KEY", settings.upstream_private_key),
        ) if not value]
        if missing:
            raise UpstreamConfigError(f"MEDBRIDGE_UPSTREAM_AUTH=smart-backend needs {', '.join(missing)}")
        key_path = Path(str(settings.upstream_private_key))
        if not key_path.is_file():
            raise UpstreamConfigError(f"MEDBRIDGE_UPSTREAM_PRIVATE_KEY: no file at {key_path}")
        return SmartBackendAuth(settings.upstream_token_url, settings.upstream_client_id, key_path.read_bytes(),
                                settings.upstream_key_id, settings.upstream_scope)
    raise UpstreamConfigError(f"MEDBRIDGE_UPSTREAM_AUTH must be none, bearer or smart-backend, not {mode!r}")


# Sending ---------------------------------------------------------------------------------------
@dataclass
class SendResult:
    upstream_id: str
    version_id: str | None
    result_refs: list[str] | None = None


def _version_of(resp_headers: httpx.Headers | dict[str, str], resource: dict[str, Any] | None,
                location: str | None = None) -> str | None:
    etag = resp_headers.get("etag") if resp_headers is not None else None
    if etag:
        return etag.removeprefix("W/").strip('"')
    if location and "/_history/" in location:
        return location.rsplit("/_history/", 1)[1].strip("/")
    return ((resource or {}).get("meta") or {}).get("versionId")


def _id_from(location: str | None, resource: dict[str, Any] | None) -> str | None:
    if resource and resource.get("id"):
        return str(resource["id"])
    if location:
        parts = location.split("/_history/")[0].rstrip("/").split("/")
        return parts[-1] if len(parts) >= 2 else None
    return None


def _outcome_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    issues = body.get("issue") if isinstance(body, dict) else None
    texts = [(i.get("details") or {}).get("text") or i.get("diagnostics") or i.get("code") for i in issues or []]
    return "; ".join(t for t in texts if t)[:500]


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code < 300:
        return
    permanent = 400 <= resp.status_code < 500 and resp.status_code not in RETRYABLE_STATUS
    text = _outcome_text(resp)
    hint = "; fix the cause, then replay it with POST /api/writebacks/{id}/replay" if permanent else ""
    raise UpstreamError(f"{what} answered HTTP {resp.status_code}{': ' + text if text else ''}{hint}",
                        permanent=permanent, brief=f"{what} answered HTTP {resp.status_code}")


class UpstreamClient:
    """Talks FHIR to one upstream base URL with the configured authentication."""

    def __init__(self, base_url: str, auth: UpstreamAuth, client: httpx.AsyncClient) -> None:
        self.base = base_url.rstrip("/") + "/"
        self.auth = auth
        self.client = client

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a 401 with a refreshable token fetches a new token and tries once more."""
        headers = {"Accept": "application/fhir+json", **kwargs.pop("headers", {})}
        if "json" in kwargs:
            headers["Content-Type"] = "application/fhir+json"
        for attempt in (1, 2):
            auth = await self.auth.headers(self.client)
            try:
                resp = await self.client.request(method, self.base + path, headers={**headers, **auth}, **kwargs)
            except httpx.HTTPError as exc:
                raise UpstreamError(f"{method} {path or '/'} failed: {type(exc).__name__} (upstream unreachable or "
                                    "too slow)", permanent=False) from exc
            if resp.status_code == 401 and self.auth.refreshable and attempt == 1:
                self.auth.invalidate()
                continue
            return resp
        return resp

    async def send_transaction(self, bundle: dict[str, Any], n_observations: int) -> SendResult:
        resp = await self.request("POST", "", json=bundle)
        _check(resp, "transaction")
        try:
            entries = resp.json()["entry"]
            first = entries[0]
            location = (first.get("response") or {}).get("location")
            upstream_id = _id_from(location, first.get("resource"))
            etag = (first.get("response") or {}).get("etag")
            version = _version_of({"etag": etag} if etag else {}, first.get("resource"), location)
            refs = []
            for e in entries[1 : 1 + n_observations]:
                loc = (e.get("response") or {}).get("location")
                oid = _id_from(loc, e.get("resource"))
                if oid:
                    refs.append(f"Observation/{oid}")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamError("transaction-response is not a Bundle with entries", permanent=True) from exc
        if not upstream_id:
            raise UpstreamError("transaction-response gives no id for the DiagnosticReport", permanent=True)
        return SendResult(upstream_id, version, refs)

    async def find_report(self, report_id: str) -> SendResult | None:
        """The upstream copy of a MedBridge report, found by its identifier (None when absent)."""
        resp = await self.request("GET", f"DiagnosticReport?identifier={MEDBRIDGE_IDENTIFIER_SYSTEM}|{report_id}")
        _check(resp, "search")
        entries = resp.json().get("entry") or []
        if not entries:
            return None
        res = entries[0]["resource"]
        refs = [r["reference"] for r in res.get("result") or [] if r.get("reference")]
        return SendResult(res["id"], (res.get("meta") or {}).get("versionId"), refs)

    async def current_version(self, upstream_id: str) -> str | None:
        resp = await self.request("GET", f"DiagnosticReport/{upstream_id}")
        _check(resp, "read")
        return _version_of(resp.headers, resp.json())

    async def update_report(self, upstream_id: str, version: str | None, body: dict[str, Any]) -> SendResult:
        resource = {**body, "id": upstream_id}
        for attempt in (1, 2):
            headers = {"If-Match": f'W/"{version}"'} if version else {}
            resp = await self.request("PUT", f"DiagnosticReport/{upstream_id}", json=resource, headers=headers)
            if resp.status_code == 412 and attempt == 1:
                # someone changed it upstream since our last send: the reviewer's action still applies
                version = await self.current_version(upstream_id)
                continue
            _check(resp, "update")
            try:
                payload = resp.json()
            except ValueError:
                payload = None
            return SendResult(upstream_id, _version_of(resp.headers, payload))
        raise AssertionError("unreachable")


class UpstreamSender:
    """Sends queued writeback jobs; ``start()`` / ``stop()`` like every edge.

    One loop for all upstreams: each round takes the due jobs in order; a transient failure backs
    the job off and ends the round for that upstream (it is probably down), so a long outage costs
    one attempt per round, not one per queued report."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.upstreams = settings.upstream_urls
        self.auth = build_auth(settings)  # refuses incomplete settings before anything starts
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.last_error: str | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.settings.upstream_timeout_seconds)
        self._clients = {u: UpstreamClient(u, self.auth, self._client) for u in self.upstreams}
        self._task = asyncio.create_task(self._run(), name="upstream-writeback")
        log.info("upstream writeback started for %d server(s)", len(self.upstreams))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client:
            await self._client.aclose()

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a database hiccup; jobs stay queued
                # the type only: a database error's text can quote the payload, which holds patient data
                log.error("upstream writeback round failed (%s); retrying in %.1f s", type(exc).__name__,
                          self.settings.upstream_poll_seconds)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.upstream_poll_seconds)

    async def send_due(self) -> int:
        """One round: send every due job, in order. Returns how many were sent."""
        lease = self.settings.upstream_timeout_seconds * 4 + 30
        jobs = await asyncio.to_thread(_due_jobs, self.store, 100)
        down: set[str] = set()
        sent = 0
        for job in jobs:
            if job.upstream in down or job.upstream not in self._clients:
                continue
            if not await asyncio.to_thread(_claim, self.store, job, lease):
                continue  # another process took it
            try:
                result = await self._send(job)
            except UpstreamError as exc:
                await asyncio.to_thread(self._failed, job.id, exc)
                if not exc.permanent:
                    down.add(job.upstream)
                continue
            await asyncio.to_thread(self._succeeded, job.id, result)
            sent += 1
        return sent

    async def _send(self, job: WritebackJob) -> SendResult:
        client = self._clients[job.upstream]
        if job.kind == "create":
            n_obs = sum(1 for e in job.payload["entry"] if e["resource"]["resourceType"] == "Observation")
            return await client.send_transaction(job.payload, n_obs)
        known = await asyncio.to_thread(self._known, job.upstream, job.report_id)
        if known is None:
            found = await client.find_report(job.report_id)
            if found is None:
                raise UpstreamError("the report was never created upstream; replay its create first",
                                    permanent=True)
            known = UpstreamReport(upstream=job.upstream, report_id=job.report_id, upstream_id=found.upstream_id,
                                   version_id=found.version_id, result_refs=found.result_refs or [])
        body = dict(job.payload["report"])
        if known.result_refs:
            body["result"] = [{"reference": r} for r in known.result_refs]
        return await client.update_report(known.upstream_id, known.version_id, body)

    def _known(self, upstream: str, report_id: str) -> UpstreamReport | None:
        with self.store.session() as s:
            return s.get(UpstreamReport, (upstream, report_id))

    def _succeeded(self, job_id: int, result: SendResult) -> None:
        with self.store.session() as s:
            job = s.get(WritebackJob, job_id)
            if job is None:
                return
            job.state, job.sent_at, job.last_error = "sent", utcnow(), None
            job.attempts += 1
            job.upstream_ref = f"DiagnosticReport/{result.upstream_id}"
            row = s.get(UpstreamReport, (job.upstream, job.report_id))
            if row is None:
                row = UpstreamReport(upstream=job.upstream, report_id=job.report_id, upstream_id=result.upstream_id,
                                     result_refs=[])
                s.add(row)
            row.upstream_id, row.version_id = result.upstream_id, result.version_id
            if result.result_refs is not None:
                row.result_refs = result.result_refs
        self.last_error = None
        log.info("writeback %d (%s of report %s) sent", job_id, job.kind, job.report_id)

    def _failed(self, job_id: int, exc: UpstreamError) -> None:
        st = self.settings
        with self.store.session() as s:
            job = s.get(WritebackJob, job_id)
            if job is None:
                return
            job.attempts += 1
            job.last_error = str(exc)
            if exc.permanent or job.attempts >= st.upstream_max_attempts:
                job.state = "dead"
                log.error("writeback %d (report %s) is dead after %d attempt(s): %s; see GET /api/writebacks"
                          "?state=dead and replay with POST /api/writebacks/%d/replay",
                          job.id, job.report_id, job.attempts, exc.brief, job.id)
            else:
                # exponential backoff with full jitter
                cap = min(st.upstream_backoff_max_seconds, st.upstream_backoff_base_seconds * 2 ** (job.attempts - 1))
                job.next_attempt_at = utcnow() + timedelta(seconds=random.uniform(0, cap))
                log.warning("writeback %d (report %s) attempt %d failed: %s", job.id, job.report_id,
                            job.attempts, exc.brief)
        self.last_error = exc.brief
