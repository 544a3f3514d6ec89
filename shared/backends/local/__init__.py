"""The local backend: trainer processes, MLflow's registry, local HTTP endpoints, all on this
machine. This module is what the rest of the app knows of it; torch, transformers and mlflow are
imported only when a backend object does the work. None of it ships to Azure."""

from __future__ import annotations

from shared.backends.interface import BackendPlugin
from shared.backends.local.settings import LOCAL_TOPIC, SETTING_NAMES, TINY_PHI3, read_section
from shared.vocabulary import PIPELINE_RUN_TYPE

PLUGIN = BackendPlugin(
    name="local",
    setting_names=SETTING_NAMES,
    read_section=read_section,
    default_base_model=TINY_PHI3,
    default_job_event_topics=lambda section: (LOCAL_TOPIC,),
    backend_class="shared.backends.local.backend:LocalBackend",
    job_run_types=(PIPELINE_RUN_TYPE,),
    runs_in_azure=False,
)
