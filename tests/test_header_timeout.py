"""The local servers' time limit on a request's head (`http_timeouts`): a client that sends half a
request line or half its headers, then nothing (slowloris), gets a 408 and a closed connection
while every other client is served; complete requests, kept-alive connections and streamed answers
are as before. In-process uvicorn servers with a short limit, and one real gateway process with
its own."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.backends.local import gateway
from shared.backends.local.http_timeouts import HEADER_TIMEOUT_S, HeaderTimeoutProtocol
from tests.test_hostile_input import _answer

SHORT_S = 0.5  # the in-process servers' limit on a request's head
KEEP_ALIVE_S = 3  # and on the wait between requests: longer, so the two can be told apart
SLACK_S = 20  # a socket waits this long for what must come at SHORT_S: only a missing limit fails
GET = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
PARTIAL_HEADS = [b"GET /hel", b"GET /hello HTTP/1.1\r\n", b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: "]


class QuickProtocol(HeaderTimeoutProtocol):
    header_timeout_s = SHORT_S


async def _hello(_: Request) -> Response:
    return JSONResponse({"hello": "world"})


async def _stream(_: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for number in range(4):  # 1.2 s in all, over twice the limit on a head
            await asyncio.sleep(0.3)
            yield f"chunk {number}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


TINY_APP = Starlette(routes=[Route("/hello", _hello), Route("/stream", _stream)])


@contextmanager
def _serving(app: Any) -> Iterator[int]:
    """The app under uvicorn with the short limit, on a port of its own, in a thread of this process."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=QuickProtocol, log_config=None, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    web.start()
    deadline = time.monotonic() + 30
    while not server.started and web.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        web.join(30)
        listener.close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _serving(TINY_APP) as serving:
        yield serving


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SLACK_S)


def _rest(connection: socket.socket) -> bytes:
    """Everything until the server closes the connection (a timeout here fails the test)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def _timed_out(status: int, body: bytes) -> None:
    assert status == 408, body
    error = json.loads(body)["error"]
    assert error["code"] == "timeout" and "headers" in error["message"], error


@pytest.mark.parametrize("partial", PARTIAL_HEADS, ids=["request-line", "line", "headers"])
def test_a_half_sent_head_gets_a_408_and_others_are_served_meanwhile(
    port: int, partial: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uvicorn.error")
    with _connect(port) as slow:
        slow.sendall(partial)
        with _connect(port) as other:  # sent after the slow one and answered at once
            other.sendall(GET)
            status, _, body = _answer(other)
            assert status == 200 and json.loads(body) == {"hello": "world"}
        status, headers, body = _answer(slow)
        _timed_out(status, body)
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert _rest(slow) == b""
    cut = [record for record in caplog.records if "no request head within" in record.getMessage()]
    assert len(cut) == 1 and cut[0].exc_info is None, [record.getMessage() for record in caplog.records]


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int) -> None:
    with _connect(port) as idle:
        assert _rest(idle) == b""  # no request, nothing to answer: closed at the limit on a head


def test_kept_alive_requests_wait_the_keep_alive_time_not_the_heads(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(GET)
        assert _answer(connection)[0] == 200
        time.sleep(3 * SHORT_S)  # idle past the limit on a head, within the keep-alive time
        connection.sendall(GET)
        assert _answer(connection)[0] == 200
        assert _rest(connection) == b""  # then closed at the keep-alive time, without a word


def test_a_slow_second_request_on_a_kept_alive_connection_is_cut(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(GET)
        assert _answer(connection)[0] == 200
        connection.sendall(PARTIAL_HEADS[-1])
        status, _, body = _answer(connection)
        _timed_out(status, body)
        assert _rest(connection) == b""


def test_a_streamed_answer_longer_than_the_limit_arrives_whole(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _answer(connection)
        assert status == 200 and body == b"".join(f"chunk {number}\n".encode() for number in range(4))
        connection.sendall(GET)  # and the connection is still good for another request
        assert _answer(connection)[0] == 200


def test_a_stalled_head_behind_a_streamed_answer_lets_that_answer_finish(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n" + PARTIAL_HEADS[-1])  # pipelined
        status, _, body = _answer(connection)
        assert status == 200 and body.count(b"chunk") == 4
        assert _rest(connection) == b""  # then closed: the stalled request is never answered


def test_the_gateways_app_cuts_a_half_sent_head(tmp_path: Path) -> None:
    with _serving(gateway.build_app(tmp_path)) as gateway_port, _connect(gateway_port) as slow:
        slow.sendall(PARTIAL_HEADS[-1])
        with _connect(gateway_port) as other:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(other)[0] == 200
        status, _, body = _answer(slow)
        _timed_out(status, body)


@pytest.mark.slow
def test_a_running_gateway_cuts_a_half_sent_head_at_its_limit(tmp_path: Path) -> None:
    """The real thing, its limit unchanged: `gateway.main` runs uvicorn with the protocol."""
    gateway_dir = tmp_path / "gateway"
    gateway_dir.mkdir()
    with (gateway_dir / "gateway.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "shared.backends.local.gateway", str(gateway_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (gateway_dir / "gateway.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, (gateway_dir / "gateway.log").read_text()
            time.sleep(0.1)
        gateway_port = json.loads((gateway_dir / "gateway.json").read_text())["port"]
        with socket.create_connection(("127.0.0.1", gateway_port), timeout=HEADER_TIMEOUT_S + SLACK_S) as slow:
            slow.sendall(PARTIAL_HEADS[-1])
            status, _, body = _answer(slow)
        _timed_out(status, body)
    finally:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        process.wait(30)
    written = (gateway_dir / "gateway.log").read_text()
    assert "no request head within" in written and "Traceback" not in written, written
