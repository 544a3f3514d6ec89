"""The local host runs the real app from its binding metadata: schedules, routes, blob receipts,
Event Grid delivery with retries and dead-lettering."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.eventgrid import EventGridEvent, EventGridPublisherClient
from azure.storage.blob import BlobServiceClient

from shared.backends.local.settings import local_settings
from shared.dev.localhost import DEAD_LETTER_CONTAINER, RECEIPTS_CONTAINER, LocalHost, Trigger, _route_pattern
from shared.ledger import RunState, Upload, open_ledger
from shared.ncrontab import Schedule, ScheduleError
from shared.settings import Settings
from shared.storage import blob_service, container
from shared.vocabulary import DATASETS_CONTAINER, RUN_STATUS_CHANGED

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("expression", "after", "fires"),
    [
        ("0 */10 * * * *", datetime(2026, 11, 24, 13, 21, 5), datetime(2026, 11, 24, 13, 30)),
        ("*/5 * * * * *", datetime(2026, 11, 24, 13, 21, 5), datetime(2026, 11, 24, 13, 21, 10)),
        ("0 30 9 * * 1-5", datetime(2026, 11, 28, 10, 0), datetime(2026, 11, 30, 9, 30)),  # Saturday -> Monday
        ("0 0 0 29 2 *", datetime(2026, 3, 1), datetime(2028, 2, 29)),
        # NCrontab matches both day fields (Unix cron: either): the next 1st that is a Sunday.
        ("0 0 12 1 * 0", datetime(2026, 11, 24), datetime(2027, 8, 1, 12)),
        ("0 30 9 * * Mon-Fri", datetime(2026, 11, 28, 10, 0), datetime(2026, 11, 30, 9, 30)),
        ("0 0 6 1 Jan,Jul *", datetime(2026, 11, 24), datetime(2027, 1, 1, 6)),
        ("0 0 6 * * saturday", datetime(2026, 11, 24), datetime(2026, 11, 28, 6)),
        ("*/10 * * * *", datetime(2026, 11, 24, 13, 21, 5), datetime(2026, 11, 24, 13, 30)),  # five fields: no seconds
    ],
)
def test_ncrontab_next_occurrence(expression: str, after: datetime, fires: datetime) -> None:
    assert Schedule(expression).next_after(after) == fires


@pytest.mark.parametrize(
    "expression", ["* * * *", "0 61 * * * *", "0 0 0 31 2 *", "0 0 9 L * *", "0 0 9 ? * *", "0 0 9 * * 1#2",
                   "0 0 9 * * 7", "0 0 9 * * Funday", "0 0 Mon * * *"]
)  # fmt: skip
def test_bad_schedules_are_refused(expression: str) -> None:
    with pytest.raises(ScheduleError):
        Schedule(expression).next_after(datetime(2026, 1, 1))


def test_route_templates() -> None:
    pattern = _route_pattern("runs/{run_id?}")
    assert pattern.fullmatch("runs").groupdict() == {"run_id": None}
    assert pattern.fullmatch("runs/abc-1").groupdict() == {"run_id": "abc-1"}
    assert pattern.fullmatch("runs/a/b") is None


@pytest.fixture
def host(app_settings: Settings, clean_env: pytest.MonkeyPatch) -> Iterator[LocalHost]:
    clean_env.setenv("JANITOR_SCHEDULE", "*/1 * * * * *")
    started = LocalHost(poll_interval_s=0.2, delivery_attempts=3, backoff_s=0.05).start()
    yield started
    started.stop()


def test_the_host_fires_blob_triggers_once_per_version_and_serves_routes(host: LocalHost) -> None:
    settings = host.settings
    name = f"host-{uuid.uuid4().hex[:8]}.jsonl"
    container(settings.storage, DATASETS_CONTAINER).upload_blob(name, b'{"not": "chat"}\n')
    ledger = open_ledger(settings)
    deadline = time.monotonic() + 30
    while not (runs := ledger.by_blob(DATASETS_CONTAINER, name)) or runs[0].state != RunState.REJECTED:
        assert time.monotonic() < deadline, "the blob trigger did not fire"
        time.sleep(0.2)
    time.sleep(1)  # several more polls: the receipt stops a second firing
    assert len(ledger.by_blob(DATASETS_CONTAINER, name)) == 1
    receipts = [b.name for b in blob_service(settings.storage).get_container_client(RECEIPTS_CONTAINER).list_blobs()]
    assert any(f"/{DATASETS_CONTAINER}/{name}/" in receipt for receipt in receipts)

    api = host.serve_http(port=0)
    with urllib.request.urlopen(f"{api}runs/{runs[0].run_id}", timeout=10) as reply:
        assert json.loads(reply.read())["state"] == "rejected"


def test_posted_job_events_reach_the_job_events_function(host: LocalHost, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localhost")
    ledger = open_ledger(host.settings)
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, "posted.jsonl", uuid.uuid4().hex), "received")
    run = ledger.advance(ledger.advance(run, RunState.PREPARED, "prepared"), RunState.SUBMITTED, "submitted",
                         job_name=f"ft-{run.run_id}")  # fmt: skip
    failed = EventGridEvent(subject=f"experiments/x/runs/{run.job_name}", event_type=RUN_STATUS_CHANGED,
                            data={"runId": run.job_name, "runStatus": "Failed", "runType": "azureml.PipelineRun",
                                  "error": "out of memory"}, data_version="2")  # fmt: skip
    EventGridPublisherClient(host.topic.endpoint, AzureKeyCredential(host.topic_key)).send([failed])
    deadline = time.monotonic() + 30
    while (current := ledger.get(run.run_id)).state != RunState.FAILED:
        assert time.monotonic() < deadline, "the event was not delivered"
        time.sleep(0.2)
    assert current.reason == "out of memory"
    prefix = f"job_events ({RUN_STATUS_CHANGED} "
    while not [r for r in caplog.records if r.getMessage().startswith(prefix)]:  # logged just after
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (call,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    assert re.fullmatch(
        rf"job_events \({RUN_STATUS_CHANGED} experiments/x/runs/{run.job_name}\): succeeded in [\d.]+ s", call
    )
    with pytest.raises(HttpResponseError, match="Unauthorized"):
        EventGridPublisherClient(host.topic.endpoint, AzureKeyCredential("wrong")).send([failed])


def test_a_blob_name_the_emulator_cannot_list_is_recorded_and_blocks_no_upload(host: LocalHost) -> None:
    """Azurite answers 500 to a listing that holds a control character in a name (Azure encodes
    it): the odd upload is recorded with the reason and skipped; uploads before and after it
    fire as usual."""
    datasets = container(host.settings.storage, DATASETS_CONTAINER)
    tag = uuid.uuid4().hex[:8]
    names = [f"odd-{tag}-a.jsonl", f"odd-{tag}-b\x01c.jsonl", f"odd-{tag}-d.jsonl"]
    ledger = open_ledger(host.settings)
    dead = blob_service(host.settings.storage).get_container_client(DEAD_LETTER_CONTAINER)
    try:
        for name in names:
            datasets.upload_blob(name, b'{"not": "chat"}\n')
        deadline = time.monotonic() + 90
        while not all(ledger.by_blob(DATASETS_CONTAINER, name) for name in (names[0], names[2])):
            assert time.monotonic() < deadline, "uploads around the odd one did not fire"
            time.sleep(0.2)
        letters = [json.loads(dead.download_blob(b.name).readall())
                   for b in dead.list_blobs(name_starts_with="dataset_intake/unlistable-")]  # fmt: skip
        assert any(letter["name_starts"] == f"odd-{tag}-b" and "control character" in letter["error"]
                   for letter in letters)  # fmt: skip
        later = f"odd-{tag}-e.jsonl"
        datasets.upload_blob(later, b'{"not": "chat"}\n')
        while not ledger.by_blob(DATASETS_CONTAINER, later):
            assert time.monotonic() < deadline, "an upload after the odd one did not fire"
            time.sleep(0.2)
    finally:
        datasets.delete_blob(names[1])  # other tests list this container


def test_the_odd_name_is_found_from_where_listing_works_again() -> None:
    from shared.dev.blob_listing import find_odd_name

    names = sorted(["a\x01", "a.jsonl", "b\x02é.jsonl", "bz", "c.jsonl"])
    for odd, after, start, skip in (("a\x01", "", "a", "a\t"), ("b\x02é.jsonl", "a.jsonl", "b", "b\t")):

        def listable_after(marker: str, odd: str = odd) -> bool:
            following = [name for name in names if name > marker]
            return not following or following[0] != odd

        assert find_odd_name(listable_after, after) == (start, skip)


def _raw_post(endpoint: str, head: str, body: bytes = b"", half: bool = False) -> str:
    """Send a request as written (headers and all), return the status line; fail if none comes."""
    port = int(endpoint.split(":")[2].split("/", maxsplit=1)[0])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head.encode() + b"\r\n" + (body[: len(body) // 2] if half else body))
        reply = connection.recv(4096).decode(errors="replace")
    return reply.split("\r\n", 1)[0]


MALFORMED_EVENTS = [
    ('{"id": 7, "subject": "s", "eventType": "X", "eventTime": "2026-11-25T10:00:00Z"}', "400", "id must be a string"),
    ('{"id": "a", "subject": "s", "eventType": ["X"], "eventTime": "2026-11-25T10:00:00Z"}', "400", "eventType"),
    ('{"id": "a", "subject": "s", "eventType": "X", "eventTime": 17}', "400", "eventTime must be a string"),
    ('{"id": "a", "subject": "s", "eventType": "X", "eventTime": "yesterday"}', "400", "not an ISO 8601 time"),
    ('{"id": "a", "subject": {"x": 1}, "eventType": "X", "eventTime": "2026-11-25T10:00:00Z"}', "400", "subject"),
    ('{"id": "a", "eventType": "X", "eventTime": "2026-11-25T10:00:00Z"}', "400", "has no subject"),
    ("7", "400", "is not a JSON object"),
]


def test_malformed_posts_are_answered_and_a_good_event_still_gets_through(host: LocalHost) -> None:
    endpoint, key = host.topic.endpoint, host.topic_key
    for event, status, says in MALFORMED_EVENTS:
        body = f"[{event}]".encode()
        request = f"POST /api/events HTTP/1.1\r\nHost: x\r\naeg-sas-key: {key}\r\nContent-Length: {len(body)}\r\n"
        reply = urllib.request.Request(endpoint, body, {"aeg-sas-key": key}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(reply, timeout=20)
        assert str(refused.value.code) == status and says in json.loads(refused.value.read())["error"], event
        assert _raw_post(endpoint, request, body).startswith(f"HTTP/1.0 {status}")
    head = f"POST /api/events HTTP/1.1\r\nHost: x\r\naeg-sas-key: {key}\r\n"
    assert " 400 " in _raw_post(endpoint, head + "Content-Length: 4\r\n", b"\xff\xfe[]")  # not UTF-8
    assert " 411 " in _raw_post(endpoint, head + "Content-Length: -5\r\n", b"[]")
    assert " 411 " in _raw_post(endpoint, head + "Content-Length: many\r\n", b"[]")
    assert " 411 " in _raw_post(endpoint, head, b"[]")
    assert " 413 " in _raw_post(endpoint, head + "Content-Length: 99999999\r\n", b"[]")
    assert " 401 " in _raw_post(endpoint, "POST /api/events HTTP/1.1\r\nContent-Length: 2\r\n", b"[]")
    started = time.monotonic()  # half a body, then silence: cut off after the topic's timeout
    assert " 408 " in _raw_post(endpoint, head + "Content-Length: 40\r\n", b"[" * 40, half=True)
    assert time.monotonic() - started < 20
    # An event that reaches the queue however odd goes to the dead letters; the worker lives on.
    host._events.put({"id": {"not": "a string"}, "eventType": 5, "eventTime": 12, "data": None})
    dead = blob_service(host.settings.storage).get_container_client(DEAD_LETTER_CONTAINER)
    deadline = time.monotonic() + 30
    while not list(dead.list_blobs(name_starts_with="undeliverable/")):
        assert time.monotonic() < deadline, "the odd event was not dead-lettered"
        time.sleep(0.2)
    ledger = open_ledger(host.settings)
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, "after-bad.jsonl", uuid.uuid4().hex), "received")
    run = ledger.advance(ledger.advance(run, RunState.PREPARED, "prepared"), RunState.SUBMITTED, "submitted",
                         job_name=f"ft-{run.run_id}")  # fmt: skip
    for _ in range(8):  # more than the host has delivery workers
        host._events.put({"id": uuid.uuid4().hex, "eventType": 5, "eventTime": "soon", "subject": None})
    good = EventGridEvent(subject=f"experiments/x/runs/{run.job_name}", event_type=RUN_STATUS_CHANGED,
                          data={"runId": run.job_name, "runStatus": "Failed", "runType": "azureml.PipelineRun",
                                "error": "delivered after the bad ones"}, data_version="2")  # fmt: skip
    EventGridPublisherClient(endpoint, AzureKeyCredential(key)).send([good])
    while ledger.get(run.run_id).state != RunState.FAILED:
        assert time.monotonic() < deadline, "the good event was not delivered after the bad ones"
        time.sleep(0.2)


def test_a_failing_delivery_is_retried_then_dead_lettered(host: LocalHost) -> None:
    import azure.functions as func

    attempts = []

    def always_fails(event: func.EventGridEvent) -> None:
        attempts.append(event.id)
        raise RuntimeError("handler is down")

    raw = {"id": uuid.uuid4().hex, "eventType": "Custom.Test", "data": {}}
    event = func.EventGridEvent(id=raw["id"], data={}, topic="t", subject="s", event_type="Custom.Test",
                                event_time=None, data_version="1")  # fmt: skip
    host._deliver(Trigger("always_fails", "eventGridTrigger", {}, always_fails), event, raw)
    assert attempts == [raw["id"]] * 3
    dead = blob_service(host.settings.storage).get_container_client(DEAD_LETTER_CONTAINER)
    letter = json.loads(dead.download_blob(f"always_fails/{raw['id']}.json").readall())
    assert letter == {"event": raw, "error": "handler is down", "attempts": 3}


@pytest.mark.slow
def test_the_host_shows_its_topic_key_creates_the_apps_containers_and_stops_everything_on_sigterm(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {**os.environ, "JOB_EVENTS_TOPIC_KEY": "a-known-key", "LOCAL_DATA_DIR": str(tmp_path)}
    host = subprocess.Popen([sys.executable, "-m", "shared.cli", "host", "--azurite"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        lines = []
        while not (lines and lines[-1].startswith("Event Grid topic")):
            line = host.stdout.readline() if host.stdout else ""
            assert line, f"the host stopped: {lines}"
            lines.append(line.strip())
        connection = next(line.removeprefix("Azurite: ") for line in lines if line.startswith("Azurite: "))
        assert lines[-1].endswith("(aeg-sas-key a-known-key)")
        blobs = BlobServiceClient.from_connection_string(connection)
        assert blobs.get_container_client(DATASETS_CONTAINER).exists()
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=60) == 0
        port = int(connection.split("BlobEndpoint=http://127.0.0.1:")[1].split("/")[0])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # its Azurite went with it
    finally:
        host.kill()


def test_the_host_logs_the_progress_of_running_local_jobs(host: LocalHost, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localhost")
    job = local_settings(host.settings).data_dir / "jobs" / "job-watched"
    job.mkdir(parents=True)
    trainer = subprocess.Popen(["sleep", "60"])  # a live process stands in for the trainer
    status = {"job_name": "job-watched", "status": "Running", "pid": trainer.pid}
    (job / "status.json").write_text(json.dumps(status))
    (job / "progress.json").write_text(json.dumps(
        {"step": 3, "total_steps": 10, "loss": 1.0, "tokens_per_second": 100.0, "eta_s": 7.0}))  # fmt: skip
    deadline = time.monotonic() + 20
    expected = "training job-watched: step 3/10, loss 1.000, 100 tokens/s, about 7 s left"
    while expected not in [record.getMessage() for record in caplog.records]:
        assert time.monotonic() < deadline, "no progress line in the host's log"
        time.sleep(0.2)
