"""The review page's pure parts: the heatmap blend and zoom, the window presets, the impression's links
(model text escaped, only [n] made links), the amendment diff."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from viewer import clinical_panel, imaging, signoff


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_opacity_fades_from_the_frame_to_the_model_overlay_at_the_frame_size() -> None:
    frame, overlay = png((0, 0, 0)), png((200, 100, 0), size=(10, 5))
    assert np.abs(pixels(imaging.blend(frame, overlay, 0.0))).max() == 0
    half = pixels(imaging.blend(frame, overlay, 0.5))
    assert half.shape == (20, 40, 3) and abs(int(half[0, 0, 0]) - 100) <= 1
    assert tuple(pixels(imaging.blend(frame, overlay, 1.0))[5, 5]) == (200, 100, 0)


def test_zoom_keeps_the_size_and_shows_the_centre() -> None:
    image = Image.new("RGB", (40, 40), (0, 0, 0))
    image.paste((255, 255, 255), (15, 15, 25, 25))
    out = io.BytesIO()
    image.save(out, format="PNG")
    zoomed = pixels(imaging.zoom(out.getvalue(), 4.0))
    assert zoomed.shape == (40, 40, 3) and zoomed[20, 20].min() > 200 and zoomed[2, 2].max() > 200


def test_ct_presets_and_the_window_parameter() -> None:
    presets = imaging.presets_for("ct")
    assert presets["Lung"] == (-600.0, 1500.0) and presets["Image VOI"] is None
    assert set(presets) >= {"Lung", "Mediastinum", "Bone", "Brain"}
    assert imaging.presets_for("MR") == {"Image VOI": None}
    assert imaging.window_param(-600, 1500) == "-600,1500,linear"
    assert pixels(imaging.colour_bar(64, 4)).shape == (4, 64, 3)


def test_the_impression_is_escaped_and_only_given_passages_are_linked() -> None:
    html = clinical_panel.linked_impression('HbA1c raised [1] <script>alert("x")</script> see [3]', passages=2)
    assert '<a href="#passage-1">[1]</a>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "[3]" in html and 'href="#passage-3"' not in html


def test_the_amendment_diff_shows_what_changes() -> None:
    diff = signoff.diff("lesion: suspected", "no lesion")
    assert "-lesion: suspected" in diff and "+no lesion" in diff
