"""The clinical review: the patient's context as the model saw it (the records it read), the impression
with each [n] linked to its passage, each drafted sentence with its grounding mark (plain ``st.text``), the
passages it cited apart from those it was given but did not cite.

Everything here comes from a model or from FHIR records, so it is shown as text: plain ``st.text``, or
HTML built from escaped text (only the [n] links are markup MedBridge writes)."""

from __future__ import annotations

import html
import re
from typing import Any

import streamlit as st

from schemas.clinical import GROUNDING_SUMMARY_EXTENSION, SENTENCE_SUPPORT_EXTENSION, UNSUPPORTED_MARK
from viewer.client import Api, ApiError

_CITATION = re.compile(r"\[(\d{1,3})\]")


def linked_impression(text: str, passages: int) -> str:
    """The impression as HTML: the text escaped, each [n] of a given passage a link to it."""
    out, last = [], 0
    for match in _CITATION.finditer(text):
        out.append(html.escape(text[last:match.start()]))
        n = int(match.group(1))
        out.append(f'<a href="#passage-{n}">[{n}]</a>' if 1 <= n <= passages else html.escape(match.group()))
        last = match.end()
    out.append(html.escape(text[last:]))
    return '<div style="white-space: pre-wrap">' + "".join(out) + "</div>"


def _parts(extension: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for part in extension.get("extension", []):
        value = next((v for k, v in part.items() if k.startswith("value")), None)
        out.setdefault(str(part.get("url")), []).append(value)
    return out


def sentence_marks(report: dict[str, Any]) -> list[str]:
    """One plain-text line per drafted sentence of a clinical report, from its grounding extensions:
    "supported [1, 2]: ..." or "NOT SUPPORTED BY THE CITED EVIDENCE (why): ...". Empty when unchecked."""
    lines = []
    for ext in report.get("extension", []):
        if ext.get("url") != SENTENCE_SUPPORT_EXTENSION:
            continue
        parts = _parts(ext)
        text = str((parts.get("text") or [""])[0])
        cited = ", ".join(str(n) for n in parts.get("cited", []))
        if (parts.get("supported") or [False])[0]:
            lines.append(f"✓ supported by [{cited}]: {text}")
        else:
            why = str((parts.get("reason") or [""])[0])
            why = why.removeprefix(UNSUPPORTED_MARK).strip(" ()")
            lines.append(f"⚠ {UNSUPPORTED_MARK.upper()}" + (f" ({why})" if why else "") + f": {text}")
    return lines


def grounding_summary(report: dict[str, Any]) -> str | None:
    """What grounding changed in the draft, as one plain line; None when the report was not checked."""
    ext = next((e for e in report.get("extension", []) if e.get("url") == GROUNDING_SUMMARY_EXTENSION), None)
    if ext is None:
        return None
    parts = _parts(ext)
    removed = int((parts.get("citationsRemoved") or [0])[0] or 0)
    truncated = bool((parts.get("truncated") or [False])[0])
    notes = []
    if removed:
        notes.append(f"{removed} citation(s) of passages the model was never given were removed")
    if truncated:
        notes.append("the draft hit its length limit; its unfinished last sentence was dropped")
    return "; ".join(notes) + "." if notes else None


def _coded(concept: dict[str, Any] | None) -> str:
    if not concept:
        return "—"
    codings = concept.get("coding") or [{}]
    return str(concept.get("text") or codings[0].get("display") or codings[0].get("code") or "—")


def describe(resource: dict[str, Any]) -> str:
    """One line for a record the model read (age and sex, a condition, an observation with its
    interpretation, a medication)."""
    kind = resource.get("resourceType")
    if kind == "Patient":
        return f"Patient: {resource.get('gender', 'sex unknown')}, born {resource.get('birthDate', 'unknown')}"
    if kind == "Condition":
        return f"Condition: {_coded(resource.get('code'))}"
    if kind == "Observation":
        value = resource.get("valueQuantity") or {}
        shown = (f"{value.get('value', '')} {value.get('unit', '')}".strip()
                 or _coded(resource.get("valueCodeableConcept")))
        flags = ", ".join(_coded(i) for i in resource.get("interpretation", []))
        return f"Observation: {_coded(resource.get('code'))} = {shown}" + (f" ({flags})" if flags else "")
    if kind in ("MedicationStatement", "MedicationRequest"):
        return f"Medication: {_coded(resource.get('medicationCodeableConcept'))}"
    return f"{kind}: {resource.get('id')}"


def show(api: Api, detail: dict[str, Any]) -> None:
    st.subheader("Patient context (the records the model read)")
    refs = list(dict.fromkeys(([detail["subject"]] if detail.get("subject") else []) + detail.get("input_refs", [])))
    for ref in refs:
        try:
            st.text(describe(api.fhir(ref)))
        except ApiError as exc:
            st.text(f"{ref}: not readable ({exc.message})")
    passages = detail.get("evidence", [])
    st.subheader("Impression")
    st.html(linked_impression(detail.get("conclusion") or "", len(passages)))
    report = detail.get("fhir") or {}
    marks = sentence_marks(report)
    if marks:
        # Model text: plain st.text only, never Markdown or HTML.
        st.subheader("Sentence by sentence: support by the cited passages")
        for line in marks:
            st.text(line)
        summary = grounding_summary(report)
        if summary:
            st.text(summary)
    cited = [(n, p) for n, p in enumerate(passages, start=1) if p["cited"]]
    uncited = [(n, p) for n, p in enumerate(passages, start=1) if not p["cited"]]
    st.subheader(f"Cited passages ({len(cited)})")
    for n, p in cited:
        st.html(f'<div id="passage-{n}" style="background:#fff6d5;padding:6px;border-left:4px solid #e0a800">'
                f'<b>[{n}] {html.escape(p["title"])}</b> ({html.escape(p["source"])}, score {p["score"]:.2f})'
                f'<div style="white-space: pre-wrap">{html.escape(p["text"])}</div></div>')
    with st.expander(f"Given to the model but not cited ({len(uncited)})"):
        for n, p in uncited:
            st.html(f'<div id="passage-{n}"><b>[{n}] {html.escape(p["title"])}</b> ({html.escape(p["source"])})</div>')
            st.text(p["text"])
