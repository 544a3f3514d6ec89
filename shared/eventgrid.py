"""Sending Event Grid events (azure-eventgrid, imported only when sending)."""

from __future__ import annotations

from typing import Any


def send_event(
    endpoint: str,
    credential: Any,
    subject: str,
    event_type: str,
    data_version: str,
    data: dict[str, Any],
    event_id: str | None = None,
) -> None:
    """Post one event in the Event Grid schema; `credential` is a key credential or an identity;
    `event_id` (else a new one) lets a receiver drop a duplicate of an event sent again."""
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    ids = {"id": event_id} if event_id else {}
    event = EventGridEvent(subject=subject, event_type=event_type, data_version=data_version, data=data, **ids)
    EventGridPublisherClient(endpoint, credential).send([event])
