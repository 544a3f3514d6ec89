"""A local Functions host for users without Core Tools: `python -m shared.cli host`.

It loads `function_app` and runs its functions from their own binding metadata, as the real host
does: blob triggers fire for new or changed blobs (receipts kept by ETag in the
`azure-webjobs-hosts` container, so a restart does not fire them again), timer triggers on their
NCRONTAB schedules, and Event Grid triggers receive what is posted to a local topic endpoint,
with retries and backoff, then dead-lettering to a container after the last attempt.
Azurite sends no Event Grid events, so blobs are found by listing."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from queue import Empty, Queue
from typing import Any, ClassVar
from urllib.parse import parse_qs

from shared.backends.local.httpserver import ReplyingHandler
from shared.backends.local.settings import LOCAL_TOPIC
from shared.dev.blob_listing import list_blobs
from shared.dev.eventgrid_topic import LocalTopic
from shared.ncrontab import Schedule
from shared.settings import STORAGE_SETTING, get_settings
from shared.storage import blob_service, container
from shared.vocabulary import DATASETS_CONTAINER, PREPARED_CONTAINER

log = logging.getLogger("localhost")
RECEIPTS_CONTAINER = "azure-webjobs-hosts"
DEAD_LETTER_CONTAINER = "dead-letter"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Trigger:
    function_name: str
    kind: str  # blobTrigger, timerTrigger, eventGridTrigger, httpTrigger
    binding: dict[str, Any]
    call: Callable[..., Any]


def _resolve(value: str) -> str:
    """`%NAME%` app-setting references in binding values, as the host resolves them."""

    def setting(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in os.environ:
            return os.environ[name]
        if name == "JANITOR_SCHEDULE":
            return get_settings().janitor_schedule
        raise KeyError(f"binding refers to app setting {name}, which is not set")

    return re.sub(r"%([^%]+)%", setting, value)


def load_triggers(module_name: str = "function_app") -> list[Trigger]:
    """Every function of the app with its trigger binding, from the app's own metadata."""
    # A fresh import: the functions library lets an app instance be indexed only once.
    module = (
        importlib.reload(sys.modules[module_name])
        if module_name in sys.modules
        else importlib.import_module(module_name)
    )
    triggers = []
    for function in module.app.get_functions():
        bindings = json.loads(function.get_function_json())["bindings"]
        (trigger,) = [b for b in bindings if b["type"].endswith("Trigger")]
        triggers.append(Trigger(function.get_function_name(), trigger["type"], trigger, function.get_user_function()))
    return triggers


@dataclass(frozen=True)
class _ModelBindingData:
    """The worker's ModelBindingData message: what the host sends for an SDK-type binding."""

    content: str
    version: str = "1.0"
    source: str = "AzureStorageBlobs"
    content_type: str = "application/json"


def blob_trigger_argument(trigger: Trigger, container: str, name: str) -> Any:
    """What the worker passes a blob-triggered function whose parameter is an SDK type: the client
    the binding extension builds from the host's model binding data (the connection setting's
    name, the container and the blob name; never the content)."""
    from azurefunctions.extensions.base import Datum, get_binding_registry

    content = json.dumps({"Connection": trigger.binding["connection"], "ContainerName": container, "BlobName": name})
    converter = get_binding_registry().get(trigger.kind)
    pytype = inspect.signature(trigger.call).parameters[trigger.binding["name"]].annotation
    return converter.decode(Datum(_ModelBindingData(content), "model_binding_data"), trigger_metadata={}, pytype=pytype)


def invoke(trigger: Trigger, argument: Any, about: str) -> Any:
    """Call a function as the host does, logging one line for the call and its outcome."""
    started = time.monotonic()
    try:
        result = trigger.call(argument)
    except Exception as error:
        log.info("%s (%s): failed after %.1f s: %s", trigger.function_name, about, time.monotonic() - started, error)
        raise
    log.info("%s (%s): succeeded in %.1f s", trigger.function_name, about, time.monotonic() - started)
    return result


def _route_pattern(route: str) -> re.Pattern[str]:
    """A Functions route template (`runs/{run_id?}`) as a regular expression with named groups."""
    parts = []
    for segment in route.strip("/").split("/"):
        parameter = re.fullmatch(r"\{(\w+)(\?)?\}", segment)
        if parameter is None:
            parts.append("/" + re.escape(segment))
        elif parameter.group(2):
            parts.append(f"(?:/(?P<{parameter.group(1)}>[^/]+))?")
        else:
            parts.append(f"/(?P<{parameter.group(1)}>[^/]+)")
    return re.compile("".join(parts).removeprefix("/"))


def _event_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def load_local_settings(path: Path = REPO_ROOT / "local.settings.json") -> None:
    """Like Core Tools: `local.settings.json` Values become environment variables (never
    overriding ones already set)."""
    if path.exists():
        for name, value in json.loads(path.read_text()).get("Values", {}).items():
            os.environ.setdefault(name, str(value))


class _HttpFunctions(ReplyingHandler):
    """Calls the HTTP-triggered function whose route and methods match, with a real HttpRequest."""

    routes: ClassVar[list[tuple[re.Pattern[str], Trigger]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http %s", format % args)

    def _dispatch(self) -> None:
        import azure.functions as func

        path, _, query = self.path.partition("?")
        for pattern, trigger in self.routes:
            match = pattern.fullmatch(path.removeprefix("/api/"))
            if not match or self.command not in [m.upper() for m in trigger.binding.get("methods", [self.command])]:
                continue
            request = func.HttpRequest(
                method=self.command,
                url=f"http://127.0.0.1{self.path}",
                headers=dict(self.headers),
                params={key: values[0] for key, values in parse_qs(query).items()},
                route_params={key: value for key, value in match.groupdict().items() if value},
                body=self.rfile.read(int(self.headers.get("Content-Length") or 0)),
            )
            response = invoke(trigger, request, f"{self.command} {path}")
            self.send_body(response.status_code, response.get_body(), response.mimetype or "application/json")
            return
        self.send_error(404, "no function serves this route")

    do_GET = do_POST = _dispatch


class LocalHost:
    def __init__(self, poll_interval_s: float = 1.0, delivery_attempts: int = 5, backoff_s: float = 1.0) -> None:
        self.poll_interval_s, self.delivery_attempts, self.backoff_s = poll_interval_s, delivery_attempts, backoff_s
        # JOB_EVENTS_TOPIC_KEY, when set, is the topic's key (so other tools can post to it).
        self.topic_key = os.environ.get("JOB_EVENTS_TOPIC_KEY") or uuid.uuid4().hex
        self._stop = threading.Event()
        self._events: Queue[dict[str, Any]] = Queue()
        self._threads: list[threading.Thread] = []
        self._blob_pool = ThreadPoolExecutor(4, thread_name_prefix="blob-trigger")
        self._in_flight: set[tuple[str, str, str]] = set()
        self._odd_names: dict[str, dict[str, tuple[str, str]]] = {}  # per container: odd name after a marker
        self._unlistable_told: set[str] = set()  # told once each
        self._receipts: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None
        self.topic = LocalTopic(self.topic_key, self._events.put, topic=LOCAL_TOPIC)
        # The trainer reports job status, and the app its lifecycle events, to this host's topic.
        os.environ["JOB_EVENTS_TOPIC_ENDPOINT"] = self.topic.endpoint
        os.environ["JOB_EVENTS_TOPIC_KEY"] = self.topic_key
        os.environ.setdefault("LIFECYCLE_TOPIC_ENDPOINT", self.topic.endpoint)
        os.environ.setdefault("LIFECYCLE_TOPIC_KEY", self.topic_key)
        get_settings.cache_clear()
        self.settings = get_settings()
        if self.settings.storage.connection_string:
            # The blob binding extension reads the connection by its setting's name, as in Azure.
            os.environ.setdefault(STORAGE_SETTING, self.settings.storage.connection_string)
        self.triggers = load_triggers()
        with open(REPO_ROOT / "host.json") as host_json:
            self.blob_attempts = json.load(host_json)["extensions"]["blobs"]["poisonBlobThreshold"]

    def start(self) -> LocalHost:
        # The host's own containers, and the app's: an upload needs `datasets/` to exist.
        for name in (RECEIPTS_CONTAINER, DEAD_LETTER_CONTAINER, DATASETS_CONTAINER, PREPARED_CONTAINER):
            container(self.settings.storage, name)
        for trigger in self.triggers:
            if trigger.kind == "blobTrigger":
                self._spawn(self._watch_blobs, trigger)
            elif trigger.kind == "timerTrigger":
                self._spawn(self._run_timer, trigger)
        for _ in range(4):
            self._spawn(self._deliver_events, None)
        if self.settings.ml_backend == "local":  # the host runs the local trainers' jobs: show them
            self._spawn(self._log_training, None)
        log.info("local host: Event Grid topic at %s; functions: %s", self.topic.endpoint,
                 ", ".join(f"{t.function_name} ({t.kind})" for t in self.triggers))  # fmt: skip
        return self

    def serve_http(self, port: int = 7071) -> str:
        """Serve the HTTP-triggered functions under /api/ (as `func start` does, on port 7071 when
        free); keys are not checked locally, as Core Tools does not check them."""
        routes = [(_route_pattern(t.binding["route"]), t) for t in self.triggers if t.kind == "httpTrigger"]
        handler = type("FunctionRoutes", (_HttpFunctions,), {"routes": routes})
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._http = server
        threading.Thread(target=server.serve_forever, name="host-http", daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/api/"

    def stop(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=30)
        self._blob_pool.shutdown(wait=True)
        self.topic.close()

    def _spawn(self, target: Callable[[Trigger | None], None], trigger: Trigger | None) -> None:
        thread = threading.Thread(target=target, args=(trigger,), daemon=True,
                                  name=f"host-{trigger.function_name if trigger else 'events'}")  # fmt: skip
        thread.start()
        self._threads.append(thread)

    # Blob triggers: list, compare with receipts, fire for new ETags.
    def _receipt_name(self, function: str, container: str, name: str, etag: str) -> str:
        return f"blobreceipts/local/{function}/{container}/{name}/{etag}"

    def _watch_blobs(self, trigger: Trigger | None) -> None:
        assert trigger is not None
        container = _resolve(trigger.binding["path"]).split("/", 1)[0]
        service = blob_service(self.settings.storage)
        receipts = service.get_container_client(RECEIPTS_CONTAINER)
        while not self._stop.is_set():
            try:
                client = service.get_container_client(container)
                odd, known = partial(self._unlistable, trigger, client), self._odd_names.setdefault(container, {})
                blobs = list(list_blobs(client, odd, known)) if client.exists() else []
                for blob in blobs:
                    etag = str(blob.etag).strip('"')
                    key = (trigger.function_name, blob.name, etag)
                    with self._lock:
                        if key in self._receipts or key in self._in_flight:
                            continue
                    receipt = self._receipt_name(trigger.function_name, container, blob.name, etag)
                    if receipts.get_blob_client(receipt).exists():
                        with self._lock:
                            self._receipts.add(key)
                        continue
                    with self._lock:
                        self._in_flight.add(key)
                    self._blob_pool.submit(self._fire_blob, trigger, container, blob, etag, key, receipt)
            except Exception:
                log.exception("listing %s failed; trying again", container)
            self._stop.wait(self.poll_interval_s)

    def _unlistable(self, trigger: Trigger, client: Any, start: str) -> None:
        """A blob the storage emulator cannot list (its name holds a control character, which Azure
        would list encoded): recorded once in the dead letters with the reason, and skipped."""
        blob = f"{client.container_name}/{start}"
        with self._lock:
            if blob in self._unlistable_told:
                return
            self._unlistable_told.add(blob)
        reason = (f"a blob in {client.container_name}/ whose name starts {start!r} and then holds a character "
                  "XML cannot carry (a control character) cannot be listed by the storage emulator; it is "
                  "skipped: rename it")  # fmt: skip
        self._dead_letter(f"{trigger.function_name}/unlistable-{uuid.uuid4().hex}.json",
                          {"container": client.container_name, "name_starts": start, "error": reason})  # fmt: skip

    def _fire_blob(self, trigger: Trigger, container: str, blob: Any, etag: str, key: Any, receipt: str) -> None:
        service = blob_service(self.settings.storage)
        error: Exception | None = None
        for attempt in range(1, self.blob_attempts + 1):
            try:
                invoke(trigger, blob_trigger_argument(trigger, container, blob.name), f"{container}/{blob.name}")
                error = None
                break
            except Exception as failure:
                error = failure
                log.warning("%s failed on %s (attempt %d of %d): %s", trigger.function_name, blob.name,
                            attempt, self.blob_attempts, failure)  # fmt: skip
        if error is not None:  # poison: the host gives up on this blob version and says so
            self._dead_letter(f"{trigger.function_name}/{blob.name}/{etag}.json",
                              {"blob": f"{container}/{blob.name}", "etag": etag, "error": str(error)})  # fmt: skip
        service.get_container_client(RECEIPTS_CONTAINER).upload_blob(receipt, b"", overwrite=True)
        with self._lock:
            self._receipts.add(key)
            self._in_flight.discard(key)

    # Timer triggers.
    def _run_timer(self, trigger: Trigger | None) -> None:
        from azure.functions.timer import TimerRequest

        assert trigger is not None
        schedule = Schedule(_resolve(trigger.binding["schedule"]))
        due = schedule.next_after(datetime.now(UTC))
        while not self._stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
            late = (datetime.now(UTC) - due).total_seconds()
            try:
                invoke(trigger, TimerRequest(past_due=late > 5, schedule_status={"Last": due.isoformat()}), "timer")
            except Exception:
                log.exception("%s failed", trigger.function_name)
            due = schedule.next_after(datetime.now(UTC))

    def _log_training(self, _: Trigger | None, every_s: float = 5.0) -> None:
        """A line per running local job every few seconds: steps, loss, tokens/s, time left."""
        from shared.backends.local.backend import LocalBackend
        from shared.backends.local.jobs import progress_line

        backend = LocalBackend(self.settings)
        shown: dict[str, Any] = {}
        while not self._stop.wait(every_s):
            for job in backend.job_names():
                progress = backend.job_progress(job)
                if progress and progress != shown.get(job) and not backend.job_status(job).status.is_terminal:
                    log.info("training %s: %s", job, progress_line(progress))
                    shown[job] = progress

    # Event Grid triggers: delivery with retries, backoff and dead-lettering.
    def _deliver_events(self, _: Trigger | None) -> None:
        import azure.functions as func

        grid_functions = [t for t in self.triggers if t.kind == "eventGridTrigger"]
        while not self._stop.is_set():
            try:
                raw = self._events.get(timeout=0.2)
            except Empty:
                continue
            try:  # one bad event must never stop the worker: it goes to the dead-letter container
                event = func.EventGridEvent(
                    id=str(raw.get("id") or uuid.uuid4()),
                    data=raw.get("data") or {},
                    topic=str(raw.get("topic", LOCAL_TOPIC)),
                    subject=str(raw.get("subject", "")),
                    event_type=str(raw.get("eventType", "")),
                    event_time=_event_time(raw.get("eventTime")),
                    data_version=str(raw.get("dataVersion", "")),
                )
                for trigger in grid_functions:
                    self._deliver(trigger, event, raw)
            except Exception as failure:
                log.exception("an event could not be delivered")
                self._dead_letter(f"undeliverable/{uuid.uuid4().hex}.json", {"event": raw, "error": str(failure)})

    def _deliver(self, trigger: Trigger, event: Any, raw: dict[str, Any]) -> None:
        for attempt in range(1, self.delivery_attempts + 1):
            try:
                invoke(trigger, event, f"{event.event_type} {event.subject}")
                return
            except Exception as failure:
                log.warning("%s failed on event %s (attempt %d of %d): %s", trigger.function_name, event.id,
                            attempt, self.delivery_attempts, failure)  # fmt: skip
                if attempt == self.delivery_attempts:
                    self._dead_letter(f"{trigger.function_name}/{event.id}.json",
                                      {"event": raw, "error": str(failure), "attempts": attempt})  # fmt: skip
                elif self._stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                    return

    def _dead_letter(self, name: str, payload: dict[str, Any]) -> None:
        try:
            container = blob_service(self.settings.storage).get_container_client(DEAD_LETTER_CONTAINER)
            container.upload_blob(name, json.dumps(payload, indent=2, default=str).encode(), overwrite=True)
        except Exception:  # storage out of reach: the log is then the only record, and the host goes on
            log.exception("could not dead-letter %s: %s", name, json.dumps(payload, default=str)[:2000])
            return
        log.error("dead-lettered %s/%s", DEAD_LETTER_CONTAINER, name)


def run_host(start_azurite: bool) -> int:
    """The `host` command: serve until interrupted."""
    from shared.dev.azurite import HOST_STORE
    from shared.dev.azurite import start_azurite as launch

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops what the host started, as Ctrl-C does

    # Before anything starts: a SIGTERM at any moment stops what was started so far.
    signal.signal(signal.SIGTERM, stop)
    load_local_settings()
    log.setLevel(logging.INFO)  # one line per function call, whatever the CLI's level
    azurite, host = None, None
    try:
        if start_azurite:
            azurite = launch(location=HOST_STORE)
            os.environ[STORAGE_SETTING] = azurite.connection_string
            print(f"Azurite: {azurite.connection_string}", flush=True)
        host = LocalHost().start()
        api = host.serve_http()
        print(f"host running; runs at {api}runs; Ctrl-C stops", flush=True)
        print(f"Event Grid topic {host.topic.endpoint} (aeg-sas-key {host.topic_key})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stopping short
        if host:
            host.stop()
        if azurite:
            azurite.stop()
    return 0
