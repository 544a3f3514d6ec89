"""What happens when a dataset lands in the `datasets` container: record it, prepare it, submit
the fine-tune. Each step is recorded before the next starts, so a redelivered upload picks up
where an earlier delivery stopped, and deterministic job names make the backend the source of
truth for whether a job was already submitted."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shared import lifecycle
from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset, refuse, report_summary, rewrite_report
from shared.ledger import Ledger, Run, RunChanged, RunState, Upload
from shared.settings import Settings
from shared.storage import blob_service, container
from shared.vocabulary import DATASET_SHA256_TAG, PREPARED_CONTAINER, RUN_ID_TAG

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient

    from shared.backends.interface import Backend

log = logging.getLogger(__name__)


def handle_upload(settings: Settings, ledger: Ledger, container_name: str, blob_name: str) -> Run | None:
    """Record the upload as a run, prepare it and submit its fine-tune. A redelivered upload
    finds its run and carries on from wherever an earlier delivery stopped (usually: nowhere).
    The run is about the version stored now (its ETag): a later overwrite is a new upload.
    None when the blob was deleted before its event was handled: there is nothing to record."""
    from azure.core.exceptions import ResourceNotFoundError

    blob = blob_service(settings.storage).get_blob_client(container_name, blob_name)
    try:
        etag = str(blob.get_blob_properties().etag).strip('"')
    except ResourceNotFoundError:
        log.warning("upload %s/%s was deleted before it could be read; nothing to do", container_name, blob_name)
        return None
    blob_path = f"{container_name}/{blob_name}"
    run, created = ledger.receive(Upload(container_name, blob_name, etag), f"received {blob_path} (ETag {etag})")
    if not created:
        log.info("upload %s delivered again: run %s is %s", blob_path, run.run_id, run.state)
    if run.state == RunState.RECEIVED:
        run = prepare_run(settings, ledger, run, blob)
    if run.state == RunState.PREPARED:
        run = submit_run(settings, ledger, run)
    return run


def _prepare_blob(settings: Settings, blob: BlobClient, etag: str, work: Path) -> Preparation:
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceModifiedError

    from shared.backends.registry import plugin

    info = InputInfo(f"{blob.container_name}/{blob.blob_name}", etag=etag)
    try:
        # Read exactly the version this run is about; the storage SDK streams it in chunks.
        download = blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        info = InputInfo(info.name, download.properties.size, etag)
        # A dataset reference may name a folder of the machine only where that is a developer's.
        local_folders = not plugin(settings.ml_backend).runs_in_azure
        return prepare_dataset(download.chunks(), work, info, settings.dataset, download.properties.metadata,
                               local_folders=local_folders)  # fmt: skip
    except ResourceModifiedError:
        reason = "the blob was overwritten before it could be read; the new version is a new upload with its own run"
        return prepare_dataset([], work, info, settings.dataset, refusal=reason)


def prepare_run(settings: Settings, ledger: Ledger, run: Run, blob: BlobClient) -> Run:
    """Prepare the run's upload into `prepared/<run id>/` and record the outcome."""
    from shared.backends.registry import get_backend
    from shared.costs.gate import check_before_spending

    prepared = container(settings.storage, PREPARED_CONTAINER)
    with tempfile.TemporaryDirectory(prefix="prepare-") as work:
        preparation = _prepare_blob(settings, blob, run.upload.version, Path(work))
        if preparation.accepted:  # the gate before any spend: tokens, time, money, budget
            verdict = check_before_spending(get_backend(settings), preparation)
            preparation = refuse(preparation, verdict.refusal) if verdict.refusal else rewrite_report(preparation)
        for path in preparation.files:
            with path.open("rb") as data:
                prepared.upload_blob(f"{run.run_id}/{path.name}", data, overwrite=True)
    details = {"report": report_summary(preparation.report), "prepared": f"{PREPARED_CONTAINER}/{run.run_id}/"}
    try:
        if preparation.accepted:
            return ledger.advance(run, RunState.PREPARED, preparation.reason, details=details)
        told = lifecycle.tell(
            settings, lifecycle.DATASET_REJECTED, report=f"{PREPARED_CONTAINER}/{run.run_id}/report.json"
        )
        rejected = ledger.advance(run, RunState.REJECTED, "dataset rejected", reason=preparation.reason,
                                  details=details, tell=told)  # fmt: skip
    except RunChanged:
        # A concurrent delivery prepared the same upload (same deterministic files) and won.
        return ledger.get(run.run_id)
    lifecycle.publish(settings, ledger, run.run_id)
    return rejected


def submit_run(settings: Settings, ledger: Ledger, run: Run, backend: Backend | None = None) -> Run:
    """Submit the fine-tune for a prepared run. Submitting again finds the job already there."""
    from shared.backends.interface import BackendError, JobRequest, job_name_for
    from shared.backends.registry import get_backend

    report = run.details.get("report", {})
    backend = backend or get_backend(settings)
    try:
        with backend.prepared_location(run.run_id) as prepared:
            request = JobRequest(
                job_name=job_name_for(run.run_id),
                prepared=prepared,
                dataset=run.run_id.rsplit("-", 1)[0],
                parameters=dict(report.get("training_overrides", {})),
                tags={RUN_ID_TAG: run.run_id, DATASET_SHA256_TAG: str(report.get("sha256", ""))},
            )
            status = backend.submit(request)
    except BackendError as error:
        try:
            told = lifecycle.tell(settings, lifecycle.JOB_FAILED, stage="submission")
            failed = ledger.advance(run, RunState.FAILED, "submission refused", reason=str(error), tell=told)
        except RunChanged:
            return ledger.get(run.run_id)
        lifecycle.publish(settings, ledger, run.run_id)
        return failed
    try:
        # What the checks could not check (an allow-list the registry does not name) is said
        # in the history, never passed over silently.
        message = "; ".join([f"submitted job {status.job_name} ({status.status})", *status.notes])
        notes = {"submission_notes": list(status.notes)} if status.notes else None
        told = lifecycle.tell(settings, lifecycle.JOB_SUBMITTED, job=status.job_name, estimate=report.get("estimate"))
        submitted = ledger.advance(run, RunState.SUBMITTED, message, job_name=status.job_name, details=notes,
                                   tell=told)  # fmt: skip
    except RunChanged:
        return ledger.get(run.run_id)
    lifecycle.publish(settings, ledger, run.run_id)
    return submitted
