"""The review page's pure parts: the heatmap layer's colouring and blend, the old overlay's fade, zoom, the
window presets, the impression's links (model text escaped, only [n] made links), the amendment diff."""

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


def grey_layer(size: tuple[int, int] = (40, 20)) -> bytes:
    """A heatmap layer as the imaging worker stores it (8-bit grey): no heat on the left half, a ramp from
    128 to 255 over the right half."""
    w, h = size
    heat = np.zeros((h, w), dtype=np.uint8)
    heat[:, w // 2:] = np.linspace(128, 255, w - w // 2).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(heat, mode="L").save(out, format="PNG")
    return out.getvalue()


def test_the_heatmap_layer_at_opacity_0_leaves_the_frame_unchanged() -> None:
    frame = png((90, 90, 90))
    for opacity in (0.0, -0.5):  # below 0 is 0
        assert np.array_equal(pixels(imaging.overlay_layer(frame, grey_layer(), opacity)), pixels(frame))


def test_the_heatmap_layer_at_opacity_1_is_the_colour_bars_map_where_the_heat_is() -> None:
    frame, layer = png((90, 90, 90)), grey_layer()
    full = pixels(imaging.overlay_layer(frame, layer, 1.0))
    heat = np.asarray(Image.open(io.BytesIO(layer)), dtype=np.float32) / 255.0
    expected = imaging.colour_map(heat).astype(np.int16)
    assert full.shape == (20, 40, 3)
    assert np.abs(full[:, 20:] - expected[:, 20:]).max() <= 1  # the coloured heat, not a fade of it
    assert np.array_equal(full[:, :20], pixels(frame)[:, :20])  # no heat: the frame as rendered
    # the colour bar shows that same map: its right end is the colour of the hottest pixel
    bar = pixels(imaging.colour_bar(256, 2))
    assert np.abs(bar[0, -1] - full[0, -1]).max() <= 1
    # in between, the heat is mixed with the frame, and more heat where the opacity is higher
    half = pixels(imaging.overlay_layer(frame, layer, 0.5))
    assert np.abs(half[:, 20:] - (pixels(frame)[:, 20:] + expected[:, 20:]) / 2).max() <= 1


def test_the_heatmap_layer_is_resized_onto_the_frame() -> None:
    frame = png((0, 0, 0), size=(80, 40))  # a frame rendered for a larger viewport, same aspect ratio
    out = pixels(imaging.overlay_layer(frame, grey_layer((40, 20)), 1.0))
    assert out.shape == (40, 80, 3)
    assert out[:, :38].max() == 0 and (out[:, 42:].max(axis=-1) > 100).all()  # cold left, hot right


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
