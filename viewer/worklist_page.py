"""The worklist: one entry per study, filtered, sorted and paged by the API, with counts per status and
who is reviewing what. Opening an entry goes to the review page."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import streamlit as st

from viewer.client import Api
from viewer.settings import ViewerSettings

# cancelled: a clinical draft superseded by a newer one of the patient's (integration.reports.supersession)
STATUSES = ["preliminary", "final", "amended", "entered-in-error", "cancelled"]
SORTS = {"AI probability (highest first)": "probability", "Priority (stat first)": "priority",
         "Waiting time (longest first)": "waiting"}


def open_study(item: dict[str, Any], queue: list[str]) -> None:
    """Button callback: review ``item``; the page's other entries are the "next report" queue."""
    st.session_state["report_id"] = item["report_id"]
    st.session_state["entry"] = item
    st.session_state["queue"] = queue
    st.session_state["nav"] = "Review"


def waited(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def filters() -> dict[str, Any]:
    """The sidebar's filters as the worklist API's query parameters."""
    side = st.sidebar
    side.subheader("Filters")
    statuses = side.multiselect("Status", STATUSES, default=["preliminary"], key="f_status")
    kind = side.selectbox("Kind", ["any", "imaging", "clinical"], key="f_kind")
    modality = side.text_input("Modality (e.g. CT)", key="f_modality")
    model = side.text_input("Model", key="f_model")
    finding = side.text_input("Top finding", key="f_finding")
    threshold = side.slider("AI probability at least", 0.0, 1.0, 0.0, 0.05, key="f_threshold")
    patient = side.text_input("Patient identifier", key="f_patient")
    dated = side.checkbox("Issued between", key="f_dated")
    params: dict[str, Any] = {}
    if dated:
        span = side.date_input("Issued", value=(date.today() - timedelta(days=7), date.today()), key="f_dates")
        if isinstance(span, tuple) and len(span) == 2:
            params["from"] = datetime.combine(span[0], time.min).isoformat() + "Z"
            params["to"] = datetime.combine(span[1] + timedelta(days=1), time.min).isoformat() + "Z"
    sort = side.selectbox("Sort by", list(SORTS), key="f_sort")
    params.update({"status": ",".join(statuses), "kind": None if kind == "any" else kind,
                   "modality": modality.strip(), "model": model.strip(), "finding": finding.strip(),
                   "min_probability": threshold or None, "patient": patient.strip(), "sort": SORTS[sort]})
    return params


def show(api: Api, settings: ViewerSettings) -> None:
    st.title("Worklist")
    params = filters()
    size = settings.worklist_page_size
    page_no = int(st.session_state.get("f_page", 1))
    result = api.worklist({**params, "offset": (page_no - 1) * size, "limit": size})
    counts = st.columns(len(STATUSES))
    for column, status in zip(counts, STATUSES, strict=True):
        column.metric(status, result["counts"].get(status, 0))
    pages = max(1, -(-result["total"] // size))
    st.number_input(f"Page (of {pages}; {result['total']} studies)", min_value=1, max_value=pages, step=1,
                    key="f_page")
    items = result["items"]
    if not items:
        st.info("No study matches these filters.")
        return
    queue = [i["report_id"] for i in items]
    widths = [1.2, 3, 1, 3, 1, 1, 2, 2.5]
    header = st.columns(widths)
    for column, title in zip(header, ["", "Patient / study", "Modality", "Top finding", "Priority", "Waiting",
                                      "Status", "In review"], strict=True):
        column.caption(title)
    for item in items:
        row = st.columns(widths)
        row[0].button("Open", key=f"open-{item['report_id']}", on_click=open_study, args=(item, queue))
        who = item["patient_id"] or (item["subject"] or "no patient").removeprefix("Patient/")[:13]
        study = item["study_instance_uid"]
        row[1].text(f"{who}\n{'study …' + study[-14:] if study else 'clinical record'}")
        row[2].text(item["modality"] or ("—" if item["kind"] == "imaging" else "clinical"))
        finding = item["top_finding"] or "—"
        probability = "" if item["top_probability"] is None else f" {item['top_probability']:.2f}"
        row[3].text(f"{finding}{probability}")
        row[4].text(item["priority"] or "—")
        row[5].text(waited(item["waiting_seconds"]))
        revisions = len(item["reports"])
        row[6].text(item["status"] + (f" ({revisions} reports)" if revisions > 1 else ""))
        claim = item.get("claim")
        row[7].text("" if not claim else ("in review by you" if claim["mine"] else f"in review by {claim['reviewer']}"))
