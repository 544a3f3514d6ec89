"""Job events: Azure ML (or the local trainer) reports a job's status through Event Grid."""

import logging

import azure.functions as func

from shared.events import handle_job_event
from shared.ledger import open_ledger
from shared.settings import get_settings

bp = func.Blueprint()


@bp.function_name("job_events")
@bp.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    settings = get_settings()
    ledger = open_ledger(settings)
    outcome = handle_job_event(settings, ledger, event.get_json(), event.event_type, event.topic, event.subject)
    logging.info("event %s (%s): %s", event.id, event.event_type, outcome)
