"""A local endpoint under hostile input: whatever arrives gets a JSON error and a clean or closed
connection, a slow sender is cut off at the request timeout, and no traceback reaches the log."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.backends.local import endpoints
from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.dev.adapters import random_adapter_model
from tests.conftest import stop_local_processes

pytestmark = pytest.mark.slow
TIMEOUT_S = 3  # the deployment's request timeout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, str]]:
    work = tmp_path_factory.mktemp("hostile")
    base = build_tiny_phi3(work / TINY_PHI3)
    data = work / "local"
    endpoints.serve(data, "ep-hostile", ("one", "1", random_adapter_model(base, work / "adapter", seed=1)), TIMEOUT_S)
    uri = endpoints.get(data, "ep-hostile").scoring_uri  # type: ignore[union-attr]
    port = int(uri.split("127.0.0.1:")[1].split("/")[0])
    yield data, port, endpoints.keys(data, "ep-hostile")["primary_key"]
    stop_local_processes(data)


def _request(body: bytes, key: str, path: str = "/score", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]  # fmt: skip
    if headers:
        kept = [line for line in lines if line.split(":")[0] not in headers]
        lines = kept + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _answer(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer read off the connection (status, headers, body)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"closed before an answer: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    if headers.get("transfer-encoding") == "chunked":  # the gateway streams its answers
        while not body.endswith(b"0\r\n\r\n"):
            chunk = connection.recv(65536)
            assert chunk, "closed in the middle of an answer"
            body += chunk
        return int(status_line.split()[1]), headers, _unchunked(body)
    while len(body) < int(headers.get("content-length", "0")):
        chunk = connection.recv(65536)
        assert chunk, "closed in the middle of an answer"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _unchunked(body: bytes) -> bytes:
    whole = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            return whole
        whole, body = whole + body[: int(size, 16)], body[int(size, 16) + 2 :]


def _send(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(raw)
        return _answer(connection)


def _error_of(body: bytes) -> str:
    return str(json.loads(body)["error"]["message"])


def _no_traceback(data: Path) -> None:
    for log in [*data.glob("servers/*/server.log"), data / "gateway" / "gateway.log"]:
        assert "Traceback" not in log.read_text(errors="replace"), log


def test_unpaired_surrogates_and_very_many_messages_get_json_errors(served: tuple[Path, int, str]) -> None:
    data, port, key = served
    surrogate = b'{"input_data": {"input_string": [{"role": "user", "content": "\\ud800 alone"}]}}'
    status, _, body = _send(port, _request(surrogate, key))
    assert status == 400 and _error_of(body), body
    many = json.dumps({"messages": [{"role": "user", "content": "x"}] * 50_000, "max_tokens": 1}).encode()
    status, _, body = _send(port, _request(many, key, "/v1/chat/completions"))
    assert 400 <= status < 500 and _error_of(body)
    _no_traceback(data)


@pytest.mark.parametrize("length", ["12abc", "-5", "1e3", " ", "99999999999999999999999"])
def test_odd_content_lengths_are_refused(served: tuple[Path, int, str], length: str) -> None:
    data, port, key = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(_request(b"{}", key, headers={"Content-Length": length}))
        try:
            status, _, _ = _answer(connection)
        except AssertionError:
            status = 400  # closed without an answer: refused as well
    assert 400 <= status < 500
    _no_traceback(data)


def test_a_refused_requests_body_is_never_read_as_the_next_request(served: tuple[Path, int, str]) -> None:
    data, port, _ = served
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(_request(smuggled, "a-wrong-key"))
        status, _, _ = _answer(connection)
        assert status == 401
        connection.settimeout(5)
        try:
            after = connection.recv(65536)
        except TimeoutError:
            after = b""
    assert b"HTTP/1.1 200" not in after  # the body was not answered as a request of its own
    _no_traceback(data)


def test_a_slow_sender_is_cut_off_at_the_request_timeout(served: tuple[Path, int, str]) -> None:
    data, port, key = served
    body = b'{"input_data": {"input_string": [{"role": "user", "content": "hello"}]}}'
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(_request(body, key)[: -len(body) // 2])  # half the body, then nothing
        try:
            status, _, answer = _answer(connection)
        except AssertionError:
            status, answer = 0, b""  # closed without an answer
    waited = time.monotonic() - started
    assert waited < TIMEOUT_S + 10, waited
    assert status in (0, 408), answer
    models = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    status, _, listed = _send(port, models)  # and the endpoint still answers
    assert status == 200, listed
    _no_traceback(data)
