"""Run status, and rollbacks, as JSON: for the HTTP routes and the command line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.ledger import Ledger, RunState

if TYPE_CHECKING:
    from shared.settings import Settings

MAX_LIMIT = 200


@dataclass(frozen=True)
class StatusResponse:
    status: int
    body: str


def _json(status: int, payload: Any) -> StatusResponse:
    return StatusResponse(status, json.dumps(payload, indent=2))


def runs_response(ledger: Ledger, run_id: str | None, query: Mapping[str, str]) -> StatusResponse:
    """`GET /api/runs[?state=S&limit=N]` lists recent runs; `GET /api/runs/{id}` shows one with
    its history. Bad query parameters get a 400 that says what is expected."""
    if run_id:
        run = ledger.find(run_id)
        if run is None:
            return _json(404, {"error": f"no run with id {run_id!r}"})
        history = [
            {"at": entry.at.isoformat(), "state": str(entry.state), "message": entry.message}
            for entry in ledger.history(run_id)
        ]
        return _json(200, {**run.to_json(), "history": history})

    state_name = query.get("state")
    try:
        state = RunState(state_name) if state_name else None
    except ValueError:
        return _json(400, {"error": f"state={state_name!r}: expected one of {', '.join(RunState)}"})
    try:
        limit = int(query.get("limit", "20"))
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        return _json(400, {"error": f"limit={query.get('limit')!r}: expected a whole number from 1 to {MAX_LIMIT}"})
    return _json(200, {"runs": [run.to_json() for run in ledger.recent(limit=limit, state=state)]})


def rollback_response(settings: Settings, ledger: Ledger, endpoint: str) -> StatusResponse:
    """`POST /api/endpoints/{endpoint}/rollback`: the run serving after the rollback (200), or why
    there is nothing to roll back (404 for an endpoint this app never deployed to, else 409)."""
    from shared.backends.interface import BackendError
    from shared.deployment import RollbackError, UnknownEndpoint, rollback
    from shared.ledger import LedgerError
    from shared.validation import RESOURCE_NAME

    try:  # the name, at the door
        RESOURCE_NAME.parse(endpoint)
    except ValueError:
        return _json(400, {"error": f"endpoint {endpoint!r}: {RESOURCE_NAME.expects}"})
    try:
        serving = rollback(settings, ledger, endpoint)
    except UnknownEndpoint as error:
        return _json(404, {"error": str(error)})
    except (RollbackError, LedgerError) as error:  # LedgerError: changed meanwhile by another handler
        return _json(409, {"error": str(error)})
    except BackendError as error:
        return _json(502, {"error": f"endpoint {endpoint!r}: the backend refused the traffic change: {error}"})
    return _json(200, {"endpoint": endpoint, "serving": serving.to_json()})
