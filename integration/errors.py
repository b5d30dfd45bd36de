"""The integration package's exceptions, translated in exactly three places:
the HTTP exception handler (fhir_api/api), the DICOM status (dicom_listener) and the consumer ack policy (broker).
"""

from __future__ import annotations


class MedBridgeError(Exception):
    """Base of every error MedBridge raises on purpose."""


class StoreUnavailableError(MedBridgeError):
    """The store (database or disk) cannot take writes right now; the caller may retry later."""


class QueryTooComplexError(MedBridgeError):
    """The database refused a statement as too large (SQLite's expression depth or variable count,
    PostgreSQL's program limits): it will fail again however often it is sent (HTTP 400, not 503)."""


class ResourceNotFoundError(MedBridgeError):
    def __init__(self, resource_type: str, resource_id: str) -> None:
        super().__init__(f"{resource_type}/{resource_id} is not known")
        self.resource_type = resource_type
        self.resource_id = resource_id


class ResourceGoneError(ResourceNotFoundError):
    """The resource existed and was deleted (HTTP 410)."""

    def __init__(self, resource_type: str, resource_id: str) -> None:
        super().__init__(resource_type, resource_id)
        self.args = (f"{resource_type}/{resource_id} was deleted",)


class VersionConflictError(MedBridgeError):
    """If-Match did not match the current version."""


class ConcurrentWriteError(MedBridgeError):
    """Other writers kept creating what this write creates (the same new id) at the same moment, through
    every retry; nothing of this write was kept, and sending it again is safe (HTTP 409)."""


class InvalidResourceError(MedBridgeError):
    """FHIR content failed validation. ``issues`` are (expression, message) pairs."""

    def __init__(self, issues: list[tuple[str, str]], status_code: int = 400) -> None:
        super().__init__("; ".join(f"{e}: {m}" for e, m in issues) or "invalid resource")
        self.issues = issues
        self.status_code = status_code


class PermanentEventError(MedBridgeError):
    """An event can never be processed (bad content); it goes to the dead-letter topic at once."""


class TransientEventError(MedBridgeError):
    """An event could not be processed now but will be later (a peer or a model is down, a resource is
    exhausted): the consumer pauses and retries it, with backoff, for as long as it lasts; never
    dead-lettered."""


class ProtectedResourceError(MedBridgeError):
    """A plain FHIR write to a resource that changes only through its own workflow (an AI report, which
    only its review changes): HTTP 409, telling the caller where to go instead."""

    status_code = 409


class ReviewRefusedError(MedBridgeError):
    """A review decision the report's current status does not allow (HTTP 409)."""

    status_code = 409

    def __init__(self, message: str, current_status: str) -> None:
        super().__init__(message)
        self.current_status = current_status


class ExplanationUnavailableError(MedBridgeError):
    """An explanation map asked for an image whose model renders none (HTTP 409)."""

    status_code = 409


class PreconditionRequiredError(MedBridgeError):
    """A change that must name the version it was based on came without If-Match (HTTP 428)."""

    status_code = 428
