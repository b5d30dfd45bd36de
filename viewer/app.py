"""MedBridge reviewer's workstation (Streamlit). A client of the HTTP API only, so it can run on any host.

    MEDBRIDGE_API_URL=http://127.0.0.1:8000 streamlit run viewer/app.py

Pages: the worklist (viewer.worklist_page), the review of one study (viewer.review_page) and the quality
loop (viewer.quality_page). Model output, FHIR strings and comments are shown as text, never as Markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run viewer/app.py` from anywhere

from viewer import quality_page, review_page, worklist_page  # noqa: E402
from viewer.client import Api, ApiError, log_in  # noqa: E402
from viewer.settings import ViewerSettings, get_viewer_settings  # noqa: E402

st.set_page_config(page_title="MedBridge review", layout="wide")


def login_form(settings: ViewerSettings) -> None:
    """The embedded identity mode's password login (a local user: `medbridge users add`); stops the page
    until it succeeds. The token lives in this browser session only."""
    st.title("MedBridge: reviewer's workstation")
    with st.form("login"):
        username = st.text_input("User name")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        try:
            st.session_state["token"] = log_in(settings.api_url, username, password, settings.viewer_timeout_seconds)
        except ApiError as exc:
            st.error(exc.message)
            st.stop()
        st.session_state["user"] = username
        st.rerun()
    st.stop()


def main() -> None:
    try:
        settings = get_viewer_settings()
    except ValidationError as exc:
        st.error(f"MEDBRIDGE_API_URL must be the API's absolute URL, e.g. http://127.0.0.1:8000 "
                 f"({exc.errors()[0]['msg']})")
        st.stop()
    if "token" not in st.session_state:
        login_form(settings)
    # Streamlit forgets a widget's value on a run that does not draw it: keep the worklist's filters (f_*)
    # while the reviewer is on another page
    for key in [k for k in st.session_state if str(k).startswith("f_")]:
        st.session_state[key] = st.session_state[key]
    api = Api(settings.api_url, st.session_state["token"], settings.viewer_timeout_seconds)
    st.sidebar.text(f"Logged in as {st.session_state['user']}")
    if st.sidebar.button("Log out"):
        st.session_state.clear()
        st.rerun()
    # the page is the sidebar's choice; opening a study sets it (in the button's callback) to Review
    pages = {"Worklist": worklist_page.show, "Review": review_page.show, "Quality": quality_page.show}
    page = st.sidebar.radio("Page", list(pages), key="nav")
    st.caption("AI output is preliminary until a clinician signs it off. The demo imaging model is not for "
               "clinical use.")
    try:
        pages[page](api, settings)
    except ApiError as exc:
        if exc.status == 401:  # the token expired: log in again
            st.session_state.clear()
            st.rerun()
        st.error(exc.message)


main()
