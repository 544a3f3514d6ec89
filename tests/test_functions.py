"""Each function invoked as the worker invokes it, with real azure.functions objects and a real
Azurite behind the ledger."""

from __future__ import annotations

import inspect
import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
import pytest
from azure.functions.timer import TimerRequest

from functions.intake import dataset_intake
from functions.janitor import endpoint_janitor
from functions.job_events import job_events
from functions.status import endpoint_rollback, run_status
from shared.backends.local.settings import LOCAL_TOPIC, local_settings
from shared.datasets.sample import conversations
from shared.intake import prepare_run
from shared.ledger import Ledger, RunState, Upload, open_ledger
from shared.settings import Settings
from shared.storage import blob_service
from shared.vocabulary import DATASETS_CONTAINER, PREPARED_CONTAINER, RUN_STATUS_CHANGED
from tests.worker import deliver_upload

SAMPLE = b"".join(orjson.dumps(row) + b"\n" for row in conversations(40, seed=5))


QUICK = {"max_steps": "2", "per_device_train_batch_size": "4"}  # the trainers these uploads start stay short


def _upload_blob(settings: Settings, name: str, data: bytes = SAMPLE, metadata: dict[str, str] | None = None) -> str:
    container = blob_service(settings.storage).get_container_client(DATASETS_CONTAINER)
    if not container.exists():
        container.create_container()
    blob = container.get_blob_client(name)
    return str(blob.upload_blob(data, overwrite=True, metadata=metadata or QUICK)["etag"]).strip('"')


def _prepared(settings: Settings, run_id: str) -> dict[str, bytes]:
    container = blob_service(settings.storage).get_container_client(PREPARED_CONTAINER)
    return {
        blob.name.split("/", 1)[1]: container.download_blob(blob.name).readall()
        for blob in container.list_blobs(name_starts_with=f"{run_id}/")
    }


@pytest.fixture
def app_ledger(app_settings: Settings) -> Ledger:
    return open_ledger(app_settings)


def test_intake_records_the_upload_once_per_version(app_settings: Settings, app_ledger: Ledger) -> None:
    name = f"chats-{uuid.uuid4().hex[:8]}.jsonl"
    etag = _upload_blob(app_settings, name)
    deliver_upload(name)
    deliver_upload(name)  # the same BlobCreated delivered again
    runs = app_ledger.by_blob(DATASETS_CONTAINER, name)
    assert len(runs) == 1
    assert runs[0].state == RunState.SUBMITTED
    assert runs[0].job_name == f"ft-{runs[0].run_id}"
    assert runs[0].upload.version == etag
    history = [entry.state for entry in app_ledger.history(runs[0].run_id)]
    assert history == [RunState.RECEIVED, RunState.PREPARED, RunState.SUBMITTED]

    new_etag = _upload_blob(app_settings, name, b'{"messages": [{"role": "user", "content": "hi"}]}\n')
    deliver_upload(name)
    runs = sorted(app_ledger.by_blob(DATASETS_CONTAINER, name), key=lambda run: run.upload.version != etag)
    assert [run.upload.version for run in runs] == [etag, new_etag]


def test_an_upload_deleted_before_its_event_is_handled_is_nothing_to_do(
    app_settings: Settings, app_ledger: Ledger
) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}.jsonl"
    deliver_upload(name)  # no exception: a retry could not bring the blob back
    assert app_ledger.by_blob(DATASETS_CONTAINER, name) == []


def test_intake_gets_the_blob_by_name_and_never_its_content_through_the_binding() -> None:
    """The worker passes the extension's BlobClient; the binding carries names only."""
    import azurefunctions.extensions.bindings.blob as blob
    from azurefunctions.extensions.base import get_binding_registry

    function = dataset_intake.build()
    annotation = inspect.signature(function.get_user_function()).parameters["upload"].annotation
    assert annotation is blob.BlobClient
    assert get_binding_registry().check_supported_type(annotation)  # the worker asks the host for a reference


def test_blob_trigger_prepares_the_upload_end_to_end(app_settings: Settings, app_ledger: Ledger) -> None:
    name = f"team/ultra-{uuid.uuid4().hex[:8]}.jsonl"
    etag = _upload_blob(app_settings, name, metadata={"test_pc": "20", **QUICK})
    deliver_upload(name)
    (run,) = app_ledger.by_blob(DATASETS_CONTAINER, name)
    assert run.state == RunState.SUBMITTED
    files = _prepared(app_settings, run.run_id)
    assert set(files) == {"train_sft.jsonl", "test_sft.jsonl", "report.json"}
    report = json.loads(files["report.json"])
    assert report["input"]["name"] == f"{DATASETS_CONTAINER}/{name}"
    assert report["input"]["etag"] == etag and report["input"]["size"] == len(SAMPLE)
    assert report["settings"]["test_percent"] == 20
    train, test = files["train_sft.jsonl"].splitlines(), files["test_sft.jsonl"].splitlines()
    assert len(train) + len(test) == 40 and len(train) == report["split"]["train"]
    assert run.details["report"]["training_overrides"] == {"max_steps": 2, "per_device_train_batch_size": 4}
    job = json.loads((local_settings(app_settings).data_dir / "jobs" / run.job_name / "job.json").read_text())
    assert job["parameters"] == {"max_steps": 2, "per_device_train_batch_size": 4}
    assert job["tags"]["run_id"] == run.run_id and job["tags"]["dataset_sha256"] == report["input"]["sha256"]
    assert run.details["report"]["sha256"] == report["input"]["sha256"]
    assert run.details["prepared"] == f"prepared/{run.run_id}/"


def test_a_rejected_upload_is_recorded_with_its_report_and_left_untouched(
    app_settings: Settings, app_ledger: Ledger
) -> None:
    name = f"broken-{uuid.uuid4().hex[:8]}.jsonl"
    data = SAMPLE + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    etag = _upload_blob(app_settings, name, data)
    deliver_upload(name)
    (run,) = app_ledger.by_blob(DATASETS_CONTAINER, name)
    assert run.state == RunState.REJECTED
    assert run.reason is not None and "1 of 41 rows have errors (first at line 41:" in run.reason
    assert "\n" not in run.reason
    files = _prepared(app_settings, run.run_id)
    assert set(files) == {"report.json", "rejected_rows.jsonl"}
    assert json.loads(files["report.json"])["errors"]["no_assistant_message"]["first_lines"] == [41]
    original = blob_service(app_settings.storage).get_blob_client(DATASETS_CONTAINER, name)
    assert original.download_blob().readall() == data
    assert str(original.get_blob_properties().etag).strip('"') == etag


def test_an_upload_naming_a_datasets_folder_is_prepared_from_it_and_says_so(
    app_settings: Settings, app_ledger: Ledger, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(conversations(40, seed=5))
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    name = f"support-{uuid.uuid4().hex[:8]}.hfdataset.json"
    _upload_blob(app_settings, name, json.dumps({"dataset": str(tmp_path), "split": "train"}).encode())
    deliver_upload(name)
    (run,) = app_ledger.by_blob(DATASETS_CONTAINER, name)
    assert run.state == RunState.SUBMITTED, run.reason
    files = _prepared(app_settings, run.run_id)
    report = json.loads(files["report.json"])
    assert report["input"]["format"] == "hfdataset" and report["input"]["source"]["dataset"] == str(tmp_path)
    assert report["input"]["source"]["revision"].startswith("local:") and report["rows"]["usable"] == 40
    missing = f"gone-{uuid.uuid4().hex[:8]}.hfdataset.json"
    _upload_blob(app_settings, missing, json.dumps({"dataset": str(tmp_path / "gone")}).encode())
    deliver_upload(missing)
    (rejected,) = app_ledger.by_blob(DATASETS_CONTAINER, missing)
    assert rejected.state == RunState.REJECTED and "\n" not in (rejected.reason or "")
    assert (
        rejected.reason
        == f"dataset '{tmp_path / 'gone'}' cannot be read: FileNotFoundError: no folder {tmp_path / 'gone'}"
    )


def test_an_upload_overwritten_before_it_is_read_is_rejected_with_that_reason(
    app_settings: Settings, app_ledger: Ledger
) -> None:
    name = f"moving-{uuid.uuid4().hex[:8]}.jsonl"
    old_etag = _upload_blob(app_settings, name)
    run, _ = app_ledger.receive(Upload(DATASETS_CONTAINER, name, old_etag), "received")
    _upload_blob(app_settings, name, SAMPLE + SAMPLE)  # overwritten after the run was recorded
    blob = blob_service(app_settings.storage).get_blob_client(DATASETS_CONTAINER, name)
    run = prepare_run(app_settings, app_ledger, run, blob)
    assert run.state == RunState.REJECTED
    assert run.reason is not None and run.reason.startswith("the blob was overwritten before it could be read")


def _grid_event(event_type: str, data: dict[str, Any], topic: str = LOCAL_TOPIC) -> func.EventGridEvent:
    return func.EventGridEvent(
        id=str(uuid.uuid4()),
        data=data,
        topic=topic,
        subject=f"experiments/e/runs/{data.get('runId')}",
        event_type=event_type,
        event_time=datetime.now(UTC),
        data_version="2",
    )


def test_job_events_move_the_run_that_submitted_the_job_and_ignore_the_rest(
    app_settings: Settings, app_ledger: Ledger
) -> None:
    name = f"events-{uuid.uuid4().hex[:8]}.jsonl"
    _upload_blob(app_settings, name)
    deliver_upload(name)
    (run,) = app_ledger.by_blob(DATASETS_CONTAINER, name)
    job = run.job_name
    handler = job_events.build().get_user_function()
    ignored = [
        _grid_event(RUN_STATUS_CHANGED, {"runId": job, "runStatus": "Failed", "runType": "azureml.PipelineRun"},
                    topic="/subscriptions/x/someone-else"),
        _grid_event(RUN_STATUS_CHANGED, {"runId": job, "runStatus": "Failed", "runType": "azureml.StepRun"}),
        _grid_event(RUN_STATUS_CHANGED, {"runId": job, "runStatus": "Running", "runType": "azureml.PipelineRun"}),
        _grid_event(RUN_STATUS_CHANGED, {"runId": "someone-elses-job", "runStatus": "Failed",
                                         "runType": "azureml.PipelineRun"}),
        _grid_event("Microsoft.Storage.BlobCreated", {"url": "https://x/datasets/y"}),
    ]  # fmt: skip
    for event in ignored:
        handler(event)
    assert app_ledger.get(run.run_id) == run

    failed = {"RunId": job, "RunStatus": "failed", "RunType": "AzureML.PipelineRun", "error": "CUDA out of memory"}
    handler(_grid_event("microsoft.machinelearningservices.runstatuschanged", failed))
    handler(_grid_event("microsoft.machinelearningservices.runstatuschanged", failed))  # a duplicate
    handler(_grid_event(RUN_STATUS_CHANGED, {"runId": job, "runStatus": "Running", "runType": "azureml.PipelineRun"}))
    after = app_ledger.get(run.run_id)
    assert after.state == RunState.FAILED and after.reason == "CUDA out of memory"
    assert [e.state for e in app_ledger.history(run.run_id)].count(RunState.FAILED) == 1


def test_the_janitor_runs_on_schedule_and_when_past_due(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    janitor = endpoint_janitor.build().get_user_function()
    janitor(TimerRequest(past_due=False))
    janitor(TimerRequest(past_due=True))
    sweeps = [record.getMessage() for record in caplog.records if record.getMessage().startswith("janitor:")]
    assert len(sweeps) == 2
    assert "'past_due': False" in sweeps[0] and "'past_due': True" in sweeps[1]


def _get(path: str, params: dict[str, str] | None = None, run_id: str | None = None) -> func.HttpResponse:
    request = func.HttpRequest(
        method="GET",
        url=f"http://localhost/api/{path}",
        params=params or {},
        route_params={"run_id": run_id} if run_id else {},
        body=b"",
    )
    return run_status.build().get_user_function()(request)


def test_status_lists_recent_runs_and_shows_one_with_its_history(app_settings: Settings) -> None:
    name = f"status-{uuid.uuid4().hex[:8]}.jsonl"
    _upload_blob(app_settings, name)
    deliver_upload(name)

    listing = _get("runs", {"state": "submitted", "limit": "200"})
    assert listing.status_code == 200
    assert listing.mimetype == "application/json"
    runs = {run["upload"]["blob_name"]: run for run in json.loads(listing.get_body())["runs"]}
    run_id = runs[name]["run_id"]

    one = _get(f"runs/{run_id}", run_id=run_id)
    assert one.status_code == 200
    body = json.loads(one.get_body())
    assert body["state"] == "submitted"
    assert body["state_times"].keys() == {"received", "prepared", "submitted"}
    assert [entry["state"] for entry in body["history"]] == ["received", "prepared", "submitted"]
    assert body["details"]["report"]["split"]["train"] + body["details"]["report"]["split"]["test"] == 40
    assert "etag" not in body


@pytest.mark.parametrize(
    ("params", "run_id", "status", "says"),
    [
        ({}, "no-such-run", 404, "no run with id 'no-such-run'"),
        # Ids that cannot be run ids never reach storage (a `/` once came back as a storage 500).
        ({}, "chats%2F0123456789ab", 404, "no run with id"),
        ({}, "chats/0123456789ab", 404, "no run with id"),
        ({}, "it's-0123456789ab", 404, "no run with id"),
        ({}, "a" * 300 + "-0123456789ab", 404, "no run with id"),
        ({}, "chats-0123456789ab\u0000", 404, "no run with id"),
        ({"state": "sleeping"}, None, 400, "state='sleeping': expected one of received"),
        ({"limit": "0"}, None, 400, "limit='0': expected a whole number from 1 to 200"),
        ({"limit": "ten"}, None, 400, "limit='ten'"),
    ],
)
def test_status_explains_bad_requests(
    app_settings: Settings, params: dict[str, str], run_id: str | None, status: int, says: str
) -> None:
    response = _get("runs", params, run_id)
    assert response.status_code == status
    assert says in json.loads(response.get_body())["error"]


@pytest.mark.parametrize("endpoint", ["a b", "chat\n", "../runs", "x" * 33])
def test_a_rollback_for_a_name_no_endpoint_can_have_is_refused_at_the_door(
    app_settings: Settings, endpoint: str
) -> None:
    request = func.HttpRequest("POST", "/api/endpoints/x/rollback", body=b"", route_params={"endpoint": endpoint})
    answer = endpoint_rollback.build().get_user_function()(request)
    assert answer.status_code == 400
    assert json.loads(answer.get_body())["error"].startswith(f"endpoint {endpoint!r}: 3-32 characters")
