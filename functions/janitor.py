"""Endpoint janitor: on a schedule, tears down endpoints nobody has used for a while."""

import logging

import azure.functions as func

from shared.janitor import sweep
from shared.ledger import open_ledger
from shared.settings import get_settings

bp = func.Blueprint()


@bp.function_name("endpoint_janitor")
@bp.timer_trigger(arg_name="timer", schedule="%JANITOR_SCHEDULE%", run_on_startup=False, use_monitor=True)
def endpoint_janitor(timer: func.TimerRequest) -> None:
    settings = get_settings()
    report = sweep(settings, open_ledger(settings), past_due=timer.past_due)
    logging.info("janitor: %s", report)
