"""What a run spent, recorded beside what it was estimated to spend: training from the job's start
(its `running` time, or its submission when no start was reported) to its end, hosting from the
deployment's creation to the endpoint's teardown, each priced at the hourly price the estimate
used."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.ledger import Run, RunState

SPEND = "spend"


def _estimate(run: Run) -> dict[str, Any]:
    estimate = run.details.get("report", {}).get("estimate") or {}
    return estimate if isinstance(estimate, dict) else {}


def _spent(started: datetime | None, ended: datetime, usd_per_hour: float | None) -> dict[str, Any] | None:
    if started is None:
        return None
    hours = max((ended - started).total_seconds(), 0.0) / 3600
    usd = round(hours * usd_per_hour, 4) if usd_per_hour is not None else None
    return {"from": started.isoformat(), "to": ended.isoformat(), "hours": round(hours, 4), "usd": usd}


def training_spend(run: Run, ended: datetime) -> dict[str, Any]:
    """The run's details with its training time and cost, for the transition to `completed`."""
    times = run.state_times
    started = times.get(RunState.RUNNING) or times.get(RunState.SUBMITTED)
    estimate = _estimate(run)
    spent = _spent(started, ended, estimate.get("basis", {}).get("training_price_usd_per_hour"))
    if spent is None:
        return {}
    spent["estimated_hours"], spent["estimated_usd"] = estimate.get("training_hours"), estimate.get("training_usd")
    return {SPEND: {**run.details.get(SPEND, {}), "training": spent}}


def hosting_spend(run: Run, ended: datetime) -> dict[str, Any]:
    """The run's details with its endpoint's hosting time and cost, for the teardown."""
    times = run.state_times
    spent = _spent(times.get(RunState.DEPLOYING), ended, _estimate(run).get("hosting_usd_per_hour"))
    return {SPEND: {**run.details.get(SPEND, {}), "hosting": spent}} if spent else {}
