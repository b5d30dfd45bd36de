"""The quality loop: time to sign and acceptance, amendment and rejection rates (by reason, model and
version, modality) over a date range, as plots; and the feedback export for the model's owners."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from viewer.client import Api
from viewer.settings import ViewerSettings


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def outcome_chart(groups: list[dict[str, Any]], title: str) -> None:
    rows = [{"group": g["key"], "decision": name, "count": g[field]} for g in groups
            for name, field in (("approved", "approved"), ("amended", "amended"), ("rejected", "rejected"))]
    if not rows:
        st.text(f"{title}: no decisions in this range.")
        return
    st.altair_chart(alt.Chart(pd.DataFrame(rows), title=title).mark_bar().encode(
        x=alt.X("count:Q", stack="normalize", title="share of decisions"), y=alt.Y("group:N", title=None),
        color=alt.Color("decision:N", scale=alt.Scale(domain=["approved", "amended", "rejected"],
                                                      range=["#2e7d32", "#f9a825", "#c62828"])),
        tooltip=["group", "decision", "count"]))


def show(api: Api, settings: ViewerSettings) -> None:
    st.title("Quality")
    span = st.date_input("Decisions made between", value=(date.today() - timedelta(days=30), date.today()))
    start = end = None
    if isinstance(span, tuple) and len(span) == 2:
        start = datetime.combine(span[0], time.min).isoformat() + "Z"
        end = datetime.combine(span[1] + timedelta(days=1), time.min).isoformat() + "Z"
    q = api.quality(start, end)
    overall = q["overall"]
    cols = st.columns(6)
    cols[0].metric("Decisions", overall["decisions"])
    cols[1].metric("Approved", overall["approved"])
    cols[2].metric("Amended", overall["amended"])
    cols[3].metric("Rejected", overall["rejected"])
    cols[4].metric("Time to sign p50", duration(q["time_to_sign_p50_seconds"]))
    cols[5].metric("Time to sign p90", duration(q["time_to_sign_p90_seconds"]))
    left, right = st.columns(2)
    with left:
        outcome_chart(q["by_model"], "By model and version")
    with right:
        outcome_chart(q["by_modality"], "By modality")
    reasons = q["rejection_reasons"]
    if reasons:
        st.subheader("Rejections by reason")
        st.bar_chart(pd.DataFrame({"reason": list(reasons), "rejections": list(reasons.values())}),
                     x="reason", y="rejections")
    st.download_button("Download feedback (JSON Lines)", data=api.feedback(start),
                       file_name="medbridge-feedback.jsonl", mime="application/x-ndjson")
