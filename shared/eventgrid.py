"""Sending Event Grid events (azure-eventgrid, imported only when sending)."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def send_event(
    endpoint: str,
    credential: Any,
    subject: str,
    event_type: str,
    data_version: str,
    data: dict[str, Any],
    event_id: str | None = None,
    event_time: datetime | None = None,
) -> None:
    """Post one event in the Event Grid schema; `credential` is a key credential or an identity;
    `event_id` (else a new one) lets a receiver drop a duplicate of an event sent again, and
    `event_time` (else now) keeps its time when it is sent again."""
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    given: dict[str, Any] = {"id": event_id} if event_id else {}
    if event_time:
        given["event_time"] = event_time
    event = EventGridEvent(subject=subject, event_type=event_type, data_version=data_version, data=data, **given)
    EventGridPublisherClient(endpoint, credential).send([event])
