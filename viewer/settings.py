"""The viewer's settings: a pydantic-settings model, like the service's (integration.app.settings).

The viewer is a process of its own (the runtime starts it, or anyone runs it against a remote
API), so it reads its few settings from its environment, once, through this model.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, HttpUrl, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ViewerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDBRIDGE_", extra="ignore")

    # the MedBridge HTTP API the viewer calls (MEDBRIDGE_API_URL)
    api_url: str = "http://127.0.0.1:8000"
    # how long one API call may take (MEDBRIDGE_VIEWER_TIMEOUT_SECONDS)
    viewer_timeout_seconds: float = Field(default=30.0, gt=0)
    # a full DICOMweb viewer (OHIF) for reading beyond the review page (MEDBRIDGE_FULL_VIEWER_URL), with
    # {study} where the StudyInstanceUID goes, e.g. http://ohif.example/viewer?StudyInstanceUIDs={study};
    # empty: no link. The viewer must be configured with MedBridge's /dicomweb as its data source.
    full_viewer_url: str = ""
    # worklist entries per page (MEDBRIDGE_WORKLIST_PAGE_SIZE)
    worklist_page_size: int = Field(default=20, ge=5, le=200)

    @field_validator("api_url")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        HttpUrl(value)  # refuses "localhost:8000" and the like with pydantic's message
        return value.rstrip("/")


@lru_cache
def get_viewer_settings() -> ViewerSettings:
    """Built once per viewer process (Streamlit reruns the script on every interaction)."""
    return ViewerSettings()
