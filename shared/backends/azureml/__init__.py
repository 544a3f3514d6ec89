"""The Azure ML backend: the registry pipeline component `chat_completion_pipeline`, the
workspace's model registry and managed online endpoints, through azure-ai-ml. `azure.ai.ml` is
imported only inside this package."""

from __future__ import annotations


def prepared_uri(datastore: str, run_id: str) -> str:
    """Where a job reads a run's prepared files: the workspace's identity-based datastore on the
    app's `prepared` container. A datastore is one container, so the path starts at the run."""
    return f"azureml://datastores/{datastore}/paths/{run_id}"
