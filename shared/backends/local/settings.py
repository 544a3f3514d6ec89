"""The local backend's settings section and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.validation import Rule, SettingsReader, http_uri

if TYPE_CHECKING:
    from shared.settings import Settings

LOCAL_TOPIC = "local/job-events"  # the topic the local host's Event Grid endpoint stamps on events
TINY_PHI3 = "tiny-phi3"  # the built-in base model (tiny_model.py)


@dataclass(frozen=True)
class LocalBackendSettings:
    """Where the local backend keeps jobs, models and endpoints, and where its trainer reports."""

    data_dir: Path
    job_events_endpoint: str | None
    job_events_key: str | None


def read_section(reader: SettingsReader) -> LocalBackendSettings:
    endpoint = reader.parsed(
        "JOB_EVENTS_TOPIC_ENDPOINT", None, Rule("an http(s):// Event Grid topic endpoint", http_uri)
    )
    key = reader.raw("JOB_EVENTS_TOPIC_KEY")
    if endpoint and not key:
        reader.errors.append("JOB_EVENTS_TOPIC_KEY is not set: expected the key of JOB_EVENTS_TOPIC_ENDPOINT")
    return LocalBackendSettings(
        data_dir=Path(reader.raw("LOCAL_DATA_DIR") or ".local").expanduser().resolve(),
        job_events_endpoint=endpoint,
        job_events_key=key,
    )


def local_settings(settings: Settings) -> LocalBackendSettings:
    """The local backend's section of the settings (there when ML_BACKEND=local)."""
    section = settings.backend_settings
    if not isinstance(section, LocalBackendSettings):
        raise ValueError(f"the local backend's settings are read only with ML_BACKEND=local, not {settings.ml_backend}")
    return section


SETTING_NAMES = ("LOCAL_DATA_DIR", "JOB_EVENTS_TOPIC_ENDPOINT", "JOB_EVENTS_TOPIC_KEY")
