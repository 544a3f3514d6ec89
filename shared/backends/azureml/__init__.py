"""The Azure ML backend: the registry pipeline component `chat_completion_pipeline`, the
workspace's model registry and managed online endpoints, through azure-ai-ml. This module is what
the rest of the app knows of it; `azure.ai.ml` is imported only inside `backend.py`, when a
backend object does the work."""

from __future__ import annotations

from shared.backends.azureml.settings import DEFAULT_BASE_MODEL, SETTING_NAMES, read_section
from shared.backends.interface import BackendPlugin
from shared.vocabulary import PIPELINE_RUN_TYPE

PLUGIN = BackendPlugin(
    name="azureml",
    setting_names=SETTING_NAMES,
    read_section=read_section,
    default_base_model=DEFAULT_BASE_MODEL,
    default_job_event_topics=lambda section: (section.resource_id,),
    backend_class="shared.backends.azureml.backend:AzureMLBackend",
    job_run_types=(PIPELINE_RUN_TYPE,),
    runs_in_azure=True,
)
