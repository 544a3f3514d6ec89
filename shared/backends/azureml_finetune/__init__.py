"""The Azure ML fine-tuning job backend: the service's own `FineTuning` job (azure-ai-ml's
`create_finetuning_job`), serverless (no GPU quota; the model is served from a serverless
endpoint) or on managed compute (served from a managed online endpoint). The service registers
the trained model. `azure.ai.ml` is imported only inside `backend.py`, when a backend object does
the work."""

from __future__ import annotations

from shared.backends.azureml_finetune.settings import DEFAULT_BASE_MODEL, SETTING_NAMES, read_section
from shared.backends.interface import BackendPlugin

PLUGIN = BackendPlugin(
    name="azureml-finetune",
    setting_names=SETTING_NAMES,
    read_section=read_section,
    default_base_model=DEFAULT_BASE_MODEL,
    default_job_event_topics=lambda section: (section.resource_id,),
    backend_class="shared.backends.azureml_finetune.backend:FineTuneBackend",
    runs_in_azure=True,
    # No source documents the runType of a fine-tuning job's events: any is taken, and the job
    # name must be one this app submitted (the janitor's poll remains the backstop).
    job_run_types=(),
)
