"""Image review through DICOMweb: the study's series (thumbnails), a slider and keys to scroll, window/level
presets per modality or a free window, zoom, the model's heatmap over the image (on/off, opacity, colour
bar) beside the original, and the probability of each finding per image as a plot. The image the model
scored highest is the one shown first. The worker renders heatmaps for the top images only: for another, the
reviewer asks (Compute heatmap), the page polls until the imaging worker has rendered it, then shows it."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from viewer import imaging
from viewer.client import Api, ApiError
from viewer.settings import ViewerSettings

SOP, SERIES, NUMBER, MODALITY = "00080018", "0020000E", "00200013", "00080060"


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def study_images(api: Api, study: str, results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The study's images per series, in instance-number order, each with the model's result if any."""
    series: dict[str, list[dict[str, Any]]] = {}
    for item in api.instances(study):
        sop = _value(item, SOP)
        if _value(item, MODALITY) in ("SR", "KO", "PR"):
            continue
        series.setdefault(_value(item, SERIES), []).append(
            {"sop": sop, "series": _value(item, SERIES), "number": _value(item, NUMBER) or 0,
             "modality": _value(item, MODALITY), "result": results.get(sop)})
    for images in series.values():
        images.sort(key=lambda i: (int(i["number"]), i["sop"]))
    return series


def _top_score(image: dict[str, Any]) -> float:
    result = image["result"]
    return max(result["probabilities"].values(), default=0.0) if result else -1.0


def step(key: str, delta: int, count: int) -> None:
    """Key/button callback: the next or previous image of the series."""
    st.session_state[key] = max(1, min(count, int(st.session_state.get(key, 1)) + delta))


def probability_plot(images: list[dict[str, Any]]) -> None:
    rows = [{"image": n, "finding": f, "probability": p}
            for n, image in enumerate(images, start=1) if image["result"]
            for f, p in image["result"]["probabilities"].items()]
    if not rows:
        st.text("The model scored no image of this series.")
        return
    chart = alt.Chart(pd.DataFrame(rows)).mark_line(point=True).encode(
        x=alt.X("image:O", title="image in series"), y=alt.Y("probability:Q", scale=alt.Scale(domain=[0, 1])),
        color="finding:N", tooltip=["image", "finding", alt.Tooltip("probability", format=".2f")])
    st.altair_chart(chart)


def heatmap_over(api: Api, frame: bytes, result: dict[str, Any], opacity: float) -> bytes:
    """The frame with the model's heatmap at ``opacity``: its layer alone when the result has one (coloured and
    blended here, over the reviewer's window), else the model's pre-blended overlay (results from before it)."""
    layer_id: str | None = result.get("heatmap_layer_artifact_id")
    if layer_id:
        return imaging.overlay_layer(frame, api.artifact(layer_id), opacity)
    return imaging.blend(frame, api.artifact(str(result["heatmap_artifact_id"])), opacity)


def _asked_key(result: dict[str, Any]) -> str:
    return f"explain:{result['report_id']}:{result['sop_instance_uid']}"


@st.fragment(run_every=1.0)
def computing(api: Api, result: dict[str, Any]) -> None:
    """While the imaging worker renders the heatmap asked for: "Computing…", polled each second; once it is
    ready (or failed) the whole page runs again, and the report it reloads names the heatmap (or the reason)."""
    try:
        status = api.explanation(result["report_id"], result["sop_instance_uid"])
    except ApiError as exc:
        st.error(exc.message)
        return
    if status["state"] == "pending":
        st.info("Computing… the imaging worker is rendering this image's heatmap.")
        return
    st.session_state.pop(_asked_key(result), None)
    st.rerun()


def heatmap_on_demand(api: Api, result: dict[str, Any]) -> None:
    """For a scored image without a heatmap: a button that asks for one (reviewers), or its progress."""
    if result.get("explainable") is False:
        st.info("The model produced no heatmap for this image, and renders none on request.")
        return
    if result.get("explanation") == "pending" or st.session_state.get(_asked_key(result)):
        computing(api, result)
        return
    st.info("The model produced no heatmap for this image (it renders them for the top-scoring images).")
    if result.get("explanation") == "failed":
        reason = _failure(api, result)
        st.warning(f"The heatmap asked for could not be computed: {reason}. Ask again to retry.")
    if st.button("Compute heatmap", key=f"compute:{_asked_key(result)}"):
        try:
            status = api.request_explanation(result["report_id"], result["sop_instance_uid"])
        except ApiError as exc:
            st.error(exc.message)
            return
        st.session_state[_asked_key(result)] = status["state"] == "pending"
        st.rerun()


def _failure(api: Api, result: dict[str, Any]) -> str:
    try:
        return str(api.explanation(result["report_id"], result["sop_instance_uid"]).get("reason") or "no reason given")
    except ApiError as exc:
        return exc.message


def show(api: Api, settings: ViewerSettings, reports: list[dict[str, Any]]) -> None:
    latest = reports[-1]
    study = latest.get("study_instance_uid")
    if not study:
        st.warning("This report names no study: there are no images to review.")
        return
    results = {i["sop_instance_uid"]: {**i, "report_id": d["id"]} for d in reports for i in d["instances"]}
    by_series = study_images(api, study, results)
    if not by_series:
        st.warning("The study's images are not in MedBridge's store (DICOMweb finds none).")
        return
    rid = latest["id"]
    series_key = f"series:{rid}"
    if series_key not in st.session_state:  # the image the model scored highest, first
        best = max((i for images in by_series.values() for i in images), key=_top_score)
        st.session_state[series_key] = best["series"]
        st.session_state[f"img:{rid}:{best['series']}"] = by_series[best["series"]].index(best) + 1
    if settings.full_viewer_url:
        st.link_button("Open in full viewer", settings.full_viewer_url.replace("{study}", study))

    st.subheader("Series")
    thumbs = st.columns(min(len(by_series), 6))
    for column, (uid, images) in zip(thumbs, by_series.items(), strict=False):
        column.image(api.thumbnail(study, uid), caption=f"{len(images)} image(s) …{uid[-8:]}")
    labels = {uid: f"Series …{uid[-12:]} ({len(images)} images)" for uid, images in by_series.items()}
    series = st.selectbox("Series", list(by_series), format_func=labels.__getitem__, key=series_key)
    images = by_series[series]
    slider_key = f"img:{rid}:{series}"
    st.session_state.setdefault(slider_key, 1)
    keys = st.columns([1, 1, 6])
    keys[0].button("Previous image", shortcut="K", on_click=step, args=(slider_key, -1, len(images)), help="K")
    keys[1].button("Next image", shortcut="J", on_click=step, args=(slider_key, 1, len(images)), help="J")
    if len(images) > 1:
        number = keys[2].slider("Image", 1, len(images), key=slider_key)
    else:
        number = 1
    image = images[number - 1]

    presets = imaging.presets_for(image["modality"])
    controls = st.columns([3, 2, 2])
    preset = controls[0].radio("Window / level", [*presets, "Custom"], horizontal=True, key=f"wl:{rid}")
    window = None
    if preset == "Custom":
        center = controls[0].slider("Window center", -1200, 3000, 40, 10, key=f"wc:{rid}")
        width = controls[0].slider("Window width", 1, 4000, 400, 10, key=f"ww:{rid}")
        window = imaging.window_param(center, width)
    elif presets[preset] is not None:
        window = imaging.window_param(*presets[preset])  # type: ignore[misc]
    factor = controls[1].slider("Zoom", 1.0, 4.0, 1.0, 0.25, key=f"zoom:{rid}")
    result = image["result"] or {}
    has_heat = bool(result.get("heatmap_layer_artifact_id") or result.get("heatmap_artifact_id"))
    overlay_on = controls[2].toggle("Heatmap", value=True, key=f"heat:{rid}", disabled=not has_heat)
    opacity = controls[2].slider("Heatmap opacity", 0, 100, 60, 5, key=f"opacity:{rid}", disabled=not has_heat)

    frame = api.rendered(study, image["series"], image["sop"], window=window, viewport="512,512")
    left, right = st.columns(2)
    left.image(imaging.zoom(frame, factor), caption=f"Original, image {number} of {len(images)}")
    with right:
        if has_heat and overlay_on:
            blended = heatmap_over(api, frame, result, opacity / 100)
            st.image(imaging.zoom(blended, factor), caption=f"Heatmap overlay at {opacity}%")
            st.image(imaging.colour_bar(), caption="Model attention: low → high")
        elif has_heat:
            st.info("Heatmap hidden (toggle it on to compare).")
        elif result:
            heatmap_on_demand(api, result)
        else:
            st.info("The model produced no heatmap for this image.")
    if image["result"]:
        st.text("Probabilities for this image: " + ", ".join(
            f"{f} {p:.2f}" for f, p in image["result"]["probabilities"].items()))
    st.subheader("Probability per image")
    probability_plot(images)
