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
from http.server import ThreadingHTTPServer
from typing import Any

from shared.backends.local.httpserver import ReplyingHandler

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1024 * 1024  # Event Grid's own limit for one post


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


class _Handler(ReplyingHandler):
    server: LocalTopic

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_POST(self) -> None:
        presented = self.headers.get("aeg-sas-key", "")
        if not hmac.compare_digest(presented.encode(), self.server.key.encode()):
            self.send_json(401, {"error": "missing or wrong aeg-sas-key"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.send_json(413, {"error": "events larger than 1 MB"})
            return
        try:
            events = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as error:
            self.send_json(400, {"error": f"malformed JSON: {error}"})
            return
        if not isinstance(events, list) or not all(isinstance(e, dict) and "eventType" in e for e in events):
            self.send_json(400, {"error": "expected a JSON array of Event Grid events"})
            return
        for event in events:
            self.server.subscriber({**event, "topic": self.server.topic})
        self.send_json(200, {})
