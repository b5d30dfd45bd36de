"""Where the review page takes its heatmap from, through the real API as a reviewer: the layer alone when the
result names one (coloured over the frame here), the model's pre-blended overlay for results from before it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from integration.db.artifacts import put_artifact
from integration.db.store import Store
from tests import authorized
from tests.conftest import serve_app, stack_settings
from viewer import imaging
from viewer.client import Api
from viewer.image_panel import heatmap_over


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _stored(store: Store, data: bytes) -> str:
    with store.session() as s:
        return put_artifact(s, data, "image/png")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[Api]:
    with serve_app(stack_settings(tmp_path), store) as port:
        yield Api(f"http://127.0.0.1:{port}", authorized.token("reviewer", name="ada"))


def test_a_result_with_a_layer_gets_it_coloured_over_the_frame(api: Api, store: Store) -> None:
    frame = _png(Image.new("RGB", (32, 16), (60, 60, 60)))
    layer = _png(Image.new("L", (32, 16), 230))
    overlay = _png(Image.new("RGB", (32, 16), (0, 255, 0)))  # must not be used: the layer is the real heat
    result = {"heatmap_layer_artifact_id": _stored(store, layer), "heatmap_artifact_id": _stored(store, overlay)}
    shown = _pixels(heatmap_over(api, frame, result, 1.0))
    assert tuple(shown[8, 16]) == tuple(imaging.colour_map(np.array([230 / 255]))[0])
    assert np.array_equal(_pixels(heatmap_over(api, frame, result, 0.0)), _pixels(frame))


def test_a_result_from_before_the_layer_fades_to_the_models_overlay(api: Api, store: Store) -> None:
    frame = _png(Image.new("RGB", (32, 16), (0, 0, 0)))
    overlay = _png(Image.new("RGB", (8, 4), (200, 100, 0)))
    result = {"heatmap_artifact_id": _stored(store, overlay), "heatmap_layer_artifact_id": None}
    assert tuple(_pixels(heatmap_over(api, frame, result, 1.0))[8, 16]) == (200, 100, 0)
    assert np.array_equal(_pixels(heatmap_over(api, frame, result, 0.0)), _pixels(frame))
