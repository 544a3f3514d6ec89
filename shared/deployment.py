"""From a completed job to a serving endpoint: register, deploy, smoke-test, route traffic.

Every step is idempotent on the backend (the same job gives the same model version, the same run
the same endpoint) and recorded by a conditional ledger transition, so any number of handlers
(duplicate events, the janitor's timer) can drive the same run concurrently: each step happens
once, and a handler that loses a race re-reads the run and carries on from where it now is."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from shared import lifecycle
from shared.backends.interface import Backend, BackendError, Conversation, DeployState, ModelRef, TransientBackendError
from shared.backends.registry import get_backend
from shared.ledger import IllegalTransition, Ledger, Run, RunChanged, RunState
from shared.settings import Settings
from shared.storage import blob_service
from shared.vocabulary import (
    MANAGED_BY,
    MANAGED_BY_TAG,
    PREPARED_CONTAINER,
    RUN_ID_TAG,
    TEST_FILE,
)

log = logging.getLogger(__name__)
S = RunState
DRIVEN_STATES = (S.COMPLETED, S.REGISTERED, S.DEPLOYING)
GIVE_UP_AFTER = timedelta(hours=24)  # a step that keeps hitting transient errors fails after this
# Longer than the longest step (locally: the model loading, then a smoke test in each request
# shape at up to 200 s each); a driver that dies leaves a claim that lapses after this.
CLAIM_TTL = timedelta(minutes=15)
METRICS_SUMMARY = ("train_loss", "eval_loss", "perplexity", "tokens_per_second", "steps")


def endpoint_name_for(run_id: str) -> str:
    """A valid endpoint name (3-32 characters, a letter first) that is unique per upload."""
    slug, _, digest = run_id.rpartition("-")
    short = re.sub(r"-+", "-", slug[:14]).strip("-")
    return f"ft-{short}-{digest}" if short else f"ft-{digest}"


def smoke_conversation(settings: Settings, run: Run) -> Conversation:
    """A held-out conversation (the first of test_sft.jsonl), cut before its last assistant turn
    so the model has something to answer."""
    blob = blob_service(settings.storage).get_blob_client(PREPARED_CONTAINER, f"{run.run_id}/{TEST_FILE}")
    head = blob.download_blob(offset=0, length=1024 * 1024).readall()
    messages: Conversation = json.loads(head.split(b"\n", 1)[0])["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def _step(settings: Settings, ledger: Ledger, backend: Backend, run: Run) -> bool:
    """Take the run one step on; False when there is nothing more to do now."""
    if run.state == S.COMPLETED:
        model = backend.register(run.job_name or "")
        metrics = backend.job_metrics(run.job_name or "")
        summary = {key: metrics.get(key) for key in METRICS_SUMMARY}
        details = {"metrics": summary, "loss_curve": metrics.get("loss_curve")} if metrics else None
        ledger.advance(run, S.REGISTERED, f"registered model {model.name}:{model.version}",
                       model_name=model.name, model_version=model.version, details=details)  # fmt: skip
        return True
    model = ModelRef(run.model_name or "", run.model_version or "")
    tags = {MANAGED_BY_TAG: MANAGED_BY, RUN_ID_TAG: run.run_id}
    if run.state == S.REGISTERED:
        endpoint = endpoint_name_for(run.run_id)
        backend.deploy(model, endpoint, tags)
        ledger.advance(run, S.DEPLOYING, f"deploying {model.name}:{model.version} to endpoint {endpoint}",
                       endpoint_name=endpoint)  # fmt: skip
        return True
    if run.state == S.DEPLOYING:
        progress = backend.continue_deployment(
            model, run.endpoint_name or "", tags, partial(smoke_conversation, settings, run)
        )
        if progress.state == DeployState.DEPLOYING:
            return False  # Azure is still at it; the janitor's timer comes back
        details = {"smoke_test": [asdict(attempt) for attempt in progress.smoke_test]} if progress.smoke_test else None
        if progress.state == DeployState.DEPLOYED:
            url = backend.endpoint(run.endpoint_name or "").scoring_uri
            tried = ", ".join(f"{attempt.shape}: {attempt.status}" for attempt in progress.smoke_test)
            message = (
                f"smoke test passed ({tried}); serving" if tried else "serving (smoke-tested by an earlier attempt)"
            )
            run = ledger.advance(run, S.DEPLOYED, message, endpoint_url=url or "", details=details)
            lifecycle.publish(settings, lifecycle.MODEL_DEPLOYED, run, endpoint=run.endpoint_name, scoringUri=url,
                              model=f"{model.name}:{model.version}")  # fmt: skip
        else:
            _fail(settings, ledger, backend, run, "deployment failed", progress.message or "no message", details)
        return False
    return False


def _fail(settings: Settings, ledger: Ledger, backend: Backend, run: Run, message: str, reason: str,
          details: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Record the failure first, then remove the run's endpoint so nothing bills: a handler that
    lost the race (the ledger moved past the state it read) records nothing and removes nothing."""
    failed = ledger.advance(run, S.DEPLOY_FAILED, message, reason=reason, details=details)
    removed = _remove_endpoint(backend, failed)
    if removed:
        failed = ledger.note(run.run_id, removed)
    lifecycle.publish(settings, lifecycle.JOB_FAILED, failed, stage="deployment")


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
        return _step(settings, ledger, backend, run)
    except (RunChanged, IllegalTransition):
        return True  # moved meanwhile: look again
    except BackendError as error:
        # Throttled, a concurrent handler's change, the service unavailable: the run stays
        # where it is and the janitor's next tick drives it on, for a day at most.
        entered = run.state_times.get(run.state)
        if isinstance(error, TransientBackendError) and entered and datetime.now(UTC) - entered < GIVE_UP_AFTER:
            log.warning("run %s, %s step: %s; trying again on the next janitor tick", run.run_id, run.state, error)
            return False
        try:
            _fail(settings, ledger, backend, run, f"{run.state} step failed", str(error))
        except (RunChanged, IllegalTransition):
            return True
        return False


def _remove_endpoint(backend: Backend, run: Run) -> str:
    """Whatever a failed deployment left must not bill: its endpoint (one per run) goes too."""
    if not run.endpoint_name:
        return ""
    try:
        return f"endpoint {run.endpoint_name} deleted" if backend.delete_endpoint(run.endpoint_name) else ""
    except BackendError as error:
        return f"endpoint {run.endpoint_name} could not be deleted ({error}): the janitor retries when it is idle"
