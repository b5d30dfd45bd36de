"""Rendered frames for a reviewer scrolling a study: cached in the app, with an ETag the browser can
revalidate (304), and a different window is a different image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file

from integration.db.store import Store
from integration.dicom.rendered_cache import RenderedCache
from tests import authorized
from tests.conftest import serve_app, stack_settings

CT_SMALL = get_testdata_file("CT_small.dcm")


@pytest.fixture
def rendered_url(store: Store, tmp_path: Path) -> Iterator[str]:
    with serve_app(stack_settings(tmp_path, min_free_bytes=0), store) as port:
        base = f"http://127.0.0.1:{port}/dicomweb"
        ct = dcmread(CT_SMALL)
        DICOMwebClient(url=base, headers=authorized.headers()).store_instances([ct])
        yield (f"{base}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
               f"/instances/{ct.SOPInstanceUID}/rendered")


def test_a_rendered_frame_is_served_again_from_the_cache_and_revalidated_by_etag(rendered_url: str) -> None:
    accept = {"Accept": "image/png"}
    first = authorized.get(rendered_url, params={"window": "40,400,linear"}, headers=accept)
    assert first.status_code == 200 and first.headers["Cache-Control"].startswith("private")
    again = authorized.get(rendered_url, params={"window": "40,400,linear"}, headers=accept)
    assert again.content == first.content and again.headers["ETag"] == first.headers["ETag"]
    # how fast the cached frame comes back is bench/review_page.py's to measure, not a timed test's
    revalidated = authorized.get(rendered_url, params={"window": "40,400,linear"},
                                 headers={**accept, "If-None-Match": first.headers["ETag"]})
    assert revalidated.status_code == 304 and not revalidated.content
    other = authorized.get(rendered_url, params={"window": "-600,1500,linear"}, headers=accept)
    assert other.headers["ETag"] != first.headers["ETag"] and other.content != first.content


def test_the_cache_drops_the_least_recently_used_frames_beyond_its_size() -> None:
    cache = RenderedCache(max_bytes=40)
    cache.put("a", b"x" * 10)
    cache.put("b", b"y" * 10)
    assert cache.get("a") == b"x" * 10  # a is now the most recent
    cache.put("c", b"z" * 10)
    cache.put("d", b"w" * 10)
    cache.put("e", b"v" * 10)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("e") is not None
    cache.put("huge", b"h" * 11)  # above a quarter of the cache: not kept
    assert cache.get("huge") is None
