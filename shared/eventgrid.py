"""Sending Event Grid events (azure-eventgrid, imported only when sending)."""

from __future__ import annotations

from typing import Any


def send_event(
    endpoint: str, credential: Any, subject: str, event_type: str, data_version: str, data: dict[str, Any]
) -> None:
    """Post one event in the Event Grid schema; `credential` is a key credential or an identity."""
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    event = EventGridEvent(subject=subject, event_type=event_type, data_version=data_version, data=data)
    EventGridPublisherClient(endpoint, credential).send([event])
