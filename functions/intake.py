"""Dataset intake: a blob dropped into `datasets/` becomes a run."""

import logging

import azure.functions as func

from shared.intake import handle_upload
from shared.ledger import open_ledger
from shared.settings import get_settings

bp = func.Blueprint()


@bp.function_name("dataset_intake")
@bp.blob_trigger(
    arg_name="upload",
    path="datasets/{name}",
    connection="AzureWebJobsStorage",
    source=func.BlobSource.EVENT_GRID,
)
def dataset_intake(upload: func.InputStream) -> None:
    # The binding's stream is not read: data is streamed with the storage SDK instead.
    settings = get_settings()
    run = handle_upload(settings, open_ledger(settings), upload.name or "", upload.blob_properties or {})
    logging.info("upload %s is run %s, state %s", upload.name, run.run_id, run.state)
