"""A local model server: `python -m shared.backends.local.serve SERVER_DIR`.

One process per model held in memory, serving every deployment that uses it: a merged model serves
its one deployment; an adapter-only base serves each deployment as a LoRA adapter on it, picked
per request. Deployments are folders (see `endpoints`); the server keeps in step with them, loading
a deployment's adapter when its folder appears and dropping it when the folder goes. Clients reach
it through the endpoints' gateway (see `gateway`), which picks the deployment and sends that
deployment's own key.

Routes, behind each deployment's key: `POST /score` (Azure ML's chat schema), `POST
/v1/chat/completions` (OpenAI's, streaming included), `GET /v1/models`, `GET /health`. OpenAI's
`model` field, when sent, must name the endpoint; Azure ML's `azureml-model-deployment` header,
when sent, the deployment. Keys are compared in constant time and never logged; every failure is
JSON in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shared.backends.local import served_model
from shared.backends.local.engine import BatchingEngine, Generation, Step
from shared.backends.local.http_errors import ApiError, install_error_handlers, invalid_key
from shared.backends.local.processes import read_json, write_json
from shared.backends.local.scoring import BadRequest, ChatRequest, parse_openai, parse_score
from shared.vocabulary import DEPLOYMENT_HEADER

log = logging.getLogger("endpoint")
MAX_BODY_BYTES = 1024 * 1024
SYNC_INTERVAL_S = 0.25
ALONE_EXIT_S = 30  # a server whose deployments are all gone (its deleter died mid-way) leaves by itself


@dataclass(frozen=True)
class Tenant:
    """A deployment this server serves."""

    endpoint: str
    deployment: str
    created_at: str
    directory: Path
    keys: tuple[str, ...]
    adapter: str | None  # the adapter's name in the model, None for a merged model
    time_limit_s: float


class Tenants:
    """The deployments whose `deployment.json` names this server, kept in step with their folders."""

    def __init__(self, server_dir: Path, loaded: served_model.LoadedModel, engine: BatchingEngine,
                 shares_base: bool) -> None:  # fmt: skip
        self.server_id = server_dir.name
        self.root = server_dir.parent.parent / "endpoints"
        self.loaded, self.engine, self.shares_base = loaded, engine, shares_base
        self.by_folder: dict[Path, Tenant] = {}
        self.port = 0

    def authorize(self, header: str) -> Tenant:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise invalid_key()
        # Compare against every key of every deployment, always: timing says nothing about a match.
        found = None
        for tenant in list(self.by_folder.values()):
            for key in tenant.keys:
                if hmac.compare_digest(presented.encode(), key.encode()):
                    found = tenant
        if found is None:
            raise invalid_key()
        return found

    def sync(self) -> None:
        wanted: dict[Path, dict[str, Any]] = {}
        for spec_file in self.root.glob("*/deployments/*/deployment.json"):
            spec = read_json(spec_file)
            if spec is not None and spec.get("server") == self.server_id:
                wanted[spec_file.parent] = spec
        for folder, tenant in list(self.by_folder.items()):
            if wanted.get(folder, {}).get("created_at") != tenant.created_at:
                self._remove(folder)
        for folder, spec in wanted.items():
            if folder not in self.by_folder and not (folder / "failed.json").exists():
                self._add(folder, spec)

    def _add(self, folder: Path, spec: dict[str, Any]) -> None:
        label = f"{spec['endpoint']}/{spec['name']}"
        try:
            keys = json.loads((folder / "keys.json").read_text())
            # Adapter names become module attribute names: no '.' or '/'; '__' is in no endpoint name.
            adapter = f"{spec['endpoint']}__{spec['name']}" if self.shares_base else None
            if adapter:
                with self.engine.lock:
                    served_model.add_adapter(self.loaded, adapter, Path(spec["model_path"]))
                    self.engine.model = self.loaded.model
        except Exception as error:
            log.exception("deployment %s could not be loaded", label)
            write_json(folder / "failed.json", {"reason": f"{type(error).__name__}: {error}"[:500]})
            return
        self.by_folder[folder] = Tenant(spec["endpoint"], spec["name"], spec["created_at"], folder,
                                        (keys["key"],), adapter, float(spec["request_timeout_s"]))  # fmt: skip
        write_json(folder / "ready.json", {"port": self.port})
        log.info("deployment %s serves %s:%s", label, spec["model_name"], spec["model_version"])

    def _remove(self, folder: Path) -> None:
        tenant = self.by_folder.pop(folder)
        if tenant.adapter:
            with self.engine.lock:
                served_model.remove_adapter(self.loaded, tenant.adapter)
        log.info("deployment %s/%s removed", tenant.endpoint, tenant.deployment)

    def keep_in_step(self, stop: threading.Event) -> None:
        alone_since = time.monotonic()
        while not stop.wait(SYNC_INTERVAL_S):
            try:
                self.sync()
            except Exception:
                log.exception("could not read the endpoints")
            if self.by_folder:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > ALONE_EXIT_S:
                log.info("no deployment left; stopping")
                stop.set()


def build_app(tenants: Tenants) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    engine = tenants.engine

    install_error_handlers(app)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return ApiError(400, str(error), code=error.code, param=error.param).response()

    def tenant_for(request: Request) -> Tenant:
        return tenants.authorize(request.headers.get("authorization", ""))

    def check_model(tenant: Tenant, named: str | None) -> None:
        if named and named != tenant.endpoint:
            raise ApiError(404, f"The model '{named}' does not exist or you do not have access to it.",
                           code="model_not_found", param="model")  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ready", "requests_in_flight": engine.in_flight}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(tenant_for(request))]}

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        tenant = tenant_for(request)
        check_model(tenant, model)
        return _model_card(tenant)

    @app.post("/score")
    async def score(request: Request) -> Response:
        tenant = tenant_for(request)
        named = request.headers.get(DEPLOYMENT_HEADER)
        if named and named != tenant.deployment:
            raise ApiError(404, f"endpoint {tenant.endpoint} has no deployment {named!r}", code="not_found")
        chat = parse_score(await _json_body(request))
        text, _ = await _collect(_start(engine, tenants.loaded, tenant, chat), request)
        return JSONResponse({"output": text})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        tenant = tenant_for(request)
        chat = parse_openai(await _json_body(request))
        check_model(tenant, chat.model)
        steps = _start(engine, tenants.loaded, tenant, chat)
        completion = _Completion(tenant.endpoint)
        if chat.stream:
            return StreamingResponse(completion.stream(steps, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        text, last = await _collect(steps, request)
        return JSONResponse(completion.whole(text, last))

    return app


def _model_card(tenant: Tenant) -> dict[str, Any]:
    created = int(datetime.fromisoformat(tenant.created_at).timestamp())
    return {"id": tenant.endpoint, "object": "model", "created": created, "owned_by": "local"}


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "the Content-Length header must be a whole number")
    if length is not None and int(length) > MAX_BODY_BYTES:
        if int(length) <= 8 * MAX_BODY_BYTES:  # read it, so the client hears the 413, not a broken pipe
            async for _ in request.stream():
                pass
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"malformed JSON: {error}") from None


@dataclass
class _Steps:
    """A request handed to the engine: its steps arrive on `queue` from the engine's thread."""

    queue: asyncio.Queue[Step]
    work: Generation
    prompt_tokens: int

    async def __aiter__(self) -> AsyncGenerator[Step]:
        try:
            while True:
                step = await self.queue.get()
                yield step
                if step.finish_reason:
                    return
        finally:  # the client went away (or the reply is done): free the slot
            self.work.canceled.set()


def _start(engine: BatchingEngine, loaded: served_model.LoadedModel, tenant: Tenant, chat: ChatRequest) -> _Steps:
    prompt = loaded.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]  # fmt: skip
    if len(prompt) >= engine.context_length:
        most = engine.context_length - 1
        raise ApiError(400, f"the conversation is {len(prompt)} tokens; this model reads at most {most}",
                       code="context_length_exceeded", param="messages")  # fmt: skip
    (tenant.directory / "last_request").write_text(datetime.now(UTC).isoformat())
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[Step] = asyncio.Queue()
    work = Generation(list(prompt), tenant.adapter, chat.max_new_tokens, chat.sampling, chat.stop,
                      tenant.time_limit_s, lambda step: loop.call_soon_threadsafe(steps.put_nowait, step))  # fmt: skip
    engine.submit(work)
    return _Steps(steps, work, len(prompt))


async def _collect(steps: _Steps, request: Request) -> tuple[str, Step]:
    """The whole answer; gives up the request's slot if the client disconnects while it waits.
    The wait for the next step is never cancelled (that would end the steps' generator): it is
    watched, with a look at the connection every second."""
    texts = []
    iterator = aiter(steps)
    while True:
        following = asyncio.ensure_future(anext(iterator))
        while not (await asyncio.wait({following}, timeout=1.0))[0]:
            if await request.is_disconnected():
                following.cancel()
                await iterator.aclose()
                raise ApiError(499, "the client closed the request")
        try:
            step = following.result()
        except StopAsyncIteration:
            raise ApiError(500, "the model stopped without an answer", "server_error") from None
        texts.append(step.text)
        if step.finish_reason:
            await iterator.aclose()
            _raise_if_failed(step, steps.work.time_limit_s)
            return "".join(texts), step


def _raise_if_failed(step: Step, time_limit_s: float) -> None:
    if step.finish_reason == "timeout":
        raise ApiError(408, f"the request took longer than {time_limit_s:.0f} s", "timeout", "timeout")
    if step.finish_reason == "error":
        raise ApiError(500, "the model failed to answer; see the endpoint log", "server_error")


class _Completion:
    """OpenAI's chat completion and chunk objects for one request."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def _envelope(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    @staticmethod
    def _usage(step: Step) -> dict[str, int]:
        return {"prompt_tokens": step.prompt_tokens, "completion_tokens": step.completion_tokens,
                "total_tokens": step.prompt_tokens + step.completion_tokens}  # fmt: skip

    def whole(self, text: str, last: Step) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}
        return self._envelope("chat.completion", choices=[choice], usage=self._usage(last))

    async def stream(self, steps: _Steps, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: the role first, content deltas, a last choice
        chunk with the finish reason, a usage chunk if asked for, then `[DONE]`."""
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _event(self._envelope("chat.completion.chunk", choices=[choice], **extra))

        yield chunk({"role": "assistant", "content": ""})
        async for step in steps:
            if step.text:
                yield chunk({"content": step.text})
            if step.finish_reason in ("timeout", "error"):
                try:
                    _raise_if_failed(step, steps.work.time_limit_s)
                except ApiError as error:
                    yield _event({"error": {"message": str(error), "type": error.kind, "code": error.code}})
                return
            if step.finish_reason:
                yield chunk({}, step.finish_reason)
                if include_usage:
                    yield _event(self._envelope("chat.completion.chunk", choices=[], usage=self._usage(step)))
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def main(argv: list[str]) -> int:
    import uvicorn

    from shared.backends.local.http_timeouts import HeaderTimeoutProtocol

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server_dir = Path(argv[0]).resolve()
    spec = json.loads((server_dir / "server.json").read_text())
    loaded = served_model.load(Path(spec["model_path"]))
    engine = BatchingEngine(loaded.model, loaded.tokenizer, loaded.stop_ids, loaded.device)
    tenants = Tenants(server_dir, loaded, engine, served_model.is_adapter(Path(spec["model_path"])))
    # IPPROTO_TCP named outright: asyncio turns Nagle's algorithm off only on sockets that say they
    # are TCP, and with it on, every reply on a kept-alive connection waited 40 ms for an ACK.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    tenants.port = listener.getsockname()[1]
    # A client slow to send a request's headers is cut off (see http_timeouts).
    config = uvicorn.Config(build_app(tenants), http=HeaderTimeoutProtocol, log_config=None, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    stop = threading.Event()
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, lambda *_: stop.set())

    def follow_endpoints() -> None:
        while not server.started and not stop.wait(0.05):
            pass
        tenants.keep_in_step(stop)

    web = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="http")
    web.start()
    threading.Thread(target=follow_endpoints, name="endpoints", daemon=True).start()
    log.info("server %s holds %s on port %s", server_dir.name, spec["model_path"], tenants.port)
    engine.run(stop)  # on the main thread (see BatchingEngine.run)
    server.should_exit = True
    web.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
