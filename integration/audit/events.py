"""AuditEvent content (FHIR R4) following IHE BALP: who did what to which resource, when, from where,
and with what outcome. Pure functions: nothing here touches the store.

BALP's RESTful pattern: ``type`` = audit-event-type#rest, ``subtype`` = the FHIR interaction
(restful-interaction: read, vread, search-type, create, update, delete, history-*, transaction, batch),
``action`` C/R/U/D/E, ``outcome`` 0 (success), 4 (minor failure: the caller's request was refused), 8
(serious failure: the server failed). Agents: the requesting user (``requestor: true``, with the network
address), the client application where a token names one, and MedBridge as the server. Entities: the
resource (version-specific where a version was written), the Patient where known, and a search's query
(base64, as BALP asks: it can hold patient data, which is why AuditEvents are for administrators only).
DICOM interactions use DICOM's own event types (DCM 110104 transferred, 110103 accessed, 110112 query).
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from integration.identity import Actor

Action = Literal["C", "R", "U", "D", "E"]
Outcome = Literal["0", "4", "8", "12"]

EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
MEDBRIDGE_AUDIT_SYSTEM = "urn:medbridge:audit"
CLIENT_SYSTEM = "urn:medbridge:client"
STUDY_UID_SYSTEM = "urn:dicom:uid"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"

REST = {"system": EVENT_TYPE_SYSTEM, "code": "rest", "display": "RESTful Operation"}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


@dataclass(frozen=True)
class Interaction:
    """What kind of access an AuditEvent records: its type, subtypes and action."""

    type: dict[str, str]
    subtypes: tuple[dict[str, str], ...]
    action: Action


def fhir_interaction(code: str, action: Action) -> Interaction:
    """A FHIR REST interaction (``code`` from restful-interaction)."""
    return Interaction(REST, (_coding(INTERACTION_SYSTEM, code),), action)


# the interactions MedBridge audits, by name
FHIR_READ = fhir_interaction("read", "R")
FHIR_VREAD = fhir_interaction("vread", "R")
FHIR_HISTORY_INSTANCE = fhir_interaction("history-instance", "R")
FHIR_HISTORY_TYPE = fhir_interaction("history-type", "R")
FHIR_SEARCH = fhir_interaction("search-type", "E")  # BALP: a search is an Execute of the query
FHIR_CREATE = fhir_interaction("create", "C")
FHIR_UPDATE = fhir_interaction("update", "U")
FHIR_DELETE = fhir_interaction("delete", "D")
FHIR_TRANSACTION = fhir_interaction("transaction", "E")
FHIR_BATCH = fhir_interaction("batch", "E")
DICOM_STORE = Interaction(_coding(DCM, "110104", "DICOM Instances Transferred"),
                          (_coding(MEDBRIDGE_AUDIT_SYSTEM, "stow-rs", "STOW-RS"),), "C")
DICOM_RETRIEVE = Interaction(_coding(DCM, "110103", "DICOM Instances Accessed"),
                             (_coding(MEDBRIDGE_AUDIT_SYSTEM, "wado-rs", "WADO-RS"),), "R")
DICOM_QUERY = Interaction(_coding(DCM, "110112", "Query"), (_coding(MEDBRIDGE_AUDIT_SYSTEM, "qido-rs", "QIDO-RS"),),
                          "E")
LOGIN = Interaction(_coding(DCM, "110114", "User Authentication"), (_coding(DCM, "110122", "Login"),), "E")
EXPORT = Interaction(_coding(DCM, "110106", "Export"), (), "R")


def review_interaction(action: str) -> Interaction:
    """A reviewer's sign-off decision (``action``: final, amended, entered-in-error): an update of the
    report, with MedBridge's review code beside the REST subtype so the sign-offs can be searched."""
    return Interaction(REST, (_coding(INTERACTION_SYSTEM, "update"),
                              _coding(MEDBRIDGE_AUDIT_SYSTEM, f"review-{action}", f"Review: {action}")), "U")


def outcome_for_status(status_code: int) -> Outcome:
    """BALP outcome of an HTTP status: 0 success, 4 the request was refused (4xx), 8 the server failed."""
    if status_code < 400:
        return "0"
    return "4" if status_code < 500 else "8"


@dataclass
class Entity:
    """One AuditEvent.entity."""

    what: dict[str, Any] | None
    type_code: str  # audit-entity-type: 1 person, 2 system object
    role_code: str  # object-role: 1 patient, 3 report, 4 domain resource, 24 query
    query: bytes | None = None
    description: str | None = None

    def content(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": _coding(ENTITY_TYPE_SYSTEM, self.type_code),
            "role": _coding(OBJECT_ROLE_SYSTEM, self.role_code),
        }
        if self.what is not None:
            out["what"] = self.what
        if self.query is not None:
            out["query"] = base64.b64encode(self.query).decode()
        if self.description:
            out["description"] = self.description
        return out


# what a caller put in a URL is recorded only when it is a well-formed reference or UID: an AuditEvent must
# be storable whatever was asked (PostgreSQL refuses a NUL in JSON), and anything else is no resource anyway
_REFERENCE = re.compile(r"[A-Z][A-Za-z]{0,63}/[A-Za-z0-9\-.]{1,64}(/_history/[0-9]{1,9})?")
_UID = re.compile(r"[0-9.]{1,64}")
_NOT_RECORDED = "the request named no valid id (not recorded)"


def resource_entity(reference: str) -> Entity:
    """A FHIR resource (``Type/id`` or ``Type/id/_history/v``) that was read or written."""
    if not _REFERENCE.fullmatch(reference):
        return Entity(None, "2", "4", description=_NOT_RECORDED)
    return Entity({"reference": reference}, "2", "4")


def patient_entity(reference: str) -> Entity:
    if not _REFERENCE.fullmatch(reference):
        return Entity(None, "1", "1", description=_NOT_RECORDED)
    return Entity({"reference": reference}, "1", "1")


def query_entity(query: str, description: str) -> Entity:
    """A search: the query string, base64 (BALP), and what was searched (``description``: no values)."""
    return Entity(None, "2", "24", query=query.encode(), description=description)


def study_entity(study_uid: str) -> Entity:
    if not _UID.fullmatch(study_uid):
        return Entity(None, "2", "3", description=_NOT_RECORDED)
    return Entity({"identifier": {"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}}, "2", "3")


@dataclass
class Record:
    """Everything one AuditEvent says, gathered while a request runs."""

    actor: Actor
    interaction: Interaction
    entities: list[Entity] = field(default_factory=list)
    outcome: Outcome = "0"
    outcome_desc: str | None = None
    recorded: datetime | None = None


def _agents(actor: Actor) -> list[dict[str, Any]]:
    user: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": actor.reference(),
        "altId": actor.sub,
        "name": actor.display,
        "requestor": True,
    }
    if actor.roles:
        user["role"] = [{"coding": [_coding(MEDBRIDGE_AUDIT_SYSTEM + ":role", r)]} for r in sorted(actor.roles)]
    if actor.address:
        user["network"] = {"address": actor.address, "type": "2"}  # 2: IP address
    agents = [user]
    if actor.client_id:
        agents.append({
            "type": {"coding": [_coding(DCM, "110150", "Application")]},
            "who": {"identifier": {"system": CLIENT_SYSTEM, "value": actor.client_id}},
            "requestor": False,
        })
    agents.append({
        "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
        "who": {"display": "MedBridge"},
        "requestor": False,
    })
    return agents


def audit_event(record: Record, event_id: str | None = None) -> dict[str, Any]:
    """The AuditEvent (FHIR R4 JSON) for ``record``; a fresh id unless ``event_id`` is given."""
    recorded = record.recorded or datetime.now(UTC)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id or str(uuid.uuid4()),
        "type": record.interaction.type,
        "action": record.interaction.action,
        "recorded": recorded.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": record.outcome,
        "agent": _agents(record.actor),
        "source": {
            "observer": {"display": "MedBridge"},
            "type": [_coding(SOURCE_TYPE_SYSTEM, "4", "Application Server")],
        },
    }
    if record.interaction.subtypes:
        event["subtype"] = list(record.interaction.subtypes)
    if record.outcome_desc:
        event["outcomeDesc"] = record.outcome_desc
    if record.entities:
        event["entity"] = [e.content() for e in record.entities]
    return event
