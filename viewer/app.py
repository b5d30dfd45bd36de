"""MedBridge review viewer (Streamlit). A client of the HTTP API only, so it can run on any host.

    MEDBRIDGE_API_URL=http://127.0.0.1:8000 streamlit run viewer/app.py
"""

from __future__ import annotations

import httpx
import streamlit as st
from pydantic import ValidationError

from viewer.settings import get_viewer_settings

ACTIONS = {"Approve (final)": "final", "Amend": "amended", "Reject (entered in error)": "entered-in-error"}
# the coded reasons a rejection needs (schemas.api.RejectionReason)
REASONS = {"Wrong finding": "wrong-finding", "Wrong patient": "wrong-patient", "Image quality": "image-quality",
           "Model error": "model-error", "Other (say what in the comment)": "other"}

st.set_page_config(page_title="MedBridge review", layout="wide")
st.title("MedBridge: AI reports awaiting review")
st.caption("AI output is preliminary until a clinician signs it off. The demo imaging model is not for clinical use.")

try:
    settings = get_viewer_settings()
except ValidationError as exc:
    st.error(f"MEDBRIDGE_API_URL must be the API's absolute URL, e.g. http://127.0.0.1:8000 ({exc.errors()[0]['msg']})")
    st.stop()
API_URL = settings.api_url


def log_in() -> None:
    """The embedded identity mode's password login (a local user: `medbridge users add`); stops the page
    until it succeeds. The token lives in this browser session only."""
    with st.form("login"):
        username = st.text_input("User name")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        try:
            r = httpx.post(f"{API_URL}/auth/token", data={"grant_type": "password", "username": username,
                                                           "password": password}, timeout=30)
        except httpx.HTTPError as exc:
            st.error(f"Cannot reach the MedBridge API at {API_URL} ({type(exc).__name__}). Is `medbridge run` up?")
            st.stop()
        if r.status_code == 200:
            st.session_state["token"] = r.json()["access_token"]
            st.session_state["user"] = username
            st.rerun()
        elif r.status_code == 401:
            st.error("MedBridge uses your organisation's identity provider; the viewer cannot log in there yet.")
        else:
            st.error("Unknown user name or wrong password.")
    st.stop()


if "token" not in st.session_state:
    log_in()
st.sidebar.write(f"Logged in as **{st.session_state['user']}**")
if st.sidebar.button("Log out"):
    st.session_state.clear()
    st.rerun()


def api() -> httpx.Client:
    return httpx.Client(base_url=API_URL, timeout=settings.viewer_timeout_seconds,
                        headers={"Authorization": f"Bearer {st.session_state['token']}"})


status_filter = st.sidebar.selectbox("Status", ["preliminary", "final", "amended", "entered-in-error"], index=0)
try:
    with api() as client:
        response = client.get("/api/reports", params={"status": status_filter})
        if response.status_code == 401:  # the token expired: log in again
            st.session_state.clear()
            st.rerun()
        reports = response.raise_for_status().json()
except httpx.HTTPError as exc:
    st.error(f"Cannot reach the MedBridge API at {API_URL} ({type(exc).__name__}). Is `medbridge run` up?")
    st.stop()

if not reports:
    st.info(f"No {status_filter} reports.")
    st.stop()


def label(r: dict) -> str:
    kind = "Imaging" if r["kind"] == "imaging" else "Clinical"
    return f"{kind} report {r['id'][:8]} ({r['subject'] or 'no subject'})"


chosen = st.sidebar.radio("Reports", reports, format_func=label)
with api() as client:
    detail = client.get(f"/api/reports/{chosen['id']}").raise_for_status().json()

st.subheader(label(detail))
st.markdown(f"**Status:** `{detail['status']}`  ·  **Model:** {detail.get('model_name') or '-'} "
            f"{detail.get('model_version') or ''}")
st.markdown("**Conclusion**")
st.write(detail.get("conclusion") or "-")

if detail["kind"] == "imaging":
    left, right = st.columns([3, 2])
    with left:
        with api() as client:
            image = client.get(f"/api/reports/{detail['id']}/image.png")
        if image.status_code == 200:
            st.image(image.content, caption="Image with the AI heatmap (Grad-CAM) overlaid")
        else:
            st.warning("No image available for this report.")
    with right:
        st.markdown("**Probabilities per image**")
        findings = list(detail["instances"][0]["probabilities"]) if detail["instances"] else []
        table = ["| image | " + " | ".join(findings) + " |", "|---" * (len(findings) + 1) + "|"]
        for inst in detail["instances"]:
            probs = " | ".join(f"{inst['probabilities'][f]:.2f}" for f in findings)
            table.append(f"| …{inst['sop_instance_uid'][-12:]} | {probs} |")
        st.markdown("\n".join(table))
else:
    st.markdown("**Evidence given to the model** (cited passages marked)")
    for n, ev in enumerate(detail["evidence"], start=1):
        mark = "cited" if ev["cited"] else "not cited"
        with st.expander(f"[{n}] {ev['title']} ({ev['source']}, {mark}, score {ev['score']:.2f})"):
            st.write(ev["text"])

if detail["reviews"]:
    st.markdown("**Review history**")
    for rv in detail["reviews"]:
        why = f", reason {rv['reason']}" if rv.get("reason") else ""
        note = f" ({rv['comment']})" if rv["comment"] else ""
        st.write(f"{rv['at']}: {rv['action']} by {rv['reviewer']}{why}{note}")

st.divider()
st.markdown("**Your review**")
# the reviewer recorded is the caller the API authenticates, not a name typed here
with st.form("review"):
    action = st.radio("Decision", list(ACTIONS), horizontal=True)
    conclusion = st.text_area("Amended conclusion (for Amend)", value=detail.get("conclusion") or "")
    reason = st.selectbox("Reason (for Reject)", list(REASONS))
    comment = st.text_input("Comment (optional; required for reason Other)")
    submitted = st.form_submit_button("Submit review")
if submitted:
    payload = {"action": ACTIONS[action], "comment": comment or None}
    if ACTIONS[action] == "amended":
        payload["conclusion"] = conclusion
    if ACTIONS[action] == "entered-in-error":
        payload["reason"] = REASONS[reason]
    # the version shown: if someone reviewed it meanwhile, the API refuses (412) instead of overwriting
    version = detail["fhir"]["meta"]["versionId"]
    with api() as client:
        r = client.post(f"/api/reports/{detail['id']}/review", json=payload, headers={"If-Match": f'W/"{version}"'})
    if r.status_code == 200:
        st.success(f"Recorded: report is now {r.json()['status']}.")
    else:
        st.error(f"The review was refused ({r.status_code}): {r.text[:300]}"
                 + (" Reload the page to see the other decision." if r.status_code == 412 else ""))
