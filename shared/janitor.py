"""The janitor: on a timer, moves on deployments still provisioning or rolling out, deletes
deployments replaced longer ago than the rollback window, and tears down managed endpoints nobody
has used for a while, so nothing keeps billing.

An endpoint is deleted when this app manages it (tag `managed-by`), it is not tagged `keep`, it
is older than ENDPOINT_MIN_AGE_MINUTES and has had no request for ENDPOINT_IDLE_MINUTES; a
replaced deployment, ROLLBACK_WINDOW_HOURS after it was replaced, unless its endpoint is tagged
`keep`. Their runs move to `torn_down` first (conditional transitions), so of two overlapping
sweeps only one deletes each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared import lifecycle
from shared.backends.interface import Backend, BackendError, Endpoint
from shared.backends.registry import get_backend
from shared.costs.spend import SPEND, hosting_spend
from shared.deployment import CHANGING_STATES, DRIVEN_STATES, HOSTED_STATES, drive_run
from shared.events import finish_job
from shared.ledger import IllegalTransition, Ledger, Run, RunChanged, RunState, Tell
from shared.settings import JanitorSettings, Settings
from shared.vocabulary import KEEP_TAG, MANAGED_BY, MANAGED_BY_TAG

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


def _kept(tags: dict[str, str]) -> bool:
    return KEEP_TAG in tags and tags[KEEP_TAG].lower() != "false"


def judge(endpoint: Endpoint, rules: JanitorSettings, now: datetime) -> Verdict:
    """Whether an endpoint goes, with the evidence either way."""
    name = endpoint.name
    if endpoint.tags.get(MANAGED_BY_TAG) != MANAGED_BY:
        return Verdict(name, False, "not managed by this app")
    if _kept(endpoint.tags):
        return Verdict(name, False, "tagged keep")
    created = _time(endpoint.created_at)
    if created is None or now - created < timedelta(minutes=rules.min_age_minutes):
        return Verdict(
            name, False, f"created {endpoint.created_at or 'just now'}, younger than {rules.min_age_minutes:g} min"
        )
    if not endpoint.usage_observed:
        unknown = "its requests cannot be observed (no request metric)"
        limit = rules.unobserved_max_hours
        served = (now - created).total_seconds() / 3600
        if limit and served >= limit:
            return Verdict(name, True, f"{unknown}; its newest version is {served:.1f} h old, the limit for such "
                                       f"endpoints is {limit:g} h (ENDPOINT_UNOBSERVED_MAX_HOURS)")  # fmt: skip
        return Verdict(
            name, False, f"{unknown}: idleness is unknown" + (f" ({served:.1f} h of {limit:g})" if limit else "")
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


def _claimed_since(runs: list[Run], created: datetime | None) -> bool:
    """Whether a run of this endpoint was torn down since the endpoint was made: then a sweep has
    claimed this endpoint (an endpoint made again later, for a new upload, is a new one)."""
    return any(created is None or run.state_times[RunState.TORN_DOWN] >= created
               for run in runs if run.state == RunState.TORN_DOWN)  # fmt: skip


def _tear_down(ledger: Ledger, runs: list[Run], message: str, now: datetime,
               tell: Tell | None = None) -> list[Run] | None:  # fmt: skip
    """Record the runs torn down, the one serving first (with its hosting spend, and `tell` to
    tell of each): None when a concurrent sweep moved it first, and so deletes what they had."""
    done = []
    for run in sorted(runs, key=lambda run: run.state != RunState.DEPLOYED):
        spend = hosting_spend(run, now) if run.state == RunState.DEPLOYED else None
        try:
            done.append(ledger.advance(run, RunState.TORN_DOWN, message, details=spend, tell=tell))
        except (RunChanged, IllegalTransition):
            if not done:
                return None
    return done


def _delete_replaced(settings: Settings, ledger: Ledger, backend: Backend, endpoints: list[Endpoint], now: datetime,
                     would_delete: list[str], errors: list[str]) -> list[str]:  # fmt: skip
    """Delete the deployments replaced (or rolled back) longer ago than the rollback window, on
    endpoints the listing shows (its tags say `keep` or not) and only while they take no traffic.
    Deleted first, recorded second: a deletion that fails is tried again at the next tick."""
    window = timedelta(hours=settings.rollout.rollback_window_hours)
    listed = {endpoint.name: endpoint for endpoint in endpoints}
    deleted = []
    for state in (RunState.SUPERSEDED, RunState.ROLLED_BACK):
        for run in ledger.by_state(state):
            endpoint, deployment = run.endpoint_name or "", run.deployment_name or ""
            found = listed.get(endpoint)
            if now - run.state_times[state] < window or found is None or _kept(found.tags):
                continue
            if found.traffic.get(deployment, 0) > 0:
                log.warning("run %s is %s but deployment %s of %s takes traffic: kept", run.run_id, state,
                            deployment, endpoint)  # fmt: skip
                continue
            message = f"deployment {deployment} of endpoint {endpoint} deleted: {state} more than {window} ago"
            if settings.janitor.dry_run:
                would_delete.append(message)
                continue
            try:
                backend.delete_deployment(endpoint, deployment)  # idempotent: a second sweep finds it gone
            except BackendError as error:
                log.warning("janitor could not delete deployment %s of %s: %s", deployment, endpoint, error)
                errors.append(str(error))
                continue
            told = lifecycle.tell(settings, lifecycle.DEPLOYMENT_DELETED, endpoint=endpoint, deployment=deployment)
            if _tear_down(ledger, [run], message, now, told) is None:  # deleted first: told with its record
                continue  # recorded by a concurrent sweep
            deleted.append(f"{endpoint}/{deployment}")
            lifecycle.publish(settings, ledger, run.run_id)
    return deleted


def sweep(settings: Settings, ledger: Ledger, past_due: bool, now: datetime | None = None,
          backend: Backend | None = None) -> dict[str, Any]:  # fmt: skip
    """One janitor pass; returns what it did, for the log."""
    if past_due:
        log.info("janitor tick is past due; one sweep now covers the missed ones")
    backend = backend or get_backend(settings)
    # What a handler recorded to tell and did not get to send (it died, the topic was down) goes
    # now: every lifecycle event is sent at least once.
    lifecycle.publish(settings, ledger)
    finished = _poll_jobs(settings, ledger, backend)
    # Runs whose job completed but whose deployment has not finished (still provisioning, or a
    # step that hit a transient error) are driven on from where they are.
    advanced = {run.run_id: str(drive_run(settings, ledger, run.run_id, backend).state)
                for state in DRIVEN_STATES for run in ledger.by_state(state)}  # fmt: skip
    now = now or datetime.now(UTC)
    deleted: list[str] = []
    would_delete: list[str] = []
    kept: dict[str, str] = {}
    errors: list[str] = []
    try:
        endpoints = backend.list_endpoints()
    except BackendError as error:  # no idle evidence, no deletion: the next tick tries again
        log.warning("janitor could not list endpoints: %s", error)
        endpoints, errors = [], [str(error)]
    # Without a listing there is no telling which endpoints are kept: nothing replaced goes either.
    deployments_deleted = [] if errors else _delete_replaced(settings, ledger, backend, endpoints, now, would_delete,
                                                             errors)  # fmt: skip
    for endpoint in endpoints:
        verdict = judge(endpoint, settings.janitor, now)
        if not verdict.delete:
            kept[verdict.endpoint] = verdict.evidence
            continue
        if settings.janitor.dry_run:
            would_delete.append(f"{verdict.endpoint}: {verdict.evidence}")
            continue
        runs = ledger.by_endpoint(endpoint.name)
        if any(run.state in CHANGING_STATES for run in runs):
            kept[verdict.endpoint] = "a deployment is being made or rolled out"
            continue
        hosted = [run for run in runs if run.state in HOSTED_STATES]
        torn_down = _tear_down(ledger, hosted, f"endpoint {endpoint.name} deleted: {verdict.evidence}", now)
        if torn_down is None or (not hosted and _claimed_since(runs, _time(endpoint.created_at))):
            continue  # another sweep claimed it first and deletes it
        try:
            gone = backend.delete_endpoint(endpoint.name)
        except BackendError as error:
            log.warning("janitor could not delete endpoint %s: %s", endpoint.name, error)
            errors.append(str(error))
            continue
        if gone:
            deleted.append(verdict.endpoint)
            for run in torn_down:  # told once it is gone (its runs were recorded torn down before)
                told = lifecycle.tell(settings, lifecycle.ENDPOINT_DELETED, endpoint=endpoint.name,
                                      evidence=verdict.evidence, spend=run.details.get(SPEND))  # fmt: skip
                ledger.note(run.run_id, f"endpoint {endpoint.name} is gone", tell=told)
                lifecycle.publish(settings, ledger, run.run_id)
    return {
        "backend": settings.ml_backend,
        "past_due": past_due,
        "jobs_finished": finished,
        "advanced": advanced,
        "deleted": deleted,
        "deployments_deleted": deployments_deleted,
        "would_delete": would_delete,
        "kept": kept,
        "errors": errors,
    }
