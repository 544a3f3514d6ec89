"""The Azure ML backend: the registry pipeline component `chat_completion_pipeline`, the
workspace's model registry and managed online endpoints, through azure-ai-ml. This module is what
the rest of the app knows of it; `azure.ai.ml` is imported only inside `backend.py`, when a
backend object does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.backends.azureml.settings import DEFAULT_BASE_MODEL, SETTING_NAMES, read_settings
from shared.backends.registry import BackendPlugin

if TYPE_CHECKING:
    from shared.backends.interface import Backend
    from shared.settings import Settings


def _create(settings: Settings) -> Backend:
    from shared.backends.azureml.backend import AzureMLBackend

    return AzureMLBackend(settings)


PLUGIN = BackendPlugin(
    name="azureml",
    setting_names=SETTING_NAMES,
    read_settings=read_settings,
    default_base_model=DEFAULT_BASE_MODEL,
    default_job_event_topics=lambda section: (section.resource_id,),
    create=_create,
    runs_in_azure=True,
)
