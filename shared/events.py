"""Job status events: Azure ML's `RunStatusChanged`/`RunCompleted` (the local trainer sends the
same shape), read defensively because key and status casing vary between real payloads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from shared import lifecycle
from shared.backends import Backend, BackendError, get_backend
from shared.deployment import drive_run
from shared.eventgrid import send_event
from shared.ledger import IllegalTransition, Ledger, Run, RunChanged, RunState
from shared.settings import Settings

log = logging.getLogger(__name__)

RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
JOB_EVENT_TYPES = (RUN_STATUS_CHANGED, RUN_COMPLETED)
PIPELINE_RUN_TYPE = "azureml.PipelineRun"
TERMINAL_STATUSES = ("Completed", "Failed", "Canceled")


@dataclass(frozen=True)
class JobStatus:
    job_name: str
    status: str  # as sent; compare with `is_status`
    run_type: str
    experiment: str = ""
    tags: Mapping[str, Any] = field(default_factory=dict)

    def is_status(self, name: str) -> bool:
        return self.status.lower() == name.lower()


def _get(data: Mapping[str, Any], key: str) -> Any:
    wanted = key.lower()
    return next((value for name, value in data.items() if name.lower() == wanted), None)


def parse_job_status(event_type: str, data: Mapping[str, Any]) -> JobStatus | None:
    """The job status an event reports, or None when it is not a job status event."""
    kind = next((known for known in JOB_EVENT_TYPES if known.lower() == (event_type or "").lower()), None)
    job_name = _get(data, "runId") if isinstance(data, Mapping) else None
    if kind is None or not job_name:
        return None
    status = "Completed" if kind == RUN_COMPLETED else str(_get(data, "runStatus") or "")
    return JobStatus(
        job_name=str(job_name),
        status=status,
        run_type=str(_get(data, "runType") or ""),  # null in RunCompleted's documented sample
        experiment=str(_get(data, "experimentName") or ""),
        tags=_get(data, "runTags") or {},
    )


def publish_job_status(
    endpoint: str, key: str, job_name: str, status: str, experiment: str, tags: Mapping[str, str]
) -> None:
    """Publish a job's status as Azure ML does (`RunStatusChanged` of a pipeline run), so the local
    trainer and Azure ML drive the same job-events function."""
    from azure.core.credentials import AzureKeyCredential

    data = {
        "experimentId": experiment,
        "experimentName": experiment,
        "runId": job_name,
        "runType": PIPELINE_RUN_TYPE,
        "runTags": dict(tags),
        "runProperties": {},
        "runStatus": status,
    }
    send_event(
        endpoint, AzureKeyCredential(key), f"experiments/{experiment}/runs/{job_name}", RUN_STATUS_CHANGED, "2", data
    )


def _ignored(reason: str, status: JobStatus | None, topic: str | None) -> str:
    log.debug("ignored job event from %s (%s): %s", topic, status, reason)
    return f"ignored: {reason}"


def handle_job_event(
    settings: Settings,
    ledger: Ledger,
    data: Any,
    event_type: str,
    topic: str | None,
    subject: str | None,
    backend: Backend | None = None,
) -> str:
    """Act on a job status event: a finished pipeline job this app submitted moves its run on
    (Completed: register, deploy, smoke test; Failed/Canceled: record why). Everything else,
    duplicates and late events included, changes nothing. Returns what was done, for the log."""
    status = parse_job_status(event_type, data)
    if status is None:
        return _ignored(f"{event_type} is not a job status event", None, topic)
    if (topic or "").lower() not in {accepted.lower() for accepted in settings.job_event_topics}:
        return _ignored(f"topic {topic!r} is not one of JOB_EVENTS_TOPICS", status, topic)
    # Steps report too (azureml.StepRun); only the pipeline counts. A missing or null run type is
    # let through (the documented RunCompleted sample has `"runType": null`): the job name below
    # must still be one this app submitted.
    if status.run_type and status.run_type.lower() != PIPELINE_RUN_TYPE.lower():
        return _ignored(f"run type {status.run_type!r} (steps report too; only the pipeline counts)", status, topic)
    if not any(status.is_status(terminal) for terminal in TERMINAL_STATUSES):
        return _ignored(f"status {status.status} is not final", status, topic)
    run = ledger.by_job(status.job_name)
    if run is None:
        return _ignored(f"job {status.job_name} was not submitted by this app", status, topic)
    run = finish_job(settings, ledger, run, status.status, _reason(data), backend)
    return f"run {run.run_id} is {run.state}"


def finish_job(
    settings: Settings, ledger: Ledger, run: Run, job_status: str, reason: str | None, backend: Backend | None = None
) -> Run:
    """Record that the run's job ended (from its event, or from the janitor's poll): Completed
    drives the run on to deployment; Failed and Canceled record why. Idempotent."""
    job = run.job_name or "?"
    if job_status.lower() == "completed":
        # A duplicate or a race finds the run already past this point, and drives it on from there.
        with suppress(IllegalTransition, RunChanged):
            ledger.advance(run, RunState.COMPLETED, f"job {job} completed")
        return drive_run(settings, ledger, run.run_id, backend)
    target = RunState.FAILED if job_status.lower() == "failed" else RunState.CANCELED
    reason = reason or _backend_reason(backend or get_backend(settings), job) or f"job {job} {job_status}"
    try:
        ended = ledger.advance(run, target, f"job {job} {job_status.lower()}", reason=reason)
    except (IllegalTransition, RunChanged):
        return ledger.get(run.run_id)
    lifecycle.publish(settings, lifecycle.JOB_FAILED, ended, stage="training", jobStatus=job_status)
    return ended


def _reason(data: Any) -> str | None:
    """A failure reason carried by the event itself, if any."""
    for key in ("error", "errorMessage", "failureReason"):
        value = _get(data, key) or _get(_get(data, "runProperties") or {}, key)
        if value:
            return str(value.get("message", value) if isinstance(value, dict) else value)
    return None


def _backend_reason(backend: Backend, job_name: str) -> str | None:
    try:
        return backend.job_status(job_name).reason
    except BackendError:
        return None
