"""A local Event Grid topic: an HTTP endpoint on 127.0.0.1 that takes what
`EventGridPublisherClient` posts (checking the `aeg-sas-key` header, as Event Grid does), adds the
`topic` that Event Grid adds on delivery, and hands each event to a subscriber. No Event Grid
emulator exists, so the local backend's trainer, the tests and the local host publish to this one."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from http.server import ThreadingHTTPServer
from typing import Any

from shared.backends.local.httpserver import ReplyingHandler

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1024 * 1024  # Event Grid's own limit for one post
REQUEST_TIMEOUT_S = 5


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


# Event Grid's own schema: these fields are required, and all of these strings (eventTime an ISO
# 8601 time); Event Grid refuses the whole post otherwise.
REQUIRED_FIELDS = ("id", "subject", "eventType", "eventTime")
STRING_FIELDS = ("id", "subject", "eventType", "eventTime", "dataVersion", "metadataVersion", "topic")


def schema_problem(event: Any, index: int) -> str | None:
    """Why an event is not an Event Grid event, as Event Grid would refuse it; None when it is."""
    if not isinstance(event, dict):
        return f"event {index} is not a JSON object"
    for name in REQUIRED_FIELDS:
        if name not in event:
            return f"event {index} has no {name}"
    for name in STRING_FIELDS:
        if name in event and not isinstance(event[name], str):
            return f"event {index}: {name} must be a string, not {type(event[name]).__name__}"
    try:
        datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00"))
    except ValueError:
        return f"event {index}: eventTime {event['eventTime'][:40]!r} is not an ISO 8601 time"
    return None


class _Handler(ReplyingHandler):
    server: LocalTopic
    timeout = REQUEST_TIMEOUT_S  # a sender that stops mid-body is cut off, not waited on forever

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_POST(self) -> None:
        presented = self.headers.get("aeg-sas-key", "")
        length = self.headers.get("Content-Length", "")
        if not hmac.compare_digest(presented.encode(), self.server.key.encode()):
            self.close_connection = True  # its body is never read: nothing of it may be taken for a request
            self.send_json(401, {"error": "missing or wrong aeg-sas-key"})
            return
        if not length.isdigit():
            self.close_connection = True
            self.send_json(411, {"error": "a Content-Length header with a whole number of bytes is required"})
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self.send_json(413, {"error": "events larger than 1 MB"})
            return
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            self.send_json(408, {"error": f"the body did not arrive within {REQUEST_TIMEOUT_S} s"})
            return
        try:
            events = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            self.send_json(400, {"error": f"malformed JSON: {' '.join(str(error).split())[:200]}"})
            return
        if not isinstance(events, list):
            self.send_json(400, {"error": "expected a JSON array of Event Grid events"})
            return
        problem = next((p for index, event in enumerate(events) if (p := schema_problem(event, index))), None)
        if problem:  # Event Grid takes all of a post or none of it
            self.send_json(400, {"error": problem})
            return
        for event in events:
            self.server.subscriber({**event, "topic": self.server.topic})
        self.send_json(200, {})
