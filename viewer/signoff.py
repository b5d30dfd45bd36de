"""Sign-off: approve (A), reject with a coded reason (X), or amend the conclusion with the change shown
before it is sent. Each decision names the version the reviewer read (If-Match): when someone decided
first, the API refuses it (412) and the page says so instead of overwriting their decision."""

from __future__ import annotations

import difflib
from typing import Any

import streamlit as st

from viewer.client import Api, ApiError

# the coded reasons of a rejection (schemas.api.RejectionReason; README, Review)
REASONS = {"wrong-finding": "Wrong finding", "missed-finding": "Missed finding",
           "poor-image-quality": "Poor image quality", "not-applicable": "Not applicable",
           "other": "Other (say what)"}
OPEN = ("preliminary", "final", "amended")  # statuses a decision can still change


def diff(before: str, after: str) -> str:
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "AI conclusion",
                                          "your amendment", lineterm=""))


def decide(api: Api, report_id: str, etag: str, decision: dict[str, Any]) -> None:
    """Send the decision; the outcome (or the refusal, in words) is shown after the rerun."""
    try:
        done = api.decide(report_id, etag, decision)
    except ApiError as exc:
        if exc.status == 412:
            message = ("Not recorded: someone reviewed this report meanwhile (the page you decided on is stale). "
                       "Reload the report to see their decision, then decide again if needed.")
        elif exc.status == 422:
            message = f"Refused: {exc.message}"
        else:
            message = f"Not recorded ({exc.status}): {exc.message}"
        st.session_state["outcome"] = ("error", message)
        return
    st.session_state["outcome"] = ("success", f"Recorded: report is now {done['status']}.")
    try:
        api.release(report_id)
    except ApiError:
        pass  # the claim lapses by itself


def history(detail: dict[str, Any]) -> None:
    for rv in detail["reviews"]:
        why = f", reason {rv['reason']}" if rv.get("reason") else ""
        note = f" ({rv['comment']})" if rv.get("comment") else ""
        st.text(f"{rv['at']}: {rv['action']} by {rv['reviewer']}{why}{note}")


def show(api: Api, reports: list[tuple[dict[str, Any], str]]) -> None:
    st.subheader("Sign-off")
    outcome = st.session_state.pop("outcome", None)
    if outcome:
        (st.success if outcome[0] == "success" else st.error)(outcome[1])
    by_id = {d["id"]: (d, etag) for d, etag in reports}
    waiting = [rid for rid, (d, _) in by_id.items() if d["status"] == "preliminary"]
    default = waiting[-1] if waiting else list(by_id)[-1]
    if len(by_id) > 1:
        chosen = st.selectbox("Report", list(by_id), index=list(by_id).index(default),
                              format_func=lambda r: f"{r[:8]} ({by_id[r][0]['status']})")
    else:
        chosen = default
    detail, current = by_id[chosen]
    # the version the reviewer was shown (by the run before this one): Streamlit reads the report again on
    # the run a click starts, and a decision must name what the reviewer saw, not what is there now
    seen_key = f"seen:{chosen}"
    etag = st.session_state.get(seen_key, current)
    st.session_state[seen_key] = current
    st.text(f"Report {detail['id']} · status {detail['status']} · version {current}")
    st.text("Conclusion:")
    st.text(detail.get("conclusion") or "—")
    if detail["reviews"]:
        history(detail)
    if detail["status"] not in OPEN:
        st.info("This report was rejected: no decision can change it.")
        return
    approve, reject = st.columns(2)
    if approve.button("Approve", shortcut="A", type="primary", key=f"approve:{chosen}", help="A"):
        decide(api, chosen, etag, {"action": "final"})
        st.rerun()
    with reject:
        reason = st.selectbox("Rejection reason", list(REASONS), index=None, format_func=REASONS.__getitem__,
                              placeholder="Choose a reason", key=f"reason:{chosen}")
        text = st.text_input("Reason text (needed for Other)", key=f"reason-text:{chosen}")
        if st.button("Reject", shortcut="X", key=f"reject:{chosen}", help="X"):
            decide(api, chosen, etag, {"action": "entered-in-error", "reason": reason, "comment": text or None})
            st.rerun()
    with st.expander("Amend the conclusion", expanded=False):
        before = detail.get("conclusion") or ""
        after = st.text_area("Amended conclusion", value=before, key=f"amend:{chosen}", height=150)
        if after.strip() and after != before:
            st.text("The change you are about to sign:")
            st.code(diff(before, after), language="diff")
            if st.button("Submit amendment", key=f"amend-submit:{chosen}"):
                decide(api, chosen, etag, {"action": "amended", "conclusion": after})
                st.rerun()
        else:
            st.text("Edit the conclusion to see the change before you submit it.")
