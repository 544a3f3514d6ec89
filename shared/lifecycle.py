"""Lifecycle events for other systems to react to (notifications, dashboards): published to
`LIFECYCLE_TOPIC_ENDPOINT` when it is set.

Each is recorded in the ledger in the same transaction as the change it tells of (an outbox), then
sent: a handler that dies in between leaves it recorded, and the next handler that changes that
run, or the janitor's next tick, sends it. So each is sent at least once, always with the same id, by which a
receiver drops a duplicate. A failed send is logged, never raised: telling others must not break
the run itself; the event waits for the next try.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.eventgrid import send_event
from shared.ledger import Ledger, Tell
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


def tell(settings: Settings, event_type: str, **data: Any) -> Tell | None:
    """What to record with a change, to be sent as `event_type` with `data` (see `publish`);
    nothing without a topic: there is nobody to tell."""
    return Tell(event_type, data) if settings.lifecycle_topic_endpoint else None


def publish(settings: Settings, ledger: Ledger, run_id: str | None = None) -> None:
    """Send the recorded events not yet sent, of one run (the one a handler just changed) or of
    every run (the janitor), each removed once sent; the first that fails to go stops the rest of
    its run's, to keep their order. Without a topic there is nobody to tell: one run's are not looked
    for (none is recorded), and the janitor drops what was recorded while there was one."""
    if not settings.lifecycle_topic_endpoint and run_id is not None:
        return
    credential = _credential(settings) if settings.lifecycle_topic_endpoint else None
    stuck: set[str] = set()
    for entry in ledger.outbox(run_id):
        if entry.run_id in stuck:
            continue
        if settings.lifecycle_topic_endpoint:
            payload = {"runId": entry.run_id, "state": entry.state, "upload": entry.upload, "reason": entry.reason,
                       **entry.data}  # fmt: skip
            try:
                send_event(settings.lifecycle_topic_endpoint, credential, f"runs/{entry.run_id}", entry.event_type,
                           "1", payload, event_id=entry.event_id, event_time=entry.at)  # fmt: skip
            except Exception as error:  # the run goes on; the event waits for the next try
                log.warning("could not publish %s for run %s (tried again later): %s", entry.event_type,
                            entry.run_id, error)  # fmt: skip
                stuck.add(entry.run_id)
                continue
        ledger.told(entry)


def _credential(settings: Settings) -> Any:
    from azure.core.credentials import AzureKeyCredential

    if settings.lifecycle_topic_key:
        return AzureKeyCredential(settings.lifecycle_topic_key)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
