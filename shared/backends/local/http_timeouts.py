"""A time limit on a request's head, for the local servers' uvicorn: `uvicorn.Config(http=HeaderTimeoutProtocol)`.

uvicorn bounds the wait between requests on a kept-alive connection (`timeout_keep_alive`), but not
the wait for a request's line and headers: a client that connects and sends half a head, or
nothing at all (slowloris), holds its connection for ever. This is uvicorn's own httptools protocol
(what `http="auto"` picks, httptools being installed) with one timer more: armed when a
connection opens, and when bytes arrive on a connection with no request in progress; stopped once
a request's headers are complete. When it fires, a client stuck in the middle of a head gets a 408
in the endpoints' JSON error shape, and the connection is closed (one that sent nothing is closed
without a word; a pipelined head stalled behind an answer closes the connection once that answer
is out). The wait between requests is still uvicorn's: its keep-alive timer runs from the end of
an answer to the next request's first byte, and this one only from there to the head's end."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from shared.backends.local.http_errors import ApiError

# A client sends its request's head in one write, and it arrives in one packet or a few on the
# same machine: a head still unfinished after 10 s comes from a stalled or hostile client. Long
# enough that a loaded 2-core machine never cuts a real one; a subclass may set another.
HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s: float = HEADER_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None
    _head_begun = False  # part of a request's head has arrived, not yet its end

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # no request in progress: these bytes must start one (uvicorn stops its keep-alive timer)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        self._arm()  # a pipelined request, read while the one before it is being answered

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head stalled behind an answer still going out: that answer is not cut off.
            self.cycle.keep_alive = False
            self.logger.warning("%s - no request head within %g s; closing after the answer", client,
                                self.header_timeout_s)  # fmt: skip
            return
        if self._head_begun:
            message = f"the request's headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(self._timeout_answer(message))
        self.logger.warning("%s - no request head within %g s; connection closed", client, self.header_timeout_s)
        self.transport.close()

    def _timeout_answer(self, message: str) -> bytes:
        body = bytes(ApiError(408, message, "timeout", "timeout").response().body)
        head = [STATUS_LINE[408]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n", b"\r\n"]  # fmt: skip
        return b"".join(head) + body
