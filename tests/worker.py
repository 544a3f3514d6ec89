"""How the Python worker calls the app's functions, for tests that call them directly."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import azure.functions as func

from functions.intake import dataset_intake
from shared.backends.local.settings import LOCAL_TOPIC
from shared.dev.localhost import Trigger, blob_trigger_argument
from shared.vocabulary import DATASETS_CONTAINER, RUN_STATUS_CHANGED


def deliver_upload(name: str, container: str = DATASETS_CONTAINER) -> None:
    """Call `dataset_intake` for a blob as the worker does: with the BlobClient the binding
    extension builds from the host's model binding data."""
    function = dataset_intake.build()
    (binding,) = json.loads(function.get_function_json())["bindings"]
    trigger = Trigger(function.get_function_name(), binding["type"], binding, function.get_user_function())
    trigger.call(blob_trigger_argument(trigger, container, name))


def completed_event(job: str) -> func.EventGridEvent:
    """The event the local trainer (as Azure ML) publishes when job `job` completes."""
    return func.EventGridEvent(
        id=str(uuid.uuid4()), topic=LOCAL_TOPIC, subject=f"experiments/x/runs/{job}", event_type=RUN_STATUS_CHANGED,
        event_time=datetime.now(UTC), data_version="2",
        data={"runId": job, "runStatus": "Completed", "runType": "azureml.PipelineRun"},
    )  # fmt: skip
