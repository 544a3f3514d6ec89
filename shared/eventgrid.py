"""Event Grid, both ends: sending events (azure-eventgrid, imported only when sending), and a
local topic: an HTTP endpoint on 127.0.0.1 that takes what `EventGridPublisherClient` posts
(checking the `aeg-sas-key` header, as Event Grid does), adds the `topic` that Event Grid adds on
delivery, and hands each event to a subscriber. No Event Grid emulator exists, so the local
backend's trainer, the tests and the local host publish to this one."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1024 * 1024  # Event Grid's own limit for one post


def send_event(
    endpoint: str, credential: Any, subject: str, event_type: str, data_version: str, data: dict[str, Any]
) -> None:
    """Post one event in the Event Grid schema; `credential` is a key credential or an identity."""
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    event = EventGridEvent(subject=subject, event_type=event_type, data_version=data_version, data=data)
    EventGridPublisherClient(endpoint, credential).send([event])


class LocalTopic(ThreadingHTTPServer):
    """Serves until `close()`; `endpoint` is what publishers point at."""

    daemon_threads = True

    def __init__(self, key: str, subscriber: Callable[[dict[str, Any]], None], topic: str = "local-topic") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.key, self.subscriber, self.topic = key, subscriber, topic
        self._thread = threading.Thread(target=self.serve_forever, name="local-eventgrid-topic", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/events"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: LocalTopic

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _reply(self, status: int, message: str = "") -> None:
        body = json.dumps({"error": message} if message else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        presented = self.headers.get("aeg-sas-key", "")
        if not hmac.compare_digest(presented.encode(), self.server.key.encode()):
            self._reply(401, "missing or wrong aeg-sas-key")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, "events larger than 1 MB")
            return
        try:
            events = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as error:
            self._reply(400, f"malformed JSON: {error}")
            return
        if not isinstance(events, list) or not all(isinstance(e, dict) and "eventType" in e for e in events):
            self._reply(400, "expected a JSON array of Event Grid events")
            return
        for event in events:
            self.server.subscriber({**event, "topic": self.server.topic})
        self._reply(200)
