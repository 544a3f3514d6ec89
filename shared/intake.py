"""What happens when a dataset lands in the `datasets` container."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared.ledger import Ledger, Run, Upload
from shared.settings import Settings
from shared.storage import blob_service

log = logging.getLogger(__name__)


def _etag(settings: Settings, container: str, blob_name: str, properties: Mapping[str, Any]) -> str:
    """The blob's ETag: from the trigger's properties when the host sent them, else from storage."""
    for key, value in properties.items():
        if key.lower() == "etag" and value:
            return str(value).strip('"')
    blob = blob_service(settings.storage).get_blob_client(container, blob_name)
    return str(blob.get_blob_properties().etag).strip('"')


def identify_upload(settings: Settings, blob_path: str, properties: Mapping[str, Any]) -> Upload:
    """The upload behind a trigger's blob path (`container/name`)."""
    container, _, blob_name = blob_path.partition("/")
    if not container or not blob_name:
        raise ValueError(f"blob path {blob_path!r} is not 'container/name'")
    return Upload(container, blob_name, _etag(settings, container, blob_name, properties))


def handle_upload(settings: Settings, ledger: Ledger, blob_path: str, properties: Mapping[str, Any]) -> Run:
    """Record the upload as a run; a redelivered upload finds its existing run."""
    upload = identify_upload(settings, blob_path, properties)
    run, created = ledger.receive(upload, f"received {blob_path} (ETag {upload.version})")
    if not created:
        log.info("upload %s delivered again: run %s is already %s", blob_path, run.run_id, run.state)
    return run
