"""Lifecycle events for other systems to react to (notifications, dashboards): published to
`LIFECYCLE_TOPIC_ENDPOINT` when it is set. A failed publication is logged, never raised: telling
others must not break the run itself."""

from __future__ import annotations

import logging
from typing import Any

from shared.eventgrid import send_event
from shared.ledger import Run
from shared.settings import Settings

log = logging.getLogger(__name__)

DATASET_REJECTED = "FineTune.DatasetRejected"
JOB_SUBMITTED = "FineTune.JobSubmitted"
JOB_FAILED = "FineTune.JobFailed"
MODEL_DEPLOYED = "FineTune.ModelDeployed"  # it takes all of its endpoint's traffic
MODEL_REFUSED = "FineTune.ModelRefused"  # by the evaluation gate; what served before still does
MODEL_ROLLED_BACK = "FineTune.ModelRolledBack"
ENDPOINT_DELETED = "FineTune.EndpointDeleted"
DEPLOYMENT_DELETED = "FineTune.DeploymentDeleted"  # a replaced one, past the rollback window


def publish(settings: Settings, event_type: str, run: Run, **data: Any) -> None:
    if not settings.lifecycle_topic_endpoint:
        return
    from azure.core.credentials import AzureKeyCredential

    if settings.lifecycle_topic_key:
        credential: Any = AzureKeyCredential(settings.lifecycle_topic_key)
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
    payload = {
        "runId": run.run_id,
        "state": str(run.state),
        "upload": f"{run.upload.container}/{run.upload.blob_name}",
        "reason": run.reason,
        **data,
    }
    try:
        send_event(settings.lifecycle_topic_endpoint, credential, f"runs/{run.run_id}", event_type, "1", payload)
    except Exception as error:  # the run goes on; the log says what was not told
        log.warning("could not publish %s for run %s: %s", event_type, run.run_id, error)
