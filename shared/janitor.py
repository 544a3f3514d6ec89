"""The endpoint janitor: finds deployed endpoints and tears down the idle ones."""

from __future__ import annotations

import logging

from shared.ledger import Ledger, RunState
from shared.settings import Settings

log = logging.getLogger(__name__)


def sweep(settings: Settings, ledger: Ledger, past_due: bool) -> dict[str, object]:
    """One janitor pass. Returns a summary for the log."""
    if past_due:
        # A missed tick is not made up twice: one sweep now covers everything since.
        log.info("janitor tick is past due; sweeping once now")
    deployed = ledger.by_state(RunState.DEPLOYED)
    return {"backend": settings.ml_backend, "past_due": past_due, "deployed_endpoints": len(deployed)}
