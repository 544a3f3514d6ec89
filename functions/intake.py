"""Dataset intake: a blob dropped into `datasets/` becomes a run."""

import logging

import azure.functions as func
from azurefunctions.extensions.bindings import blob

from shared.intake import handle_upload
from shared.ledger import open_ledger
from shared.settings import STORAGE_SETTING, get_settings

bp = func.Blueprint()


@bp.function_name("dataset_intake")
@bp.blob_trigger(
    arg_name="upload",
    path="datasets/{name}",
    connection=STORAGE_SETTING,
    source=func.BlobSource.EVENT_GRID,
)
def dataset_intake(upload: blob.BlobClient) -> None:
    # An SDK-type binding: the host passes the blob's name, never its bytes (a 1.5 GB upload would
    # not fit a 2 GB instance); preparation streams it with the storage SDK.
    settings = get_settings()
    run = handle_upload(settings, open_ledger(settings), upload.container_name, upload.blob_name)
    if run is not None:
        logging.info("upload %s/%s is run %s, state %s", upload.container_name, upload.blob_name, run.run_id, run.state)
