"""What happens when a dataset lands in the `datasets` container: record it, prepare it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset, report_summary
from shared.ledger import Ledger, Run, RunChanged, RunState, Upload
from shared.settings import Settings
from shared.storage import PREPARED_CONTAINER, blob_service

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient

log = logging.getLogger(__name__)


def _trigger_etag(properties: Mapping[str, Any]) -> str | None:
    return next((str(v).strip('"') for k, v in properties.items() if k.lower() == "etag" and v), None)


def handle_upload(settings: Settings, ledger: Ledger, blob_path: str, properties: Mapping[str, Any]) -> Run:
    """Record the upload as a run and prepare it. A redelivered upload finds its run and does
    nothing more, unless an earlier delivery died before preparation was recorded."""
    container, _, blob_name = blob_path.partition("/")
    if not container or not blob_name:
        raise ValueError(f"blob path {blob_path!r} is not 'container/name'")
    blob = blob_service(settings.storage).get_blob_client(container, blob_name)
    etag = _trigger_etag(properties) or str(blob.get_blob_properties().etag).strip('"')
    run, created = ledger.receive(Upload(container, blob_name, etag), f"received {blob_path} (ETag {etag})")
    if run.state != RunState.RECEIVED:
        log.info("upload %s delivered again: run %s is already %s", blob_path, run.run_id, run.state)
        return run
    if not created:
        log.info("upload %s delivered again before it was prepared: preparing run %s", blob_path, run.run_id)
    return prepare_run(settings, ledger, run, blob)


def _prepare_blob(settings: Settings, blob: BlobClient, etag: str, work: Path) -> Preparation:
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceModifiedError

    info = InputInfo(f"{blob.container_name}/{blob.blob_name}", etag=etag)
    try:
        # Read exactly the version this run is about; the storage SDK streams it in chunks.
        download = blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        info = InputInfo(info.name, download.properties.size, etag)
        return prepare_dataset(download.chunks(), work, info, settings.dataset, download.properties.metadata)
    except ResourceModifiedError:
        reason = "the blob was overwritten before it could be read; the new version is a new upload with its own run"
        return prepare_dataset([], work, info, settings.dataset, refusal=reason)


def prepare_run(settings: Settings, ledger: Ledger, run: Run, blob: BlobClient) -> Run:
    """Prepare the run's upload into `prepared/<run id>/` and record the outcome."""
    prepared = blob_service(settings.storage).get_container_client(PREPARED_CONTAINER)
    if not prepared.exists():
        prepared.create_container()
    with tempfile.TemporaryDirectory(prefix="prepare-") as work:
        preparation = _prepare_blob(settings, blob, run.upload.version, Path(work))
        for path in preparation.files:
            with path.open("rb") as data:
                prepared.upload_blob(f"{run.run_id}/{path.name}", data, overwrite=True)
    details = {"report": report_summary(preparation.report), "prepared": f"{PREPARED_CONTAINER}/{run.run_id}/"}
    try:
        if preparation.accepted:
            return ledger.advance(run, RunState.PREPARED, preparation.reason, details=details)
        return ledger.advance(run, RunState.REJECTED, "dataset rejected", reason=preparation.reason, details=details)
    except RunChanged:
        # A concurrent delivery prepared the same upload (same deterministic files) and won.
        return ledger.get(run.run_id)
