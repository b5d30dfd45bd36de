"""What MedBridge owns in an upstream DiagnosticReport, and how its update meets the EHR's own edits.

MedBridge owns the fields its report and its reviews decide: ``status``, ``conclusion``,
``conclusionCode``, ``presentedForm`` (the heatmap), ``result`` (its Observations), ``resultsInterpreter``
(the reviewer), and the AI-asserted security label in ``meta.security``. Everything else (``category``,
``code``, ``subject``, ``encounter``, ``effective[x]``, ``performer``, ``specimen``, ``imagingStudy``,
``media``, extensions, other labels and tags) is the EHR's once the report is there: an update keeps the
EHR's current values.

When an update meets a 412 (the EHR holds a newer version than the one MedBridge last wrote), the
sender reads the current version and:

- merges MedBridge's owned fields onto it and PUTs that with the new version's ETag, when the EHR
  changed none of the owned fields since MedBridge last sent them (``sent_fields``);
- otherwise refuses to overwrite: the writeback is dead, with both versions recorded (see
  ``conflicting_fields``), until a person reconciles them and replays it.
"""

from __future__ import annotations

from typing import Any

from integration.fhir.resources import AI_ASSERTED

OWNED = ("status", "conclusion", "conclusionCode", "presentedForm", "result", "resultsInterpreter")


def owned_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``report`` that MedBridge owns (absent ones left out)."""
    return {name: report[name] for name in OWNED if name in report}


def conflicting_fields(current: dict[str, Any], last_sent: dict[str, Any] | None, ours: dict[str, Any],
                       acknowledged: dict[str, Any] | None = None) -> list[str]:
    """The owned fields the EHR changed since MedBridge last sent them (``last_sent``) to a value that is
    neither what MedBridge sends now (``ours``) nor what a person already saw in a recorded conflict and
    chose to override by replaying the writeback (``acknowledged``). None when nothing was recorded of
    the last send (a report sent before MedBridge kept it): no field can be told apart, none conflicts."""
    if last_sent is None:
        return []
    clashes = []
    for name in OWNED:
        now = current.get(name)
        if now == last_sent.get(name) or now == ours.get(name):
            continue  # untouched upstream, or already what MedBridge sends
        if acknowledged is not None and now == acknowledged.get(name):
            continue  # a person saw this value in the recorded conflict and replayed the writeback
        clashes.append(name)
    return clashes


def merged(current: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """The EHR's ``current`` version with MedBridge's owned fields from ``ours`` (an owned field ``ours``
    lacks is removed) and the AI-asserted label in ``meta.security``; the server's own ``meta``
    (versionId, lastUpdated) is left for it to set."""
    out = {name: value for name, value in current.items() if name not in OWNED and name != "meta"}
    out.update(owned_fields(ours))
    meta = {k: v for k, v in (current.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    security = list(meta.get("security") or [])
    if not any(label.get("system") == AI_ASSERTED["system"] and label.get("code") == AI_ASSERTED["code"]
               for label in security):
        security.append(AI_ASSERTED)
    meta["security"] = security
    out["meta"] = meta
    return out
