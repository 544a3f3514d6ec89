"""Exactly once under at-least-once delivery: the event flow with Azurite and the local backend
for real, deliveries repeated and raced, handlers and trainers killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
import pytest

from functions.job_events import job_events
from functions.status import endpoint_rollback
from shared import lifecycle
from shared.backends.local.settings import local_settings
from shared.backends.registry import get_backend
from shared.datasets.sample import conversations
from shared.dev.eventgrid_topic import LocalTopic
from shared.janitor import sweep
from shared.ledger import Ledger, Run, RunState, Upload, open_ledger
from shared.settings import Settings, get_settings
from shared.storage import blob_service
from shared.vocabulary import DATASETS_CONTAINER, MANAGED_BY, PREPARED_CONTAINER
from tests.killing import ROLES, started_processes, walk_in_a_process
from tests.worker import completed_event, deliver_upload

S = RunState
SAMPLE = b"".join(orjson.dumps(row) + b"\n" for row in conversations(40, seed=21))
QUICK = {"max_steps": "2", "per_device_train_batch_size": "4"}


@pytest.fixture
def lifecycle_events(app_settings: Settings, clean_env: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """What the app tells other systems, captured on a local topic."""
    received: list[dict[str, Any]] = []
    topic = LocalTopic("lifecycle-key", received.append, topic="lifecycle")
    clean_env.setenv("LIFECYCLE_TOPIC_ENDPOINT", topic.endpoint)
    clean_env.setenv("LIFECYCLE_TOPIC_KEY", "lifecycle-key")
    get_settings.cache_clear()
    yield received
    topic.close()


@pytest.fixture
def settings(app_settings: Settings, lifecycle_events: list[Any]) -> Settings:
    return get_settings()


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return open_ledger(settings)


def _upload(settings: Settings, data: bytes = SAMPLE, metadata: dict[str, str] | None = None) -> str:
    name = f"flow-{uuid.uuid4().hex[:8]}.jsonl"
    container = blob_service(settings.storage).get_container_client(DATASETS_CONTAINER)
    if not container.exists():
        container.create_container()
    container.get_blob_client(name).upload_blob(data, metadata=metadata or QUICK)
    return name


def _wait_job(settings: Settings, job: str, timeout_s: float = 240) -> str:
    backend = get_backend(settings)
    deadline = time.monotonic() + timeout_s
    while not (status := backend.job_status(job)).status.is_terminal:
        assert time.monotonic() < deadline, f"job {job} still {status.status}"
        time.sleep(0.5)
    return status.status


def _states(ledger: Ledger, run: Run) -> list[RunState]:
    return [entry.state for entry in ledger.history(run.run_id)]


def _job_dirs(settings: Settings) -> list[Path]:
    return sorted((local_settings(settings).data_dir / "jobs").glob("*/status.json"))


def test_200_concurrent_deliveries_of_one_upload_make_one_run_and_one_job(settings: Settings, ledger: Ledger) -> None:
    name = _upload(settings)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: deliver_upload(name), range(200)))
    (run,) = ledger.by_blob(DATASETS_CONTAINER, name)
    assert run.state == S.SUBMITTED
    assert _states(ledger, run) == [S.RECEIVED, S.PREPARED, S.SUBMITTED]
    assert [path.parent.name for path in _job_dirs(settings)] == [run.job_name]


def test_200_concurrent_completed_events_register_and_deploy_once(
    settings: Settings, ledger: Ledger, lifecycle_events: list[dict[str, Any]]
) -> None:
    from mlflow.tracking import MlflowClient

    from shared.backends.local import endpoints as local_endpoints

    name = _upload(settings)
    deliver_upload(name)
    (run,) = ledger.by_blob(DATASETS_CONTAINER, name)
    assert _wait_job(settings, run.job_name or "") == "Completed"
    handler = job_events.build().get_user_function()
    # On a machine kept busy, so that a smoke test waits behind the model: once, duplicates
    # re-ran it and one of them deleted the live endpoint.
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda _: handler(completed_event(run.job_name or "")), range(200)))
    finally:
        for burner in burners:
            burner.kill()
    run = ledger.get(run.run_id)
    data_dir = local_settings(settings).data_dir
    server_log = local_endpoints.log_path(data_dir, run.endpoint_name or "", run.deployment_name or "").read_text()
    # One evaluation: each held-out conversation once (up to GATE_CONVERSATIONS), in the first request shape.
    held_out = min(run.details["report"]["split"]["test"], settings.rollout.gate_conversations)
    assert held_out and server_log.count('"POST /score HTTP/1.1"') == held_out
    deployed = [e for e in lifecycle_events if e["eventType"] == "FineTune.ModelDeployed"]
    assert len(deployed) == 1
    status, _ = local_endpoints.invoke(data_dir, run.endpoint_name or "", {"input_data": {"input_string": [
        {"role": "user", "content": "still there?"}], "parameters": {"max_new_tokens": 4}}})  # fmt: skip
    assert status == 200  # the endpoint the ledger calls deployed is live
    assert run.state == S.DEPLOYED, run.reason
    states = _states(ledger, run)
    assert states == [S.RECEIVED, S.PREPARED, S.SUBMITTED, S.COMPLETED, S.REGISTERED, S.DEPLOYING, S.ROLLING_OUT,
                      S.DEPLOYED]  # fmt: skip
    tracking = f"sqlite:///{local_settings(settings).data_dir / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=tracking).search_model_versions(f"name = '{run.model_name}'")) == 1
    endpoints = get_backend(settings).list_endpoints()
    assert [e.name for e in endpoints] == [run.endpoint_name]
    assert run.endpoint_url == endpoints[0].scoring_uri
    assert run.details["metrics"]["steps"] == 2


def test_a_killed_trainer_ends_the_run_failed_with_no_deployment(
    settings: Settings, ledger: Ledger, lifecycle_events: list[dict[str, Any]]
) -> None:
    name = _upload(settings, metadata={"num_train_epochs": "200", "per_device_train_batch_size": "1"})
    deliver_upload(name)
    (run,) = ledger.by_blob(DATASETS_CONTAINER, name)
    status_file = local_settings(settings).data_dir / "jobs" / (run.job_name or "") / "status.json"
    deadline = time.monotonic() + 60
    while (pid := json.loads(status_file.read_text()).get("pid")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(3)  # mid-run
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    report = sweep(settings, ledger, past_due=False)
    run = ledger.get(run.run_id)
    assert run.state == S.FAILED
    assert "ended without reporting a result" in (run.reason or "")
    assert report["jobs_finished"] == {run.run_id: "failed"}
    assert get_backend(settings).list_endpoints() == []
    failed = [
        e for e in lifecycle_events if e["data"]["runId"] == run.run_id and e["eventType"] == "FineTune.JobFailed"
    ]
    assert len(failed) == 1 and failed[0]["data"]["reason"] == run.reason


def test_a_rejected_dataset_is_recorded_reported_left_untouched_and_announced(
    settings: Settings, ledger: Ledger, lifecycle_events: list[dict[str, Any]]
) -> None:
    data = SAMPLE + b'[{"role": "user", "content": "not an object"}]\n'
    name = _upload(settings, data)
    deliver_upload(name)
    (run,) = ledger.by_blob(DATASETS_CONTAINER, name)
    assert run.state == S.REJECTED and "line 41" in (run.reason or "")
    service = blob_service(settings.storage)
    report = json.loads(
        service.get_blob_client(PREPARED_CONTAINER, f"{run.run_id}/report.json").download_blob().readall()
    )
    assert report["status"] == "rejected"
    original = service.get_blob_client(DATASETS_CONTAINER, name)
    assert original.download_blob().readall() == data
    assert str(original.get_blob_properties().etag).strip('"') == run.upload.version  # never rewritten
    (event,) = [e for e in lifecycle_events if e["data"]["runId"] == run.run_id]
    assert event["eventType"] == "FineTune.DatasetRejected" and event["data"]["reason"] == run.reason
    assert _job_dirs(settings) == []


def _set_endpoint_time(settings: Settings, endpoint: str, created: datetime | None = None,
                       last_request: datetime | None = None) -> None:  # fmt: skip
    directory = local_settings(settings).data_dir / "endpoints" / endpoint
    if created:
        spec = json.loads((directory / "endpoint.json").read_text())
        (directory / "endpoint.json").write_text(json.dumps({**spec, "created_at": created.isoformat()}))
    if last_request:
        (directory / "last_request").write_text(last_request.isoformat())


def test_the_janitor_deletes_only_idle_managed_endpoints_once(
    settings: Settings, ledger: Ledger, clean_env: pytest.MonkeyPatch, lifecycle_events: list[dict[str, Any]]
) -> None:
    clean_env.setenv("ENDPOINT_IDLE_MINUTES", "10")
    clean_env.setenv("ENDPOINT_MIN_AGE_MINUTES", "30")
    get_settings.cache_clear()
    settings = get_settings()
    name = _upload(settings)
    deliver_upload(name)
    (run,) = ledger.by_blob(DATASETS_CONTAINER, name)
    _wait_job(settings, run.job_name or "")
    sweep(settings, ledger, past_due=True)  # finishes the job's run: registered, deployed
    run = ledger.get(run.run_id)
    assert run.state == S.DEPLOYED, run.reason

    backend = get_backend(settings)
    model = backend.register(run.job_name or "")
    later = datetime.now(UTC) + timedelta(minutes=45)
    managed = {"managed-by": MANAGED_BY}
    others = {"ep-fresh": managed, "ep-kept": {**managed, "keep": "true"}, "ep-unmanaged": {}, "ep-recent": managed}
    for endpoint, tags in others.items():
        backend.deploy(model, endpoint, "main", tags)
        backend.wait_ready(endpoint, "main")
        backend.set_traffic(endpoint, {"main": 100})
    _set_endpoint_time(settings, "ep-fresh", created=later - timedelta(minutes=5))
    _set_endpoint_time(settings, "ep-recent", last_request=later - timedelta(minutes=2))

    clean_env.setenv("JANITOR_DRY_RUN", "true")
    get_settings.cache_clear()
    dry = sweep(get_settings(), ledger, past_due=False, now=later)
    assert [line.split(":")[0] for line in dry["would_delete"]] == [run.endpoint_name]
    assert ledger.get(run.run_id).state == S.DEPLOYED

    clean_env.setenv("JANITOR_DRY_RUN", "false")
    get_settings.cache_clear()
    reports: list[dict[str, Any]] = []
    sweeps = [threading.Thread(target=lambda: reports.append(sweep(get_settings(), ledger, False, now=later)))
              for _ in range(2)]  # fmt: skip
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join()
    assert sorted(name for report in reports for name in report["deleted"]) == [run.endpoint_name]
    kept = reports[0]["kept"]
    assert kept["ep-kept"] == "tagged keep" and kept["ep-unmanaged"] == "not managed by this app"
    assert "younger than 30 min" in kept["ep-fresh"] and "2.0 min ago" in kept["ep-recent"]
    assert sorted(e.name for e in backend.list_endpoints()) == ["ep-fresh", "ep-kept", "ep-recent", "ep-unmanaged"]
    run = ledger.get(run.run_id)
    assert run.state == S.TORN_DOWN
    *_, torn_down, gone = ledger.history(run.run_id)
    assert "min idle, window 10 min" in torn_down.message and gone.message.endswith("is gone")
    deleted = [e for e in lifecycle_events if e["eventType"] == "FineTune.EndpointDeleted"]
    assert [e["data"]["endpoint"] for e in deleted] == [run.endpoint_name]
    # What it was estimated to take (exact tokens, a measured rate, nothing billed) and what it took.
    report = run.details["report"]
    assert report["tokens_counted"] == "exact: the tiny-phi3 tokenizer and chat template"
    assert report["estimate"]["training_usd"] == 0.0 and report["estimate"]["basis"]["tokens_per_second"] > 0
    spend = run.details["spend"]
    assert spend["training"]["hours"] > 0 and spend["training"]["usd"] == 0.0
    deploying = run.state_times[S.DEPLOYING]
    assert spend["hosting"]["hours"] == pytest.approx((later - deploying).total_seconds() / 3600, abs=1e-3)
    assert deleted[0]["data"]["spend"] == spend


def _train_and_finish(settings: Settings, ledger: Ledger, name: str, rows: list[dict[str, Any]],
                      parameters: dict[str, str]) -> Run:  # fmt: skip
    """Upload a new version of dataset `name`, train it, and deliver its job's Completed event."""
    container = blob_service(settings.storage).get_container_client(DATASETS_CONTAINER)
    container.get_blob_client(name).upload_blob(b"".join(orjson.dumps(r) + b"\n" for r in rows), overwrite=True,
                                                metadata=parameters)  # fmt: skip
    deliver_upload(name)
    run = ledger.by_blob(DATASETS_CONTAINER, name)[0]
    assert _wait_job(settings, run.job_name or "") == "Completed"
    job_events.build().get_user_function()(completed_event(run.job_name or ""))
    return ledger.get(run.run_id)


def _served_by(url: str, key: str, requests: int = 1, deployment: str | None = None) -> set[str]:
    """Which deployments answered `requests` chat requests at the endpoint's URL."""
    import httpx

    headers = {"Authorization": f"Bearer {key}", **({"azureml-model-deployment": deployment} if deployment else {})}
    body = {"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": 2}}}
    answers = [httpx.post(url, json=body, headers=headers, timeout=60) for _ in range(requests)]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    return {answer.headers["azureml-model-deployment"] for answer in answers}


def test_retraining_keeps_the_url_gates_rolls_out_refuses_worse_and_rolls_back(
    settings: Settings, ledger: Ledger, clean_env: pytest.MonkeyPatch, lifecycle_events: list[dict[str, Any]]
) -> None:
    for setting, value in {"ROLLOUT_SHARE_PERCENT": "50", "ROLLOUT_STEP_MINUTES": "0.05", "GATE_CONVERSATIONS": "3",
                           "ROLLBACK_WINDOW_HOURS": "24", "ENDPOINT_IDLE_MINUTES": "100000"}.items():  # fmt: skip
        clean_env.setenv(setting, value)
    get_settings.cache_clear()
    settings = get_settings()
    backend = get_backend(settings)
    name = f"support-bot-{uuid.uuid4().hex[:6]}.jsonl"
    steady = {"per_device_train_batch_size": "4", "learning_rate": "0.002"}

    v1 = _train_and_finish(settings, ledger, name, conversations(40, seed=1), {**steady, "max_steps": "3"})
    assert v1.state == S.DEPLOYED, v1.reason
    url, endpoint = v1.endpoint_url or "", v1.endpoint_name or ""
    key = backend.keys(endpoint)["primary_key"]
    assert v1.details["gate"]["compared_with"] == "base model" and v1.details["gate"]["passed"]
    assert _served_by(url, key) == {v1.deployment_name}

    v2 = _train_and_finish(settings, ledger, name, conversations(40, seed=2), {**steady, "max_steps": "30"})
    assert v2.state == S.ROLLING_OUT, v2.reason
    assert (v2.endpoint_name, backend.endpoint(endpoint).scoring_uri) == (endpoint, url)
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 50, v2.deployment_name: 50}
    assert _served_by(url, key, requests=30) == {v1.deployment_name, v2.deployment_name}
    gate = v2.details["gate"]
    assert gate["compared_with"] == v1.deployment_name and gate["loss"]["candidate"] < gate["loss"]["baseline"]
    time.sleep(3.5)  # the rollout step (0.05 min) passes; the janitor's tick finishes the rollout
    sweep(settings, ledger, past_due=False)
    v1, v2 = ledger.get(v1.run_id), ledger.get(v2.run_id)
    assert (v1.state, v2.state) == (S.SUPERSEDED, S.DEPLOYED)
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 0, v2.deployment_name: 100}
    assert _served_by(url, key, requests=5) == {v2.deployment_name}
    assert _served_by(url, key, deployment=v1.deployment_name) == {v1.deployment_name}  # kept, at 0%
    assert backend.keys(endpoint)["primary_key"] == key

    # A learning rate that diverges: trained "successfully", worse on held-out conversations.
    v3 = _train_and_finish(settings, ledger, name, conversations(40, seed=3), {**steady, "max_steps": "30",
                                                                                "learning_rate": "3"})  # fmt: skip
    assert v3.state == S.REFUSED and "held-out loss" in (v3.reason or ""), v3.reason
    assert v3.details["gate"]["loss"]["candidate"] > v3.details["gate"]["loss"]["limit"]
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 0, v2.deployment_name: 100}
    assert _served_by(url, key, requests=5) == {v2.deployment_name}
    assert f"deployment {v3.deployment_name} deleted" in ledger.history(v3.run_id)[-1].message

    request = func.HttpRequest("POST", f"/api/endpoints/{endpoint}/rollback", body=b"",
                               route_params={"endpoint": endpoint})  # fmt: skip
    answer = endpoint_rollback.build().get_user_function()(request)
    assert answer.status_code == 200, answer.get_body()
    assert json.loads(answer.get_body())["serving"]["run_id"] == v1.run_id
    v1, v2 = ledger.get(v1.run_id), ledger.get(v2.run_id)
    assert (v1.state, v2.state) == (S.DEPLOYED, S.ROLLED_BACK)
    assert _served_by(url, key, requests=5) == {v1.deployment_name}
    again = endpoint_rollback.build().get_user_function()(request)
    assert again.status_code == 409 and "no earlier deployment" in json.loads(again.get_body())["error"]
    cli = subprocess.run([sys.executable, "-m", "shared.cli", "rollback", endpoint], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "no earlier deployment is kept" in cli.stderr

    models = [e for e in lifecycle_events if e["eventType"].startswith("FineTune.Model")]
    assert [(e["eventType"], e["data"]["runId"]) for e in models] == [
        ("FineTune.ModelDeployed", v1.run_id), ("FineTune.ModelDeployed", v2.run_id),
        ("FineTune.ModelRefused", v3.run_id), ("FineTune.ModelRolledBack", v2.run_id)]  # fmt: skip

    # Past the rollback window the rolled-back deployment goes; the endpoint and its URL stay.
    report = sweep(settings, ledger, past_due=False, now=datetime.now(UTC) + timedelta(hours=25))
    assert report["deployments_deleted"] == [f"{endpoint}/{v2.deployment_name}"]
    assert ledger.get(v2.run_id).state == S.TORN_DOWN and ledger.get(v1.run_id).state == S.DEPLOYED
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 100}
    assert _served_by(url, key) == {v1.deployment_name}


def test_an_event_recorded_but_not_sent_goes_at_the_janitors_next_tick_once_with_its_id(
    settings: Settings, ledger: Ledger, lifecycle_events: list[dict[str, Any]]
) -> None:
    """A handler that dies after recording a change, or meets its topic down, leaves the event in
    the ledger's outbox: it is sent later, at least once, always with the same id."""
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, f"told-{uuid.uuid4().hex[:8]}.jsonl", "v1"), "received")
    told = lifecycle.tell(settings, lifecycle.DATASET_REJECTED, report="prepared/x/report.json")
    ledger.advance(run, S.REJECTED, "dataset rejected", reason="line 3: not JSON", tell=told)
    topic_down = replace(settings, lifecycle_topic_endpoint="http://127.0.0.1:9/api/events")  # nothing listens
    lifecycle.publish(topic_down, ledger, run.run_id)
    assert [entry.event_type for entry in ledger.outbox(run.run_id)] == [lifecycle.DATASET_REJECTED]

    for _ in range(2):  # two ticks: sent by the first, not again by the second
        sweep(settings, ledger, past_due=False)
    (event,) = [event for event in lifecycle_events if event["data"]["runId"] == run.run_id]
    assert event["id"] == f"{run.run_id}:00001" and event["eventType"] == lifecycle.DATASET_REJECTED
    assert (event["data"]["state"], event["data"]["reason"]) == ("rejected", "line 3: not JSON")
    assert event["data"]["report"] == "prepared/x/report.json" and ledger.outbox(run.run_id) == []


@pytest.fixture
def throwaway_uploads(settings: Settings) -> Iterator[Callable[..., list[str]]]:
    """Uploads made for one test and deleted after it: the local host's tests watch the same
    container later and would take every blob left there for a new upload to train."""
    made: list[str] = []

    def upload(count: int, metadata: dict[str, str] | None = None) -> list[str]:
        made.extend(_upload(settings, metadata=metadata) for _ in range(count))
        return made[-count:]

    yield upload
    container = blob_service(settings.storage).get_container_client(DATASETS_CONTAINER)
    for name in made:
        container.delete_blob(name)


def _walk(settings: Settings, logs: Path, action: str, blobs: list[str], trained: Path | None = None) -> list[Any]:
    data_dir = local_settings(settings).data_dir
    # Separate runs, two at a time (nothing of one waits on another's) where each costs a deployment.
    plan = {"action": action, "triggers": blobs, "trained": str(trained), "data_dir": str(data_dir),
            "lanes": 2 if trained else 1}  # fmt: skip
    attempts = walk_in_a_process(logs, plan)
    # Every write was a kill point: the last attempt ended before reaching its number.
    assert 0 < len(attempts[-1]["attempt"]) < len(attempts), attempts[-1]["attempt"]
    return attempts


def _told_once_per_transition(events: list[dict[str, Any]], run: Run, expected: list[str]) -> None:
    """Sent at least once, each with its id: what a receiver keeps after dropping repeats."""
    mine = [event for event in events if event["data"]["runId"] == run.run_id]
    by_id = {event["id"]: event for event in mine}
    assert sorted(event["eventType"] for event in by_id.values()) == sorted(expected), mine
    assert all(event == by_id[event["id"]] for event in mine)  # a repeat is the same event


def test_an_upload_handler_killed_after_any_write_ends_once_when_delivered_again(
    settings: Settings,
    ledger: Ledger,
    lifecycle_events: list[dict[str, Any]],
    tmp_path: Path,
    throwaway_uploads: Callable[..., list[str]],
) -> None:
    blobs = throwaway_uploads(30)
    attempts = _walk(settings, tmp_path, "upload", blobs)
    lifecycle.publish(settings, ledger)  # the janitor's first step: what a killed handler did not send
    runs = []
    for attempt in attempts:
        found = ledger.by_blob(DATASETS_CONTAINER, attempt["trigger"])
        assert len(found) == 1, attempt
        run = found[0]
        runs.append(run)
        assert _states(ledger, run) == [S.RECEIVED, S.PREPARED, S.SUBMITTED], attempt
        assert attempt["running"]["trainer"] == [run.job_name], attempt  # one trainer process
        _told_once_per_transition(lifecycle_events, run, ["FineTune.JobSubmitted"])
    assert sorted(path.parent.name for path in _job_dirs(settings)) == sorted(str(run.job_name) for run in runs)


def test_a_job_events_handler_killed_after_any_write_ends_once_when_delivered_again(
    settings: Settings,
    ledger: Ledger,
    lifecycle_events: list[dict[str, Any]],
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    throwaway_uploads: Callable[..., list[str]],
) -> None:
    """Killed while it holds the run's claim, a handler leaves the run to the janitor's first tick
    after the claim lapses; killed before or after, to the event delivered again."""
    from mlflow.tracking import MlflowClient

    clean_env.setenv("GATE_CONVERSATIONS", "1")  # each run is judged in full: one conversation is enough here
    get_settings.cache_clear()
    settings = get_settings()
    (name,) = throwaway_uploads(1, {**QUICK, "merge_lora_weights": "false"})  # one server holds every deployment
    deliver_upload(name)
    (trained,) = ledger.by_blob(DATASETS_CONTAINER, name)
    assert _wait_job(settings, trained.job_name or "") == "Completed"
    data_dir = local_settings(settings).data_dir
    blobs = throwaway_uploads(40)
    attempts = _walk(settings, tmp_path, "completed", blobs, trained=data_dir / "jobs" / str(trained.job_name))
    lifecycle.publish(settings, ledger)
    backend = get_backend(settings)
    registry = MlflowClient(tracking_uri=f"sqlite:///{data_dir / 'mlflow.db'}")
    for attempt in attempts:
        run = ledger.by_job(attempt["trigger"])
        assert run is not None, attempt
        assert _states(ledger, run) == [S.RECEIVED, S.PREPARED, S.SUBMITTED, S.COMPLETED, S.REGISTERED, S.DEPLOYING,
                                        S.ROLLING_OUT, S.DEPLOYED], (attempt, run.reason)  # fmt: skip
        assert len(registry.search_model_versions(f"name = '{run.model_name}'")) == 1, attempt
        endpoint = backend.endpoint(run.endpoint_name or "")
        assert endpoint.traffic == {run.deployment_name: 100}, attempt
        deployments = list((data_dir / "endpoints" / str(run.endpoint_name) / "deployments").iterdir())
        assert [found.name for found in deployments] == [run.deployment_name], attempt
        _told_once_per_transition(lifecycle_events, run, ["FineTune.JobSubmitted", "FineTune.ModelDeployed"])
    # Every deployment is an adapter of one base model: one server process holds them all, one gateway.
    servers = [path.name for path in (data_dir / "servers").iterdir()]
    assert len(servers) == 1 and started_processes(ROLES["server"], data_dir) == servers
    assert started_processes(ROLES["gateway"], data_dir) == ["gateway"]
    assert started_processes(ROLES["trainer"], data_dir) == []  # nothing trained again
