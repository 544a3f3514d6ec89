"""The one way the project's small HTTP servers (local endpoints, the local Event Grid topic, the
local host's routes) write a reply: status, type, length, body."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any


class ReplyingHandler(BaseHTTPRequestHandler):
    def send_body(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: Any) -> None:
        self.send_body(status, json.dumps(payload).encode())
