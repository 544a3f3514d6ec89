"""Job status events: Azure ML's `RunStatusChanged`/`RunCompleted` (the local trainer sends the
same shape), read defensively because key and status casing vary between real payloads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.ledger import Ledger

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
        run_type=str(_get(data, "runType") or ""),
        experiment=str(_get(data, "experimentName") or ""),
        tags=_get(data, "runTags") or {},
    )


def publish_job_status(
    endpoint: str, key: str, job_name: str, status: str, experiment: str, tags: Mapping[str, str]
) -> None:
    """Publish a job's status as Azure ML does (`RunStatusChanged` of a pipeline run), so the local
    trainer and Azure ML drive the same job-events function."""
    from azure.core.credentials import AzureKeyCredential
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    event = EventGridEvent(
        subject=f"experiments/{experiment}/runs/{job_name}",
        event_type=RUN_STATUS_CHANGED,
        data_version="2",
        data={
            "experimentId": experiment,
            "experimentName": experiment,
            "runId": job_name,
            "runType": PIPELINE_RUN_TYPE,
            "runTags": dict(tags),
            "runProperties": {},
            "runStatus": status,
        },
    )
    EventGridPublisherClient(endpoint, AzureKeyCredential(key)).send([event])


def handle_job_event(ledger: Ledger, data: Any, event_type: str, topic: str | None, subject: str | None) -> str:
    """Record a job status event against the run that submitted the job. Returns what was done."""
    status = parse_job_status(event_type, data)
    if status is None:
        log.debug("ignored %s event from %s (%s): not a job status event", event_type, topic, subject)
        return "ignored: not a job status event"
    run = ledger.by_job(status.job_name)
    if run is None:
        log.debug("ignored status %s of job %s: not submitted by this app", status.status, status.job_name)
        return f"ignored: job {status.job_name} was not submitted by this app"
    ledger.note(run.run_id, f"job {status.job_name} reported {status.status} ({status.run_type or 'no run type'})")
    return f"recorded {status.status} for run {run.run_id}"
