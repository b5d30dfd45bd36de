"""Writeback to the upstream EHR: the ``ehr`` delivery jobs, each sent exactly once.

The report writer and the review add an ``ehr`` job per upstream in the same transaction as the
change itself (integration.delivery.plan, payloads from integration.delivery.ehr.payload).
``UpstreamSender`` (started by the runtime when ``MEDBRIDGE_UPSTREAM_FHIR_URL`` is set) sends them in
order per report and upstream:

- an issued report goes as its FHIR ``transaction`` Bundle;
- a reviewer action, or a report rewritten after its create was sent, goes as a ``PUT`` of the
  upstream report with ``If-Match`` on the version the last send returned. On 412 the sender reads the
  EHR's version and merges only the fields MedBridge owns onto it (integration.delivery.ehr.merge); if
  the EHR changed one of those since MedBridge last sent it, the job is dead with both versions kept
  in its payload, never overwritten.

Failures: connection errors, timeouts, 408/409/412/429 and 5xx are retried with exponential backoff
and jitter; any other 4xx, or ``MEDBRIDGE_UPSTREAM_MAX_ATTEMPTS`` attempts, makes the job dead: an
administrator sees it at ``GET /api/writebacks?state=dead`` and replays it with
``POST /api/writebacks/{id}/replay``. Logs carry job and report ids only, never report content.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from integration.app.settings import Settings
from integration.db.store import Store
from integration.db.tables import UpstreamReport
from integration.delivery import queue
from integration.delivery.ehr import merge
from integration.delivery.queue import ClaimedJob, RetryPolicy
from integration.delivery.sender import DeliveryError, DeliverySender
from integration.errors import MedBridgeError
from integration.fhir.resources import MEDBRIDGE_IDENTIFIER_SYSTEM

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RETRYABLE_STATUS = {408, 409, 412, 429}


class UpstreamError(DeliveryError):
    """A send to the EHR failed. ``permanent`` ones make the job dead at once; the rest are retried."""


class UpstreamConfigError(MedBridgeError):
    """The upstream settings are incomplete; the message names the setting to fix."""


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
    sent_fields: dict[str, Any] | None = None  # what MedBridge owns, as this send wrote it (merge.owned_fields)


class UpstreamConflictError(UpstreamError):
    """The EHR changed fields MedBridge owns since MedBridge last sent them: nothing is overwritten, the
    writeback is dead with both versions (``upstream``, ``ours``) for a person to reconcile."""

    def __init__(self, upstream_id: str, fields: list[str], version: str | None, upstream: dict[str, Any],
                 ours: dict[str, Any]) -> None:
        named = ", ".join(fields)
        super().__init__(
            f"the EHR changed {named} of DiagnosticReport/{upstream_id} since MedBridge last sent it (upstream "
            f"version {version}); nothing was overwritten. Both versions are kept with this writeback (delivery_jobs."
            "payload, 'conflict'): reconcile them in the EHR, then replay it with POST /api/writebacks/{id}/replay "
            "(a replay overrides only the values recorded here)",
            permanent=True, brief=f"conflict: the EHR changed {named} since the last send")
        self.conflict = {"fields": fields, "upstream_version": version, "upstream": upstream, "ours": ours}


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

    async def read_report(self, upstream_id: str) -> tuple[dict[str, Any], str | None]:
        """The EHR's current version of the report and its version id."""
        resp = await self.request("GET", f"DiagnosticReport/{upstream_id}")
        _check(resp, "read")
        try:
            current = resp.json()
        except ValueError as exc:
            raise UpstreamError("read answered with no FHIR JSON", permanent=False) from exc
        return current, _version_of(resp.headers, current)

    async def update_report(self, upstream_id: str, version: str | None, body: dict[str, Any],
                            last_sent: dict[str, Any] | None,
                            acknowledged: dict[str, Any] | None = None) -> SendResult:
        """PUT ``body`` with If-Match ``version``. On 412 (the EHR holds a newer version) read it, merge
        MedBridge's owned fields onto it and PUT that with its version (integration.delivery.ehr.merge),
        unless the EHR changed an owned field since ``last_sent``: UpstreamConflictError, nothing written.
        A second 412 (another edit meanwhile) is retried later, from the start."""
        resource = {**body, "id": upstream_id}
        headers = {"If-Match": f'W/"{version}"'} if version else {}
        resp = await self.request("PUT", f"DiagnosticReport/{upstream_id}", json=resource, headers=headers)
        if resp.status_code == 412:
            current, version = await self.read_report(upstream_id)
            clashes = merge.conflicting_fields(current, last_sent, resource, acknowledged)
            if clashes:
                raise UpstreamConflictError(upstream_id, clashes, version, current, resource)
            resource = {**merge.merged(current, resource), "id": upstream_id}
            headers = {"If-Match": f'W/"{version}"'} if version else {}
            resp = await self.request("PUT", f"DiagnosticReport/{upstream_id}", json=resource, headers=headers)
        _check(resp, "update")
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        return SendResult(upstream_id, _version_of(resp.headers, payload), sent_fields=merge.owned_fields(resource))


def retry_policy(settings: Settings) -> RetryPolicy:
    # the lease outlasts a transaction, a 412's read and its retry, each up to the timeout
    return RetryPolicy(max_attempts=settings.upstream_max_attempts,
                       backoff_seconds=settings.upstream_backoff_base_seconds,
                       max_backoff_seconds=settings.upstream_backoff_max_seconds,
                       lease_seconds=settings.upstream_timeout_seconds * 4 + 30,
                       retry_for_seconds=settings.upstream_retry_for_seconds)


class UpstreamSender(DeliverySender):
    """Sends the ``ehr`` delivery jobs to every configured upstream; ``start()`` / ``stop()``."""

    kind = "ehr"
    name = "upstream-writeback"

    def __init__(self, store: Store, settings: Settings) -> None:
        super().__init__(store, retry_policy(settings), settings.upstream_poll_seconds)
        self.settings = settings
        self.upstreams = settings.upstream_urls
        self.auth = build_auth(settings)  # refuses incomplete settings before anything starts
        self._client: httpx.AsyncClient | None = None
        self._clients: dict[str, UpstreamClient] = {}

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.settings.upstream_timeout_seconds)
        self._clients = {u: UpstreamClient(u, self.auth, self._client) for u in self.upstreams}
        await super().start()
        log.info("upstream writeback started for %d server(s)", len(self.upstreams))

    async def stop(self) -> None:
        await super().stop()
        if self._client:
            await self._client.aclose()

    def replay_hint(self, job_id: int) -> str:
        return f"replay it with POST /api/writebacks/{job_id}/replay"

    def label(self, destination: str) -> str:
        # the host only: a base URL may carry credentials or a key in its user info or query
        return urlsplit(destination).hostname or "the upstream"

    async def deliver(self, job: ClaimedJob) -> str | None:
        client = self._clients.get(job.destination)
        if client is None:
            raise UpstreamError(f"{job.destination} is no longer in MEDBRIDGE_UPSTREAM_FHIR_URL; add it back and "
                                "replay, or leave this writeback dead", permanent=True,
                                brief="the upstream is no longer in MEDBRIDGE_UPSTREAM_FHIR_URL")
        if job.what == "issued":
            n_obs = sum(1 for e in job.payload["entry"] if e["resource"]["resourceType"] == "Observation")
            result = await client.send_transaction(job.payload, n_obs)
            report = dict(job.payload["entry"][0]["resource"])
            report.pop("result", None)  # urn:uuid references; the EHR's own ids are in result_refs
            if result.result_refs:
                report["result"] = [{"reference": r} for r in result.result_refs]
            result.sent_fields = merge.owned_fields(report)
        else:
            try:
                result = await self._update(client, job)
            except UpstreamConflictError as exc:
                await asyncio.to_thread(queue.record_conflict, self.store, job, exc.conflict)
                raise
        await asyncio.to_thread(self._remember, job, result)
        return f"DiagnosticReport/{result.upstream_id}"

    async def _update(self, client: UpstreamClient, job: ClaimedJob) -> SendResult:
        known = await asyncio.to_thread(self._known, job.destination, job.report_id)
        if known is None:
            found = await client.find_report(job.report_id)
            if found is None:
                raise UpstreamError("the report was never created upstream; replay its create first",
                                    permanent=True)
            known = UpstreamReport(upstream=job.destination, report_id=job.report_id, upstream_id=found.upstream_id,
                                   version_id=found.version_id, result_refs=found.result_refs or [])
        body = dict(job.payload["report"])
        if known.result_refs:
            body["result"] = [{"reference": r} for r in known.result_refs]
        # a replay after a recorded conflict: the values the person saw there may be overridden
        recorded = job.payload.get("conflict")
        acknowledged = merge.owned_fields(recorded["upstream"]) if recorded else None
        return await client.update_report(known.upstream_id, known.version_id, body, known.sent_fields, acknowledged)

    def _known(self, upstream: str, report_id: str) -> UpstreamReport | None:
        with self.store.session() as s:
            return s.get(UpstreamReport, (upstream, report_id))

    def _remember(self, job: ClaimedJob, result: SendResult) -> None:
        """Where the report now lives upstream, and its version (the next update's If-Match)."""
        with self.store.session() as s:
            row = s.get(UpstreamReport, (job.destination, job.report_id))
            if row is None:
                row = UpstreamReport(upstream=job.destination, report_id=job.report_id,
                                     upstream_id=result.upstream_id, result_refs=[])
                s.add(row)
            row.upstream_id, row.version_id = result.upstream_id, result.version_id
            if result.result_refs is not None:
                row.result_refs = result.result_refs
            if result.sent_fields is not None:
                row.sent_fields = result.sent_fields
