"""The janitor: on a timer, moves on deployments still provisioning, and tears down managed
endpoints nobody has used for a while, so nothing keeps billing.

An endpoint is deleted when this app manages it (tag `managed-by`), it is not tagged `keep`, it
is older than ENDPOINT_MIN_AGE_MINUTES and has had no request for ENDPOINT_IDLE_MINUTES. Its run
moves to `torn_down` first (a conditional transition), so of two overlapping sweeps only one
deletes it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared import lifecycle
from shared.backends.interface import Backend, BackendError, Endpoint
from shared.backends.registry import get_backend
from shared.costs.spend import SPEND, hosting_spend
from shared.deployment import DRIVEN_STATES, drive_run
from shared.events import finish_job
from shared.ledger import IllegalTransition, Ledger, RunChanged, RunState
from shared.settings import JanitorSettings, Settings
from shared.vocabulary import KEEP_TAG, MANAGED_BY, MANAGED_BY_TAG, RUN_ID_TAG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    endpoint: str
    delete: bool
    evidence: str


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def judge(endpoint: Endpoint, rules: JanitorSettings, now: datetime) -> Verdict:
    """Whether an endpoint goes, with the evidence either way."""
    name = endpoint.name
    if endpoint.tags.get(MANAGED_BY_TAG) != MANAGED_BY:
        return Verdict(name, False, "not managed by this app")
    if KEEP_TAG in endpoint.tags and endpoint.tags[KEEP_TAG].lower() != "false":
        return Verdict(name, False, "tagged keep")
    created = _time(endpoint.created_at)
    if created is None or now - created < timedelta(minutes=rules.min_age_minutes):
        return Verdict(
            name, False, f"created {endpoint.created_at or 'just now'}, younger than {rules.min_age_minutes:g} min"
        )
    last = _time(endpoint.last_request_at) or created
    idle = now - last
    seen = f"last request {endpoint.last_request_at}" if endpoint.last_request_at else "no request since creation"
    if idle < timedelta(minutes=rules.idle_minutes):
        return Verdict(name, False, f"{seen}, {idle.total_seconds() / 60:.1f} min ago")
    return Verdict(name, True, f"{seen} ({idle.total_seconds() / 60:.1f} min idle, window {rules.idle_minutes:g} min)")


def _poll_jobs(settings: Settings, ledger: Ledger, backend: Backend) -> dict[str, str]:
    """A safety net under the job events: a job that ended without its event being handled (a
    lost event, a killed local trainer) is found here and its run moved on."""
    finished = {}
    for run in [*ledger.by_state(RunState.SUBMITTED), *ledger.by_state(RunState.RUNNING)]:
        try:
            status = backend.job_status(run.job_name or "")
        except BackendError as error:
            log.warning("could not read job %s of run %s: %s", run.job_name, run.run_id, error)
            continue
        if status.status.is_terminal:
            finished[run.run_id] = str(finish_job(settings, ledger, run, status.status, status.reason, backend).state)
    return finished


def sweep(settings: Settings, ledger: Ledger, past_due: bool, now: datetime | None = None) -> dict[str, Any]:
    """One janitor pass; returns what it did, for the log."""
    if past_due:
        log.info("janitor tick is past due; one sweep now covers the missed ones")
    backend = get_backend(settings)
    finished = _poll_jobs(settings, ledger, backend)
    # Runs whose job completed but whose deployment has not finished (still provisioning, or a
    # step that hit a transient error) are driven on from where they are.
    advanced = {run.run_id: str(drive_run(settings, ledger, run.run_id, backend).state)
                for state in DRIVEN_STATES for run in ledger.by_state(state)}  # fmt: skip
    now = now or datetime.now(UTC)
    deleted, would_delete, kept, errors = [], [], {}, []
    try:
        endpoints = backend.list_endpoints()
    except BackendError as error:  # no idle evidence, no deletion: the next tick tries again
        log.warning("janitor could not list endpoints: %s", error)
        endpoints, errors = [], [str(error)]
    for endpoint in endpoints:
        verdict = judge(endpoint, settings.janitor, now)
        if not verdict.delete:
            kept[verdict.endpoint] = verdict.evidence
            continue
        if settings.janitor.dry_run:
            would_delete.append(f"{verdict.endpoint}: {verdict.evidence}")
            continue
        run = ledger.find(endpoint.tags.get(RUN_ID_TAG, ""))
        if run is not None:
            if run.state == RunState.DEPLOYING:
                kept[verdict.endpoint] = "still deploying"
                continue
            try:
                run = ledger.advance(run, RunState.TORN_DOWN, f"endpoint {endpoint.name} deleted: {verdict.evidence}",
                                     details=hosting_spend(run, now))  # fmt: skip
            except (RunChanged, IllegalTransition):
                continue  # another sweep claimed it first and deletes it
        try:
            gone = backend.delete_endpoint(endpoint.name)
        except BackendError as error:
            log.warning("janitor could not delete endpoint %s: %s", endpoint.name, error)
            errors.append(str(error))
            continue
        if gone:
            deleted.append(verdict.endpoint)
            if run is not None:
                lifecycle.publish(settings, lifecycle.ENDPOINT_DELETED, run, endpoint=endpoint.name,
                                  evidence=verdict.evidence, spend=run.details.get(SPEND))  # fmt: skip
    return {
        "backend": settings.ml_backend,
        "past_due": past_due,
        "jobs_finished": finished,
        "advanced": advanced,
        "deleted": deleted,
        "would_delete": would_delete,
        "kept": kept,
        "errors": errors,
    }
