"""The viewer's settings come from its environment through one pydantic-settings model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from viewer.settings import ViewerSettings


def test_the_viewer_reads_the_api_url_and_timeout_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBRIDGE_API_URL", "http://api.example:8000/")
    monkeypatch.setenv("MEDBRIDGE_VIEWER_TIMEOUT_SECONDS", "5")
    settings = ViewerSettings()
    assert (settings.api_url, settings.viewer_timeout_seconds) == ("http://api.example:8000", 5.0)


def test_without_environment_the_viewer_calls_the_local_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDBRIDGE_API_URL", raising=False)
    assert ViewerSettings().api_url == "http://127.0.0.1:8000"


def test_an_api_url_without_scheme_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBRIDGE_API_URL", "localhost:8000")
    with pytest.raises(ValidationError, match="api_url"):
        ViewerSettings()
