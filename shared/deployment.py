"""From a completed job to the model an endpoint serves: register, deploy beside what serves now,
evaluate, roll out, and roll back on request.

Each dataset has one endpoint (named by the upload's `endpoint` metadata, or after the dataset):
its URL and keys stay while model versions come and go as its deployments. A new version is
deployed at 0% traffic, judged by the evaluation gate (`shared.promotion`) against the live one,
then takes ROLLOUT_SHARE_PERCENT of the traffic for ROLLOUT_STEP_MINUTES, then all of it; the
version it replaces stays at 0% for ROLLBACK_WINDOW_HOURS (see `rollback`), after which the
janitor deletes it. A refused or failed version is deleted and leaves the live one untouched.

Every step is idempotent on the backend (the same job gives the same model version, the same run
the same deployment) and recorded by a conditional ledger transition; one handler drives a run at
a time (a claim on the run) and one run changes an endpoint's traffic at a time (a hold on the
endpoint, from its evaluation to the end of its rollout), so duplicate events and janitor ticks
can drive the same runs concurrently."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from shared import lifecycle, promotion
from shared.backends.interface import Backend, BackendError, DeployState, TransientBackendError
from shared.backends.registry import get_backend
from shared.ledger import IllegalTransition, Ledger, Run, RunChanged, RunState
from shared.promotion import model_of
from shared.settings import Settings
from shared.vocabulary import MANAGED_BY, MANAGED_BY_TAG, RUN_ID_TAG

log = logging.getLogger(__name__)
S = RunState
DRIVEN_STATES = (S.COMPLETED, S.REGISTERED, S.DEPLOYING, S.ROLLING_OUT)
# Runs whose deployment exists on their endpoint (serving, or kept at 0% for a rollback).
HOSTED_STATES = (S.ROLLING_OUT, S.DEPLOYED, S.SUPERSEDED, S.ROLLED_BACK)
# Runs changing their endpoint: being made and judged, or rolling out.
CHANGING_STATES = (S.DEPLOYING, S.ROLLING_OUT)
GIVE_UP_AFTER = timedelta(hours=24)  # a step that keeps hitting transient errors fails after this
# Longer than the longest step (locally: the model loading, then the gate's losses and held-out
# requests); a driver that dies leaves a claim that lapses after this.
CLAIM_TTL = timedelta(minutes=15)
METRICS_SUMMARY = ("train_loss", "eval_loss", "perplexity", "tokens_per_second", "steps")


class RollbackError(ValueError):
    """A rollback that cannot be done; the message says why."""


class UnknownEndpoint(RollbackError):
    """An endpoint this app never deployed to."""


def endpoint_name_for(settings: Settings, run: Run) -> str:
    """The endpoint the upload names, else one per dataset: the blob's name (without extensions)
    and a digest of it and of this app's storage account, as endpoint names are unique per Azure
    region, not per workspace. Every upload of `datasets/support-bot.jsonl` shares one."""
    chosen = (run.details.get("report") or {}).get("endpoint")
    if chosen:
        return str(chosen)
    folder, _, file = run.upload.blob_name.rpartition("/")
    dataset = f"{run.upload.container}/{folder}/{file.split('.', 1)[0]}"
    digest = hashlib.sha256(f"{settings.storage.account}|{dataset}".encode()).hexdigest()[:8]
    slug = re.sub(r"-+", "-", run.run_id.rsplit("-", 1)[0][:20]).strip("-")
    return f"ft-{slug}-{digest}" if slug else f"ft-{digest}"


def deployment_name_for(run: Run) -> str:
    """One deployment per run, named after it (the run id's digest)."""
    return f"run-{run.run_id.rsplit('-', 1)[-1]}"


def _tags(run: Run) -> dict[str, str]:
    return {MANAGED_BY_TAG: MANAGED_BY, RUN_ID_TAG: run.run_id}


def _step(settings: Settings, ledger: Ledger, backend: Backend, run: Run) -> bool:
    """Take the run one step on; False when there is nothing more to do now."""
    if run.state == S.COMPLETED:
        model = backend.register(run.job_name or "")
        try:
            metrics = backend.job_metrics(run.job_name or "")
        except BackendError as error:  # the model is there; only the evaluation gate misses the loss
            metrics, unread = {}, {"metrics_unavailable": str(error)}
        else:
            unread = {}
        summary = {key: metrics.get(key) for key in METRICS_SUMMARY}
        details = {"metrics": summary, "loss_curve": metrics.get("loss_curve")} if metrics else unread or None
        ledger.advance(run, S.REGISTERED, f"registered model {model.name}:{model.version}",
                       model_name=model.name, model_version=model.version, details=details)  # fmt: skip
        return True
    model = model_of(run)
    if run.state == S.REGISTERED:
        # Recorded before it is made: the janitor never takes an endpoint a deployment is coming to.
        endpoint, deployment = endpoint_name_for(settings, run), deployment_name_for(run)
        _check_ours(backend, endpoint)
        message = f"deploying {model.name}:{model.version} as deployment {deployment} of endpoint {endpoint}, at 0%"
        run = ledger.advance(run, S.DEPLOYING, message, endpoint_name=endpoint, deployment_name=deployment)
        backend.deploy(model, endpoint, deployment, _tags(run))
        return True
    endpoint, deployment = run.endpoint_name or "", run.deployment_name or ""
    if run.state == S.DEPLOYING:
        progress = backend.continue_deployment(model, endpoint, deployment, _tags(run))
        if progress.state == DeployState.DEPLOYING:
            return False  # Azure is still at it; the janitor's timer comes back
        if progress.state == DeployState.FAILED:
            _fail(settings, ledger, backend, run, "deployment failed", progress.message or "no message")
            return False
        holder = ledger.hold_endpoint(endpoint, run.run_id, lambda other: _rollout_ended(ledger, other))
        if holder:
            log.info("run %s waits: run %s is changing endpoint %s", run.run_id, holder, endpoint)
            return False  # the janitor's timer comes back
        return _judge(settings, ledger, backend, run)
    if run.state == S.ROLLING_OUT:
        # The split was recorded before it was set: (re)set it, so a step cut short is made good.
        rollout = run.details.get("rollout") or {}
        if datetime.now(UTC) >= datetime.fromisoformat(rollout["until"]):
            _promote(settings, ledger, backend, run, ledger.find(rollout.get("live_run") or ""))
            return False
        serving = {name: share for name, share in backend.endpoint(endpoint).traffic.items() if share}
        if serving != {name: share for name, share in rollout["split"].items() if share}:
            backend.set_traffic(endpoint, rollout["split"])
        return False
    return False


def _check_ours(backend: Backend, endpoint: str) -> None:
    """An endpoint this app did not make is never deployed to (nor, on failure, deleted)."""
    try:
        found = backend.endpoint(endpoint)
    except BackendError:
        return  # not there yet: this run makes it
    if found.tags.get(MANAGED_BY_TAG) != MANAGED_BY:
        tag = f"{MANAGED_BY_TAG}={MANAGED_BY}"
        raise BackendError(f"endpoint {endpoint} exists and is not managed by this app (no tag {tag}): "
                           "name another in the upload's 'endpoint' metadata")  # fmt: skip


def _rollout_ended(ledger: Ledger, holder: str) -> bool:
    run = ledger.find(holder)
    return run is None or run.state not in CHANGING_STATES


def live_run(runs: list[Run], other_than: str = "") -> Run | None:
    """Of an endpoint's runs, the one whose deployment serves it now, as the ledger has it."""
    return next((r for r in runs if r.state == S.DEPLOYED and r.run_id != other_than), None)


def _judge(settings: Settings, ledger: Ledger, backend: Backend, run: Run) -> bool:
    """The evaluation gate, then the first traffic: all of it when nothing else serves (or no
    share is set), else the configured share beside the live deployment."""
    endpoint, deployment = run.endpoint_name or "", run.deployment_name or ""
    live = live_run(ledger.by_endpoint(endpoint), other_than=run.run_id)
    verdict = promotion.evaluate(settings, backend, run, live)
    gate = {"gate": {"passed": verdict.passed, "reason": verdict.reason, **verdict.numbers}}
    if not verdict.passed:
        serving = f"{live.deployment_name} still serves" if live else "nothing was serving"
        told = lifecycle.tell(settings, lifecycle.MODEL_REFUSED, endpoint=endpoint, deployment=deployment,
                              gate=gate["gate"], serving=serving)  # fmt: skip
        refused = ledger.advance(run, S.REFUSED, "refused by the evaluation gate", reason=verdict.reason, details=gate,
                                 tell=told)  # fmt: skip
        removed = _remove_deployment(ledger, backend, refused)
        if removed:
            ledger.note(run.run_id, removed)
        ledger.free_endpoint(endpoint, run.run_id)
        lifecycle.publish(settings, ledger, run.run_id)
        return False
    share, minutes = settings.rollout.share_percent, settings.rollout.step_minutes
    now = datetime.now(UTC)
    if live is None or not share or not minutes or not backend.splits_traffic:
        split, until = {deployment: 100}, now
        why = "" if live else " (nothing else serves there)"
        if live and not backend.splits_traffic:
            why = " (the endpoint serves one deployment at a time)"
        plan = f"all the traffic at once{why}"
    else:
        split, until = {deployment: share, live.deployment_name or "": 100 - share}, now + timedelta(minutes=minutes)
        plan = f"{share}% of the traffic until {until:%Y-%m-%d %H:%M} UTC, {100 - share}% on {live.deployment_name}"
    rollout = {"split": split, "live_run": live.run_id if live else None,
               "live_deployment": live.deployment_name if live else None, "until": until.isoformat()}  # fmt: skip
    # The plan is recorded before any traffic moves; the rolling_out step carries it out.
    ledger.advance(run, S.ROLLING_OUT, f"{verdict.reason}; {plan}", details={**gate, "rollout": rollout})
    return True


def _promote(settings: Settings, ledger: Ledger, backend: Backend, run: Run, previous: Run | None) -> Run:
    """All the traffic to `run`'s deployment; the one it replaces is kept at 0% for a rollback."""
    endpoint, deployment = run.endpoint_name or "", run.deployment_name or ""
    backend.set_traffic(endpoint, {deployment: 100})
    url = backend.endpoint(endpoint).scoring_uri or ""  # read after: a serverless endpoint's is its deployment's
    window = settings.rollout.rollback_window_hours
    if previous is not None and previous.state == S.DEPLOYED:
        ledger.advance(previous, S.SUPERSEDED, f"replaced by {deployment} ({run.model_name}:{run.model_version}); "
                       f"kept at 0% traffic for a rollback for {window:g} h")  # fmt: skip
    replaced = f", in place of {previous.deployment_name}" if previous else ""
    told = lifecycle.tell(settings, lifecycle.MODEL_DEPLOYED, endpoint=endpoint, deployment=deployment, scoringUri=url,
                          model=f"{run.model_name}:{run.model_version}",
                          replaced=previous.deployment_name if previous else None)  # fmt: skip
    deployed = ledger.advance(run, S.DEPLOYED, f"serving all the traffic of endpoint {endpoint}{replaced}",
                              endpoint_url=url, tell=told)  # fmt: skip
    ledger.free_endpoint(endpoint, run.run_id)
    lifecycle.publish(settings, ledger, run.run_id)
    return deployed


def rollback(settings: Settings, ledger: Ledger, endpoint: str, backend: Backend | None = None) -> Run:
    """Route `endpoint`'s traffic back to the deployment it served before, while that is kept:
    during a rollout, to the one being replaced; otherwise to the most recently replaced one (so a
    second rollback goes one version further back). Returns the run now serving. Refused, changing
    nothing, while a new version is being evaluated there or a handler is moving the serving run."""
    backend = backend or get_backend(settings)
    runs = ledger.by_endpoint(endpoint)
    if not runs:
        raise UnknownEndpoint(f"endpoint {endpoint!r}: no model was ever deployed to it by this app")
    current = next((r for r in runs if r.state == S.ROLLING_OUT), None) or live_run(runs)
    if current is None:
        raise RollbackError(f"endpoint {endpoint!r}: nothing serves there now")
    if current.state == S.ROLLING_OUT:
        replaced_id = (current.details.get("rollout") or {}).get("live_run")
        target = next((r for r in runs if r.run_id == replaced_id), None)  # a run of the same endpoint
    else:
        replaced = [r for r in runs if r.state == S.SUPERSEDED]
        target = max(replaced, key=lambda r: r.state_times[S.SUPERSEDED], default=None)
    window = settings.rollout.rollback_window_hours
    if target is None or not target.deployment_name:
        raise RollbackError(f"endpoint {endpoint!r}: no earlier deployment is kept to roll back to "
                            f"(replaced ones are kept for {window:g} h)")  # fmt: skip
    # The same two locks the flow takes: the endpoint (no evaluation under way), then the run.
    holder = ledger.hold_endpoint(endpoint, current.run_id, lambda other: _rollout_ended(ledger, other))
    claimed = None if holder else ledger.claim(current, f"rollback-{uuid.uuid4().hex}", CLAIM_TTL)
    if claimed is None:
        busy = f"run {holder} is being evaluated for it" if holder else f"run {current.run_id} is being changed"
        raise RollbackError(f"endpoint {endpoint!r}: {busy}; roll back once that is done")
    try:
        backend.set_traffic(endpoint, {target.deployment_name: 100})
        told = lifecycle.tell(settings, lifecycle.MODEL_ROLLED_BACK, endpoint=endpoint,
                              deployment=current.deployment_name, serving=target.deployment_name,
                              scoringUri=_scoring_uri(backend, endpoint))  # fmt: skip
        ledger.advance(claimed, S.ROLLED_BACK, f"rolled back: {target.deployment_name} serves again; "
                       f"kept at 0% traffic for {window:g} h", tell=told)  # fmt: skip
        again = f"serving all the traffic again: {current.deployment_name} was rolled back"
        target = (
            ledger.advance(target, S.DEPLOYED, again)
            if target.state == S.SUPERSEDED
            else ledger.note(target.run_id, again)
        )
    finally:
        ledger.release(current.run_id, claimed.driver or "")
        ledger.free_endpoint(endpoint, current.run_id)
    lifecycle.publish(settings, ledger, current.run_id)
    return target


def _scoring_uri(backend: Backend, endpoint: str) -> str | None:
    """Where the endpoint serves now (a serverless endpoint's URL is its deployment's: a rollback
    changes it); None when it cannot be read: the event goes without it rather than not at all."""
    try:
        return backend.endpoint(endpoint).scoring_uri
    except BackendError:
        return None


def _fail(settings: Settings, ledger: Ledger, backend: Backend, run: Run, message: str, reason: str,
          details: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Record the failure first, then delete what the run deployed so nothing bills: a handler
    that lost the race (the ledger moved past the state it read) records nothing and removes nothing."""
    failed = ledger.advance(run, S.DEPLOY_FAILED, message, reason=reason, details=details,
                            tell=lifecycle.tell(settings, lifecycle.JOB_FAILED, stage="deployment"))  # fmt: skip
    removed = _remove_deployment(ledger, backend, failed)
    if removed:
        ledger.note(run.run_id, removed)
    if run.endpoint_name:
        ledger.free_endpoint(run.endpoint_name, run.run_id)
    lifecycle.publish(settings, ledger, run.run_id)


def drive_run(settings: Settings, ledger: Ledger, run_id: str, backend: Backend | None = None) -> Run:
    """Move a completed run as far towards `deployed` as it can go now. One handler drives a run
    at a time (a claim in the ledger, renewed at each step, lapsing if its holder dies): a
    duplicate event or a janitor tick that finds the run claimed returns at once, with no side
    effects."""
    backend = backend or get_backend(settings)
    holder = uuid.uuid4().hex
    try:
        for _ in range(50):  # bounded: each pass either moves the run, loses a race, or stops
            run = ledger.get(run_id)
            if run.state not in DRIVEN_STATES:
                return run
            try:
                claimed = ledger.claim(run, holder, CLAIM_TTL)
            except RunChanged:
                continue
            if claimed is None:
                log.info("run %s is being driven by another handler until %s", run_id, run.driver_until)
                return run
            if not _drive_one_step(settings, ledger, backend, claimed):
                return ledger.get(run_id)
    finally:
        ledger.release(run_id, holder)
    return ledger.get(run_id)


def _drive_one_step(settings: Settings, ledger: Ledger, backend: Backend, run: Run) -> bool:
    """One step under the run's claim; False when there is nothing more to do now."""
    try:
        try:
            return _step(settings, ledger, backend, run)
        except (RunChanged, IllegalTransition, BackendError):
            raise
        except Exception as error:  # storage, a model that would not load: worth another try, not a stuck run
            log.exception("run %s, %s step failed unexpectedly", run.run_id, run.state)
            raise TransientBackendError(f"{type(error).__name__}: {error}") from error
    except (RunChanged, IllegalTransition):
        return True  # moved meanwhile: look again
    except BackendError as error:
        # Throttled, a concurrent handler's change, the service unavailable: the run stays
        # where it is and the janitor's next tick drives it on, for a day at most.
        entered = run.state_times.get(run.state)
        if isinstance(error, TransientBackendError) and entered and datetime.now(UTC) - entered < GIVE_UP_AFTER:
            log.warning("run %s, %s step: %s; trying again on the next janitor tick", run.run_id, run.state, error)
            return False
        latest = ledger.get(run.run_id)  # the step may have noted something before it failed
        if latest.state != run.state:
            return True
        try:
            _fail(settings, ledger, backend, latest, f"{run.state} step failed", str(error))
        except (RunChanged, IllegalTransition):
            return True
        return False


def _remove_deployment(ledger: Ledger, backend: Backend, run: Run) -> str:
    """Whatever a refused or failed deployment left must not bill: its deployment goes (a rollout
    cut short first gives the live deployment all the traffic back), and its endpoint too when no
    other run's deployment is on it (the endpoint was made for this one)."""
    endpoint, deployment = run.endpoint_name, run.deployment_name
    if not endpoint or not deployment:
        return ""
    others = [
        r
        for r in ledger.by_endpoint(endpoint)
        if r.run_id != run.run_id and r.state in {*HOSTED_STATES, *CHANGING_STATES}
    ]
    live = (run.details.get("rollout") or {}).get("live_deployment")
    try:
        if not others:
            return f"endpoint {endpoint} deleted" if backend.delete_endpoint(endpoint) else ""
        if live:
            backend.set_traffic(endpoint, {live: 100})
        return f"deployment {deployment} deleted" if backend.delete_deployment(endpoint, deployment) else ""
    except BackendError as error:
        return (f"deployment {deployment} of endpoint {endpoint} could not be deleted ({error}): it bills until "
                "it is deleted by hand or its endpoint is torn down")  # fmt: skip
