"""The app's words, in one place: job statuses and events, the tags on what it creates, the names
of its containers, table and prepared files. Importing a name imports nothing else."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A fine-tune job's status, in Azure ML's words (the local trainer uses them too)."""

    NOT_STARTED = "NotStarted"
    QUEUED = "Queued"
    PREPARING = "Preparing"
    PROVISIONING = "Provisioning"
    STARTING = "Starting"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    CANCEL_REQUESTED = "CancelRequested"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"
    PAUSED = "Paused"
    NOT_RESPONDING = "NotResponding"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)

    @classmethod
    def parse(cls, text: str) -> JobStatus | None:
        """A status as sent, whatever its casing ("failed" in Azure ML's own event sample)."""
        return next((status for status in cls if status.value.lower() == text.strip().lower()), None)


# Azure ML's job events (the local trainer sends the same). Only the pipeline run counts: its steps
# (azureml.StepRun) report too.
RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
JOB_EVENT_TYPES = (RUN_STATUS_CHANGED, RUN_COMPLETED)
PIPELINE_RUN_TYPE = "azureml.PipelineRun"

# Tags on everything the app creates (jobs, models, endpoints): who manages it, what must never be
# deleted, and lineage.
# The request header that reaches one deployment of an endpoint whatever its traffic split.
DEPLOYMENT_HEADER = "azureml-model-deployment"

MANAGED_BY_TAG = "managed-by"
MANAGED_BY = "finetune-on-upload"
KEEP_TAG = "keep"
RUN_ID_TAG = "run_id"
JOB_TAG = "job"
DATASET_TAG = "dataset"
DATASET_SHA256_TAG = "dataset_sha256"
BASE_MODEL_TAG = "base_model"  # name:version
BASE_MODEL_ID_TAG = "base_model_id"  # its registry's id, unversioned: azureml://registries/<r>/models/<name>

# Storage: uploads, prepared files per run, the run ledger.
DATASETS_CONTAINER = "datasets"
PREPARED_CONTAINER = "prepared"
RUNS_TABLE = "runs"
TRAIN_FILE = "train_sft.jsonl"
TEST_FILE = "test_sft.jsonl"
REPORT_FILE = "report.json"
REJECTED_FILE = "rejected_rows.jsonl"
