"""The local model registry: MLflow's, in the same SQLite store as the training metrics.
A job's model gets one version, however often it is registered."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from shared.backends.interface import BackendError, model_description
from shared.backends.local.processes import file_lock
from shared.vocabulary import JOB_TAG

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# Two threads of one process importing mlflow for the first time at once (an event handler and
# the janitor in the local host) can see it half-initialised ("partially initialized module
# 'mlflow'"), and the failed import then breaks every later one: the first import goes one at a time.
_IMPORTING = threading.Lock()


def _client(tracking_uri: str) -> MlflowClient:
    with _IMPORTING:
        from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register(
    tracking_uri: str, lock_dir: Path, name: str, model_folder: Path, run_id: str | None, tags: dict[str, str]
) -> str:
    """Register `model_folder` as a version of `name`, tagged with its lineage; the version already
    registered for the same job (tag `job`) is returned instead of a second one."""
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    # MLflow numbers versions itself: the check and the create must not interleave across processes.
    with file_lock(lock_dir / "registry.lock"):
        try:
            client.create_registered_model(name, description="Fine-tuned chat models, one version per job.")
        except MlflowException as error:
            if "already exists" not in str(error).lower():
                raise
        existing = client.search_model_versions(f"name = '{name}' and tag.{JOB_TAG} = '{tags[JOB_TAG]}'")
        if existing:
            return str(existing[0].version)
        version = client.create_model_version(
            name,
            source=str(model_folder),
            run_id=run_id,
            tags=tags,
            description=model_description(tags, tags[JOB_TAG]),
        )
        return str(version.version)


def model_folder(tracking_uri: str, name: str, version: str) -> Path:
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        return Path(str(client.get_model_version(name, version).source))
    except MlflowException:
        raise BackendError(
            f"no model {name}:{version} in the local registry ('register --job JOB' makes one)"
        ) from None
