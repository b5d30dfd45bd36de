"""The viewer's only way to MedBridge: its HTTP API, with the logged-in reviewer's bearer token.

Every method answers the parsed body or raises :class:`ApiError` with a message a reviewer can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class ApiError(Exception):
    """The API refused or could not be reached; ``status`` 0 when unreachable."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _problem(response: httpx.Response) -> str:
    """The human part of an error answer: an OperationOutcome's diagnostics, FastAPI's detail, or text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        if body.get("resourceType") == "OperationOutcome":
            return "; ".join(str(i.get("diagnostics", "")) for i in body.get("issue", []))[:500]
        detail = body.get("detail")
        if isinstance(detail, list):
            return "; ".join(str(d.get("msg", d)) for d in detail)[:500]
        if detail:
            return str(detail)[:500]
    return response.text[:300]


@dataclass
class Api:
    base_url: str
    token: str
    timeout: float = 30.0

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=self.timeout,
                            headers={"Authorization": f"Bearer {self.token}"})

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with self._client() as client:
                response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"Cannot reach the MedBridge API at {self.base_url} ({type(exc).__name__}). "
                              "Is `medbridge run` up?") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _problem(response))
        return response

    def worklist(self, params: dict[str, Any]) -> dict[str, Any]:
        given = {k: v for k, v in params.items() if v not in (None, "")}
        return self._send("GET", "/api/worklist", params=given).json()

    def report(self, report_id: str) -> tuple[dict[str, Any], str]:
        """The report's detail and its ETag (the version a decision must name)."""
        response = self._send("GET", f"/api/reports/{report_id}")
        return response.json(), response.headers["ETag"]

    def claim(self, report_id: str) -> dict[str, Any]:
        return self._send("POST", f"/api/reports/{report_id}/claim").json()

    def release(self, report_id: str) -> None:
        self._send("DELETE", f"/api/reports/{report_id}/claim")

    def decide(self, report_id: str, etag: str, decision: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", f"/api/reports/{report_id}/review", json=decision,
                          headers={"If-Match": etag}).json()

    def request_explanation(self, report_id: str, sop: str) -> dict[str, Any]:
        """Ask the imaging worker for the image's heatmap; its state (pending, or ready when it has one)."""
        return self._send("POST", f"/api/reports/{report_id}/images/{sop}/explanation").json()

    def explanation(self, report_id: str, sop: str) -> dict[str, Any]:
        """Where a heatmap asked for stands: pending, ready, or failed with the reason."""
        return self._send("GET", f"/api/reports/{report_id}/images/{sop}/explanation").json()

    def instances(self, study: str) -> list[dict[str, Any]]:
        """QIDO-RS: the study's instances (DICOM JSON)."""
        return self._send("GET", f"/dicomweb/studies/{study}/instances",
                          params={"includefield": "00200013,00080060,0008103E"},
                          headers={"Accept": "application/dicom+json"}).json()

    def rendered(self, study: str, series: str, sop: str, window: str | None = None,
                 viewport: str | None = None) -> bytes:
        params = {k: v for k, v in {"window": window, "viewport": viewport}.items() if v}
        return self._send("GET", f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered",
                          params=params, headers={"Accept": "image/png"}).content

    def thumbnail(self, study: str, series: str) -> bytes:
        return self._send("GET", f"/dicomweb/studies/{study}/series/{series}/thumbnail",
                          headers={"Accept": "image/png"}).content

    def artifact(self, artifact_id: str) -> bytes:
        return self._send("GET", f"/api/artifacts/{artifact_id}").content

    def fhir(self, reference: str) -> dict[str, Any]:
        return self._send("GET", f"/fhir/{reference}", headers={"Accept": "application/fhir+json"}).json()

    def quality(self, start: str | None, end: str | None) -> dict[str, Any]:
        span = {k: v for k, v in {"from": start, "to": end}.items() if v}
        return self._send("GET", "/api/quality", params=span).json()

    def feedback(self, since: str | None) -> bytes:
        return self._send("GET", "/api/feedback", params={"since": since} if since else {}).content


def log_in(base_url: str, username: str, password: str, timeout: float) -> str:
    """A token from the embedded issuer's password login; ApiError 401 when the deployment uses an
    external identity provider, 400 for a wrong name or password."""
    try:
        r = httpx.post(f"{base_url}/auth/token", data={"grant_type": "password", "username": username,
                                                        "password": password}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ApiError(0, f"Cannot reach the MedBridge API at {base_url} ({type(exc).__name__}). "
                          "Is `medbridge run` up?") from exc
    if r.status_code == 200:
        return str(r.json()["access_token"])
    if r.status_code == 401:
        raise ApiError(401, "MedBridge uses your organisation's identity provider; the viewer cannot log in there yet.")
    raise ApiError(r.status_code, "Unknown user name or wrong password.")
