"""The local endpoints' front door: `python -m shared.backends.local.gateway GATEWAY_DIR`.

What Azure ML's endpoint ingress does for a managed online endpoint: one URL and one pair of keys
per endpoint, whatever deployments come and go behind it. The key says which endpoint is meant;
the `azureml-model-deployment` header picks a deployment, or else the endpoint's traffic split
does; the request then goes, streamed both ways, to the model server holding that deployment, with
the deployment's own key. Answers carry the header `azureml-model-deployment` naming the
deployment that served them. One gateway serves every local endpoint; it keeps its port across
restarts when it can, so endpoint URLs stay put, and leaves by itself once no endpoint is left."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from shared.backends.local.http_errors import ApiError, install_error_handlers, invalid_key
from shared.backends.local.processes import read_json, release, write_json
from shared.vocabulary import DEPLOYMENT_HEADER

log = logging.getLogger("gateway")
ALONE_EXIT_S = 30
PORT_WAIT_S = 10  # how long a new gateway waits for the last one's port before taking another
MAX_BODY_BYTES = 8 * 1024 * 1024  # above the servers' own limit, so theirs is the one clients meet
FORWARDED_HEADERS = ("content-type", "accept", DEPLOYMENT_HEADER)


@dataclass(frozen=True)
class Route:
    endpoint: str
    deployment: str
    port: int
    key: str
    folder: Path  # the endpoint's
    timeout_s: float  # the deployment's request timeout: its body must have arrived by then


_parsed: dict[Path, tuple[tuple[int, int], Any]] = {}


def _read(path: Path) -> Any:
    """The file's JSON, parsed again only when the file changed (files are replaced whole, so a
    change is a new inode): every request reads the endpoints' files, and most read the same."""
    try:
        status = path.stat()
    except OSError:  # not there (yet), or removed
        _parsed.pop(path, None)
        return None
    version = (status.st_ino, status.st_mtime_ns)
    cached = _parsed.get(path)
    if cached is None or cached[0] != version:
        _parsed[path] = cached = (version, read_json(path))
    return cached[1]


def route(endpoints_root: Path, authorization: str, deployment: str | None) -> Route:
    """Which deployment answers a request with this key (and header): read from the endpoint
    folders on every request, so a traffic change or a new deployment counts at once."""
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise invalid_key()
    found = None
    for keys_file in sorted(endpoints_root.glob("*/keys.json")):  # every key, always: timing tells nothing
        for key in (_read(keys_file) or {}).values():
            if hmac.compare_digest(presented.encode(), str(key).encode()):
                found = keys_file.parent
    if found is None:
        raise invalid_key()
    traffic: dict[str, int] = _read(found / "traffic.json") or {}
    if deployment is None:
        serving = {name: share for name, share in traffic.items() if share > 0}
        if not serving:
            raise ApiError(503, f"endpoint {found.name} has no deployment taking traffic", "server_error")
        deployment = random.choices(list(serving), weights=list(serving.values()))[0]
    elif deployment not in {folder.name for folder in (found / "deployments").glob("*")}:
        # Compared with the folders there, never joined into a path: a name like '../other' reaches nothing.
        raise ApiError(404, f"endpoint {found.name} has no deployment {deployment!r}", code="not_found")
    folder = found / "deployments" / deployment
    ready, key, spec = _read(folder / "ready.json"), _read(folder / "keys.json"), _read(folder / "deployment.json")
    if not ready or not key or not spec:
        raise ApiError(503, f"deployment {deployment} of endpoint {found.name} is not ready", "server_error")
    return Route(found.name, deployment, int(ready["port"]), key["key"], found, float(spec["request_timeout_s"]))


def build_app(endpoints_root: Path) -> FastAPI:
    import httpx

    # No read timeout of its own: the server behind cuts a request at its deployment's timeout.
    limits = httpx.Limits(max_keepalive_connections=64)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        await client.aclose()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ready"}

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str) -> Response:
        authorization, named = request.headers.get("authorization", ""), request.headers.get(DEPLOYMENT_HEADER)
        chosen = await run_in_threadpool(route, endpoints_root, authorization, named)  # file reads: off the loop
        with suppress(OSError):  # the endpoint deleted meanwhile
            (chosen.folder / "last_request").write_text(datetime.now(UTC).isoformat())
        try:  # a sender too slow for the request timeout is cut off, not left holding a slot
            body = await asyncio.wait_for(_body(request), chosen.timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request's body did not arrive within {chosen.timeout_s:.0f} s", "timeout",
                           "timeout") from None  # fmt: skip
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers |= {"authorization": f"Bearer {chosen.key}", DEPLOYMENT_HEADER: chosen.deployment}
        url = f"http://127.0.0.1:{chosen.port}/{path}" + (f"?{request.url.query}" if request.url.query else "")
        upstream = client.build_request(request.method, url, headers=headers, content=body)
        sending = asyncio.ensure_future(client.send(upstream, stream=True))
        # A client that leaves before the answer starts frees the model's slot: the server sees the
        # gateway's connection close (a streamed answer is closed as soon as a chunk cannot be sent).
        while not (await asyncio.wait({sending}, timeout=1.0))[0]:
            if await request.is_disconnected():
                sending.cancel()
                raise ApiError(499, "the client closed the request")
        try:
            answer = sending.result()
        except httpx.TransportError as error:
            raise ApiError(502, f"deployment {chosen.deployment} did not answer ({type(error).__name__})",
                           "server_error") from None  # fmt: skip
        kept = {name: value for name, value in answer.headers.items() if name in ("content-type", "cache-control")}
        kept[DEPLOYMENT_HEADER] = chosen.deployment
        return StreamingResponse(_relayed(answer), answer.status_code, headers=kept)

    return app


async def _body(request: Request) -> bytes:
    """The whole body, read before anything is sent on: the server answers a body too large for it
    with a 413, and the connection can then be watched for a client that leaves."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    return bytes(body)


async def _relayed(answer: Any) -> AsyncIterator[bytes]:
    """The server's answer as it comes; its connection closed however the relay ends."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    finally:
        await answer.aclose()


def _listener(gateway_dir: Path) -> socket.socket:
    """The port this gateway had before, if it is free: endpoint URLs outlive a restart."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    previous = (_read(gateway_dir / "gateway.json") or {}).get("port", 0)
    deadline = time.monotonic() + (PORT_WAIT_S if previous else 0)
    while True:
        try:
            listener.bind(("127.0.0.1", previous))
            return listener
        except OSError:  # a gateway on its way out may hold it a few seconds more
            if time.monotonic() > deadline:
                listener.bind(("127.0.0.1", 0))
                return listener
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    import signal

    import uvicorn

    from shared.backends.local.http_timeouts import HeaderTimeoutProtocol

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    gateway_dir = Path(argv[0]).resolve()
    endpoints_root = gateway_dir.parent / "endpoints"
    listener = _listener(gateway_dir)
    port = listener.getsockname()[1]
    # No access log: the model server behind logs every request already. A client slow to send a
    # request's headers is cut off (see http_timeouts), one slow to send its body at the deployment's timeout.
    config = uvicorn.Config(build_app(endpoints_root), http=HeaderTimeoutProtocol, log_config=None, access_log=False,
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    stop = threading.Event()
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, lambda *_: stop.set())
    web = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="http")
    web.start()
    while not server.started and web.is_alive():
        time.sleep(0.05)
    if not server.started:
        log.error("the gateway did not start on port %s", port)
        return 1
    write_json(gateway_dir / "gateway.json", {"port": port, "pid": os.getpid()})
    log.info("gateway on port %s", port)
    alone_since = time.monotonic()
    while not stop.wait(1.0) and web.is_alive():
        with suppress(OSError):
            if any(endpoints_root.glob("*/endpoint.json")):
                alone_since = time.monotonic()
        if time.monotonic() - alone_since > ALONE_EXIT_S:
            log.info("no endpoint left; stopping")
            # The lock and the pid file first: a deploy from now on starts a new gateway (on this
            # port, once this one has let it go); the pid file goes only if it is still this one's.
            release()
            with suppress(OSError):
                if (gateway_dir / "gateway.pid").read_text().strip() == str(os.getpid()):
                    (gateway_dir / "gateway.pid").unlink()
            break
    server.should_exit = True
    web.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
