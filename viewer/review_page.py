"""The review of one study: claim it, look at its images (or its clinical evidence), sign off.

A study with several reports (a study that grew) shows every report's images together; the decision is on
one report, by default the newest still awaiting review.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from viewer import clinical_panel, image_panel, signoff
from viewer.client import Api, ApiError
from viewer.settings import ViewerSettings


def next_report() -> None:
    """Button callback: the next study of the worklist page the reviewer came from."""
    queue: list[str] = st.session_state.get("queue", [])
    current = st.session_state.get("report_id")
    later = queue[queue.index(current) + 1:] if current in queue else queue
    if later:
        st.session_state["report_id"] = later[0]
        st.session_state.pop("entry", None)


def claim_once(api: Api, report_id: str) -> None:
    """Claim the report when the reviewer first opens it (renewed on each open); remember the answer."""
    key = f"claim:{report_id}"
    if key in st.session_state:
        return
    try:
        api.claim(report_id)
        st.session_state[key] = None
    except ApiError as exc:
        st.session_state[key] = exc.message if exc.status == 409 else None


def study_reports(api: Api, report_id: str) -> list[tuple[dict[str, Any], str]]:
    """Every report of the study (the worklist entry lists them), each with its ETag."""
    entry = st.session_state.get("entry")
    ids = [r["id"] for r in entry["reports"]] if entry and entry["report_id"] == report_id else [report_id]
    return [api.report(rid) for rid in ids]


def show(api: Api, settings: ViewerSettings) -> None:
    report_id = st.session_state.get("report_id")
    top = st.columns([4, 1])
    top[1].button("Next report", shortcut="N", on_click=next_report, help="N")
    if not report_id:
        st.info("Open a study from the worklist.")
        return
    claim_once(api, report_id)
    held_by_other = st.session_state.get(f"claim:{report_id}")
    reports = study_reports(api, report_id)
    latest, _ = reports[-1]
    top[0].title(f"{'Imaging' if latest['kind'] == 'imaging' else 'Clinical'} review")
    st.text(f"Patient {latest['subject'] or '—'} · study {latest.get('study_instance_uid') or '—'} · "
            f"model {latest.get('model_name') or '—'} {latest.get('model_version') or ''}")
    if held_by_other:
        st.warning(f"In review by someone else: {held_by_other}")
    else:
        st.success("You hold this study for review (others see it as in review by you).")
    if latest["kind"] == "imaging":
        image_panel.show(api, settings, [d for d, _ in reports])
    else:
        clinical_panel.show(api, latest)
    st.divider()
    signoff.show(api, reports)
