"""Job status events: Azure ML's `RunStatusChanged`/`RunCompleted` (the local trainer sends the
same shape), read defensively because key and status casing vary between real payloads. Parsing
and the decision to ignore an event are pure functions; `handle_job_event` acts on the rest."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared import lifecycle
from shared.backends.interface import Backend, BackendError
from shared.backends.registry import get_backend, plugin
from shared.costs.spend import SPEND, training_spend
from shared.deployment import drive_run
from shared.ledger import IllegalTransition, Ledger, Run, RunChanged, RunState
from shared.settings import Settings
from shared.vocabulary import JOB_EVENT_TYPES, RUN_COMPLETED, JobStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    """What a job status event says."""

    job_name: str
    status: JobStatus | None  # None: a status this app does not know (as sent: `status_text`)
    status_text: str
    run_type: str
    experiment: str = ""
    tags: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None  # a failure reason the event itself carries


def _get(data: Mapping[str, Any], key: str) -> Any:
    wanted = key.lower()
    return next((value for name, value in data.items() if name.lower() == wanted), None)


def parse_job_event(event_type: str, data: Any) -> JobEvent | None:
    """The job status an event reports, or None when it is not a job status event."""
    kind = next((known for known in JOB_EVENT_TYPES if known.lower() == (event_type or "").lower()), None)
    job_name = _get(data, "runId") if isinstance(data, Mapping) else None
    if kind is None or not job_name:
        return None
    text = JobStatus.COMPLETED.value if kind == RUN_COMPLETED else str(_get(data, "runStatus") or "")
    return JobEvent(
        job_name=str(job_name),
        status=JobStatus.parse(text),
        status_text=text,
        run_type=str(_get(data, "runType") or ""),  # null in RunCompleted's documented sample
        experiment=str(_get(data, "experimentName") or ""),
        tags=_get(data, "runTags") or {},
        reason=_reason(data),
    )


def ignore_reason(
    event: JobEvent, topic: str | None, accepted_topics: tuple[str, ...], run_types: tuple[str, ...]
) -> str | None:
    """Why an event changes nothing, before any run is looked up; None when it may. `run_types`:
    the backend's (empty: any)."""
    if (topic or "").lower() not in {accepted.lower() for accepted in accepted_topics}:
        return f"topic {topic!r} is not one of JOB_EVENTS_TOPICS"
    # A pipeline's steps report too (azureml.StepRun); only the pipeline counts. A missing or null
    # run type is let through (the documented RunCompleted sample has `"runType": null`): the job
    # name must still be one this app submitted.
    if event.run_type and run_types and event.run_type.lower() not in {kind.lower() for kind in run_types}:
        return f"run type {event.run_type!r} (only {', '.join(run_types)} finishes a job)"
    if event.status is None or not event.status.is_terminal:
        return f"status {event.status_text} is not final"
    return None


def _ignored(reason: str, event: JobEvent | None, topic: str | None) -> str:
    log.debug("ignored job event from %s (%s): %s", topic, event, reason)
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
    (Completed: register, deploy, evaluate, route traffic; Failed/Canceled: record why). Everything else,
    duplicates and late events included, changes nothing. Returns what was done, for the log."""
    event = parse_job_event(event_type, data)
    if event is None:
        return _ignored(f"{event_type} is not a job status event", None, topic)
    reason = ignore_reason(event, topic, settings.job_event_topics, plugin(settings.ml_backend).job_run_types)
    if reason is not None:
        return _ignored(reason, event, topic)
    # The run type is logged: for the fine-tuning job no source documents it.
    log.info("job event %s for job %s, runType %r", event.status_text, event.job_name, event.run_type or None)
    run = ledger.by_job(event.job_name)
    if run is None:
        return _ignored(f"job {event.job_name} was not submitted by this app", event, topic)
    assert event.status is not None  # ignore_reason lets only final statuses through
    run = finish_job(settings, ledger, run, event.status, event.reason, backend)
    return f"run {run.run_id} is {run.state}"


def finish_job(
    settings: Settings,
    ledger: Ledger,
    run: Run,
    job_status: JobStatus,
    reason: str | None,
    backend: Backend | None = None,
) -> Run:
    """Record that the run's job ended (from its event, or from the janitor's poll): Completed
    drives the run on to deployment; Failed and Canceled record why. Idempotent."""
    job = run.job_name or "?"
    if job_status == JobStatus.COMPLETED:
        # A duplicate or a race finds the run already past this point, and drives it on from there.
        with suppress(IllegalTransition, RunChanged):
            spent = training_spend(run, datetime.now(UTC))
            ledger.advance(run, RunState.COMPLETED, f"job {job} completed", details=spent)
        return drive_run(settings, ledger, run.run_id, backend)
    target = RunState.FAILED if job_status == JobStatus.FAILED else RunState.CANCELED
    reason = reason or _backend_reason(backend or get_backend(settings), job) or f"job {job} {job_status}"
    try:
        spent = training_spend(run, datetime.now(UTC))
        told = lifecycle.tell(settings, lifecycle.JOB_FAILED, stage="training", jobStatus=str(job_status),
                              spend={**run.details, **(spent or {})}.get(SPEND))  # fmt: skip
        ended = ledger.advance(run, target, f"job {job} {job_status.lower()}", reason=reason, details=spent,
                               tell=told)  # fmt: skip
    except (IllegalTransition, RunChanged):
        return ledger.get(run.run_id)
    lifecycle.publish(settings, ledger, run.run_id)
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
