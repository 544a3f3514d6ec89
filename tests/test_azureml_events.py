"""Azure ML's job events in the shapes Microsoft documents them ("Azure Machine Learning as an Event
Grid source", MicrosoftDocs/azure-docs articles/event-grid/event-schema-machine-learning.md),
decoded by the real azure.functions converter and handled with the Azure ML backend against the
fake service: a success may come as `RunCompleted` (no `runStatus`, `runType` null in the sample)
or as a `RunStatusChanged` to Completed, with camelCase or PascalCase keys."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.functions import meta
from azure.functions.eventgrid import EventGridEventInConverter

from shared import deployment
from shared.backends.azureml.backend import AzureMLBackend
from shared.backends.interface import ModelRef
from shared.deployment import RollbackError, drive_run, rollback
from shared.dev.azurite import Azurite
from shared.events import handle_job_event
from shared.intake import submit_run
from shared.ledger import Ledger, Run, RunState, Upload
from shared.settings import Settings, load_settings
from shared.storage import container
from shared.vocabulary import DATASETS_CONTAINER, PREPARED_CONTAINER, RUN_COMPLETED, RUN_STATUS_CHANGED, TEST_FILE
from tests.fake_azureml import RG, SUB, WORKSPACE_ENV, WS, FakeAzureML, FakeCredential

ENV = WORKSPACE_ENV
WORKSPACE_TOPIC = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
)


def _documented(event_type: str, job: str, **extra: Any) -> dict[str, Any]:
    """The documented Event Grid schema sample for a run event, for our job."""
    return {
        "topic": WORKSPACE_TOPIC,
        "subject": f"experiments/0fa9dfaa-cba3-4fa7-b590-23e48548f5c1/runs/{job}",
        "eventType": event_type,
        "eventTime": "2017-06-26T18:41:00.9584103Z",
        "id": "831e1650-001e-001b-66ab-eeb76e069631",
        "data": {
            "experimentId": "0fa9dfaa-cba3-4fa7-b590-23e48548f5c1",
            "experimentName": "chat_completion_finetune",
            "runId": job,
            "runType": None,
            "runTags": {},
            "runProperties": {"runTemplate": "azureml_pipeline"},
            **extra,
        },
        "dataVersion": "",
        "metadataVersion": "1",
    }


def _pascal(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "data": {key[0].upper() + key[1:]: value for key, value in event["data"].items()}}


def _job_ends(fake: FakeAzureML, run: Run, status: str) -> str:
    """The run's job reaches `status` at the service; its name, for the events about it."""
    assert run.job_name
    fake.set_job_status(run.job_name, status)
    return run.job_name


CONFLICT = {"error": {"code": "Conflict", "message": "a concurrent write"}}


def _deliver(settings: Settings, ledger: Ledger, backend: AzureMLBackend, body: dict[str, Any]) -> str:
    """As the worker decodes the webhook's body, then as the job_events function hands it on."""
    event = EventGridEventInConverter.decode(meta.Datum(json.dumps(body), "json"), trigger_metadata=None)
    return handle_job_event(settings, ledger, event.get_json(), event.event_type, event.topic, event.subject, backend)


@pytest.fixture
def fake() -> FakeAzureML:
    return FakeAzureML()


def _submitted(settings: Settings, ledger: Ledger, backend: AzureMLBackend, blob: str, version: str,
               endpoint: str | None = None) -> Run:  # fmt: skip
    """A prepared upload of `blob` (this `version` of it, naming `endpoint` if given), submitted
    to the fake service."""
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, blob, version), "received")
    estimate = {"training_hours": 1.5, "training_usd": 5.5, "hosting_usd_per_hour": 3.673,
                "basis": {"training_price_usd_per_hour": 3.673}}  # fmt: skip
    report = {"sha256": "d" * 64, "estimate": estimate, "endpoint": endpoint}
    run = ledger.advance(run, RunState.PREPARED, "prepared", details={"report": report})
    return submit_run(settings, ledger, run, backend)


@pytest.fixture
def setup(fake: FakeAzureML, ledger: Ledger, azurite: Azurite) -> tuple[Settings, AzureMLBackend, Run]:
    settings = load_settings({**ENV, "AzureWebJobsStorage": azurite.connection_string})
    backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
    return settings, backend, _submitted(settings, ledger, backend, f"chats-{uuid.uuid4().hex[:8]}.jsonl", "0x1")


@pytest.mark.parametrize("casing", [lambda event: event, _pascal], ids=["camelCase", "PascalCase"])
@pytest.mark.parametrize(
    "success",
    [lambda job: _documented(RUN_COMPLETED, job),
     lambda job: _documented(RUN_STATUS_CHANGED, job, runType="azureml.PipelineRun", runStatus="Completed")],
    ids=["RunCompleted", "RunStatusChanged"],
)  # fmt: skip
def test_either_success_event_registers_and_starts_the_deployment(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run], success: Any, casing: Any
) -> None:
    settings, backend, run = setup
    assert run.state == RunState.SUBMITTED
    job = _job_ends(fake, run, "Completed")
    outcome = _deliver(settings, ledger, backend, casing(success(job)))
    assert outcome == f"run {run.run_id} is deploying"
    training = ledger.get(run.run_id).details["spend"]["training"]  # priced as the estimate was
    assert training["usd"] == pytest.approx(training["hours"] * 3.673, abs=1e-4) and training["estimated_usd"] == 5.5
    assert len(fake.sent("PUT", "/models/")) == 1 and len(fake.sent("PUT", "/onlineEndpoints/")) == 1
    # Both event types arrive for one job (two subscriptions): the second changes nothing.
    _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, job))
    assert len(fake.sent("PUT", "/models/")) == 1 and len(fake.sent("PUT", "/onlineEndpoints/")) == 1


@pytest.mark.parametrize("casing", [lambda event: event, _pascal], ids=["camelCase", "PascalCase"])
def test_the_documented_failure_sample_fails_the_run_with_the_services_reason(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run], casing: Any
) -> None:
    settings, backend, run = setup
    job = _job_ends(fake, run, "Failed")
    failed = _documented(RUN_STATUS_CHANGED, job, runStatus="failed")  # lowercase, as in the sample
    assert _deliver(settings, ledger, backend, casing(failed)) == f"run {run.run_id} is failed"
    assert f"Azure ML job {job} failed: see https://ml.azure.com/runs/" in (ledger.get(run.run_id).reason or "")


def test_step_runs_and_other_jobs_are_ignored(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run]
) -> None:
    settings, backend, run = setup
    step = _documented(RUN_COMPLETED, run.job_name or "", runType="azureml.StepRun")
    other = _documented(RUN_COMPLETED, "someone-elses-job")
    assert _deliver(settings, ledger, backend, step).startswith("ignored: run type 'azureml.StepRun'")
    assert _deliver(settings, ledger, backend, other) == "ignored: job someone-elses-job was not submitted by this app"
    assert ledger.get(run.run_id).state == RunState.SUBMITTED


def test_a_busy_service_leaves_the_run_where_it_is_for_the_next_attempt(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run]
) -> None:
    settings, backend, run = setup
    job = _job_ends(fake, run, "Completed")
    fake.fail_next("PUT", "/models/", 409, CONFLICT)
    assert _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, job)) == (
        f"run {run.run_id} is completed"
    )  # not failed: the janitor's tick drives it on
    assert drive_run(settings, ledger, run.run_id, backend).state == RunState.DEPLOYING


def _serving_at_no_traffic(fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run]) -> str:
    """The run's job completed, its endpoint and deployment provisioned, its held-out data there:
    the next drive evaluates it. Its endpoint's name."""
    settings, backend, run = setup
    _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, _job_ends(fake, run, "Completed")))
    endpoint = ledger.get(run.run_id).endpoint_name or ""
    held_out = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prepared = container(settings.storage, PREPARED_CONTAINER)
    prepared.upload_blob(f"{run.run_id}/{TEST_FILE}", json.dumps(held_out).encode() + b"\n", overwrite=True)
    fake.endpoints[endpoint]["properties"]["provisioningState"] = "Succeeded"
    drive_run(settings, ledger, run.run_id, backend)  # creates the deployment
    deployment_name = ledger.get(run.run_id).deployment_name or ""
    fake.deployments[(endpoint, deployment_name)]["properties"]["provisioningState"] = "Succeeded"
    return endpoint


def test_a_deployment_step_the_service_refuses_fails_the_run_and_removes_its_endpoint(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run]
) -> None:
    settings, backend, run = setup
    endpoint = _serving_at_no_traffic(fake, ledger, setup)
    refused = {"error": {"code": "BadRequest", "message": "traffic must add up to 100"}}
    fake.fail_next("PUT", rf"/onlineEndpoints/{endpoint}$", 400, refused)  # routing the traffic
    failed = drive_run(settings, ledger, run.run_id, backend)
    assert failed.state == RunState.DEPLOY_FAILED
    assert "400 BadRequest: traffic must add up to 100" in (failed.reason or "")
    # Recorded first, then removed: a handler that lost the race would have removed nothing.
    history = [entry.message for entry in ledger.history(run.run_id)]
    assert history[-2].startswith("rolling_out step failed") and history[-1] == f"endpoint {endpoint} deleted"
    assert fake.sent("DELETE", rf"/onlineEndpoints/{endpoint}$")


def test_a_deployment_answering_no_held_out_conversation_is_refused_then_its_endpoint_removed(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run]
) -> None:
    settings, backend, run = setup
    endpoint = _serving_at_no_traffic(fake, ledger, setup)
    fake.fail_next("POST", "/score", 424, {"message": "upstream model error"})
    fake.fail_next("POST", "/score", 502, {"message": "Liveness probe failed"})
    refused = drive_run(settings, ledger, run.run_id, backend)
    assert refused.state == RunState.REFUSED and "1 of 1 held-out conversations got no answer" in (refused.reason or "")
    assert "502" in (refused.reason or "")  # what the last request shape got
    assert [entry.message for entry in ledger.history(run.run_id)][-1] == f"endpoint {endpoint} deleted"
    assert fake.sent("DELETE", rf"/onlineEndpoints/{endpoint}$") and not fake.sent("DELETE", "/deployments/")


def test_a_service_busy_for_longer_than_a_day_fails_the_run(
    fake: FakeAzureML, ledger: Ledger, setup: tuple[Settings, AzureMLBackend, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, backend, run = setup
    job = _job_ends(fake, run, "Completed")
    monkeypatch.setattr(deployment, "GIVE_UP_AFTER", timedelta(0))  # as if the day had passed
    fake.fail_next("PUT", "/models/", 409, CONFLICT)
    _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, job))
    failed = ledger.get(run.run_id)
    assert failed.state == RunState.DEPLOY_FAILED and "409 Conflict: a concurrent write" in (failed.reason or "")


def _trained_and_ready(fake: FakeAzureML, ledger: Ledger, settings: Settings, backend: AzureMLBackend, blob: str,
                       version: str, eval_loss: float) -> Run:  # fmt: skip
    """Another version of dataset `blob`: its job completes having logged `eval_loss`, its
    deployment is created at 0% and provisioned; the next drive judges it."""
    run = _submitted(settings, ledger, backend, blob, version)
    fake.set_job_metrics(run.job_name or "", {"loss": [(10, eval_loss + 0.2)], "eval_loss": [(10, eval_loss)]})
    _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, _job_ends(fake, run, "Completed")))
    run = ledger.get(run.run_id)
    held_out = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prepared = container(settings.storage, PREPARED_CONTAINER)
    prepared.upload_blob(f"{run.run_id}/{TEST_FILE}", json.dumps(held_out).encode() + b"\n", overwrite=True)
    endpoint = fake.endpoints[run.endpoint_name or ""]
    endpoint["properties"]["provisioningState"] = "Succeeded"
    drive_run(settings, ledger, run.run_id, backend)  # the deployment, on the endpoint that now exists
    fake.deployments[(run.endpoint_name or "", run.deployment_name or "")]["properties"]["provisioningState"] = (
        "Succeeded"
    )
    return run


def _traffic_puts(fake: FakeAzureML, endpoint: str) -> list[dict[str, int]]:
    return [request.body["properties"]["traffic"] for request in fake.sent("PUT", rf"/onlineEndpoints/{endpoint}$")
            if request.body["properties"].get("traffic")]  # fmt: skip


def test_retraining_through_the_service_rolls_out_refuses_worse_and_rolls_back(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    from shared import janitor

    settings = load_settings({**ENV, "AzureWebJobsStorage": azurite.connection_string, "ROLLOUT_SHARE_PERCENT": "10",
                              "ROLLOUT_STEP_MINUTES": "0.01", "ENDPOINT_IDLE_MINUTES": "100000"})  # fmt: skip
    backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
    blob = f"support-{uuid.uuid4().hex[:8]}.jsonl"

    v1 = _trained_and_ready(fake, ledger, settings, backend, blob, "0x1", eval_loss=1.5)
    endpoint = v1.endpoint_name or ""
    v1 = drive_run(settings, ledger, v1.run_id, backend)
    assert v1.state == RunState.DEPLOYED, v1.reason
    assert v1.details["gate"]["loss"]["note"] == "no loss to compare with: the loss check was skipped"
    assert _traffic_puts(fake, endpoint) == [{v1.deployment_name: 100}]
    assert [served for served in fake.served if served[0] == endpoint] == [(endpoint, v1.deployment_name)]

    v2 = _trained_and_ready(fake, ledger, settings, backend, blob, "0x2", eval_loss=1.2)
    assert v2.endpoint_name == endpoint and len(fake.sent("PUT", rf"/onlineEndpoints/{endpoint}$")) == 2
    # A second deployment of the same endpoint: created with the run's tags, at no traffic.
    (created,) = fake.sent("PUT", rf"/onlineEndpoints/{endpoint}/deployments/{v2.deployment_name}$")
    assert created.body["tags"]["run_id"] == v2.run_id
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 100}
    v2 = drive_run(settings, ledger, v2.run_id, backend)
    assert v2.state == RunState.ROLLING_OUT, v2.reason
    logged = "eval_loss logged by each job, each on its own test split"
    assert v2.details["gate"]["loss"] == {
        "candidate": 1.2,
        "baseline": 1.5,
        "limit": pytest.approx(1.515),
        "how": logged,
    }
    # The held-out conversation went to each deployment by name, before any traffic moved.
    assert fake.served[-2:] == [(endpoint, v2.deployment_name), (endpoint, v1.deployment_name)]
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 90, v2.deployment_name: 10}
    time.sleep(1)  # the rollout step (0.01 min) passes
    assert drive_run(settings, ledger, v2.run_id, backend).state == RunState.DEPLOYED
    assert _traffic_puts(fake, endpoint)[-1] == {v2.deployment_name: 100}  # the SDK sends no 0% entries
    assert ledger.get(v1.run_id).state == RunState.SUPERSEDED
    assert not fake.sent("DELETE", "/deployments/")

    v3 = _trained_and_ready(fake, ledger, settings, backend, blob, "0x3", eval_loss=4.0)
    v3 = drive_run(settings, ledger, v3.run_id, backend)
    assert v3.state == RunState.REFUSED and "held-out loss 4.0000 is +233.3%" in (v3.reason or "")
    assert _traffic_puts(fake, endpoint)[-1] == {v2.deployment_name: 100}  # the live one untouched
    (deleted,) = fake.sent("DELETE", "/deployments/")
    assert deleted.path.endswith(f"/onlineEndpoints/{endpoint}/deployments/{v3.deployment_name}")
    assert not fake.sent("DELETE", rf"/onlineEndpoints/{endpoint}$")

    assert rollback(settings, ledger, endpoint, backend).run_id == v1.run_id
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 100}
    assert (ledger.get(v1.run_id).state, ledger.get(v2.run_id).state) == (RunState.DEPLOYED, RunState.ROLLED_BACK)
    assert backend.endpoint(endpoint).model == ModelRef(v1.model_name or "", v1.model_version or "")

    # Past the rollback window, the janitor deletes the rolled-back deployment, and only it.
    report = janitor.sweep(
        settings, ledger, past_due=False, now=datetime.now(UTC) + timedelta(hours=25), backend=backend
    )
    assert report["deployments_deleted"] == [f"{endpoint}/{v2.deployment_name}"] and report["deleted"] == []
    assert fake.sent("DELETE", "/deployments/")[-1].path.endswith(f"/deployments/{v2.deployment_name}")
    assert ledger.get(v2.run_id).state == RunState.TORN_DOWN


def _settings(azurite: Azurite, **more: str) -> Settings:
    return load_settings({**ENV, "AzureWebJobsStorage": azurite.connection_string, "ENDPOINT_IDLE_MINUTES": "100000",
                          **more})  # fmt: skip


def test_a_rollback_during_a_rollout_or_while_a_version_is_judged(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    settings = _settings(azurite, ROLLOUT_SHARE_PERCENT="10", ROLLOUT_STEP_MINUTES="60")
    backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
    blob = f"support-{uuid.uuid4().hex[:8]}.jsonl"
    v1 = drive_run(settings, ledger, _trained_and_ready(fake, ledger, settings, backend, blob, "0x1", 1.5).run_id,
                   backend)  # fmt: skip
    endpoint = v1.endpoint_name or ""
    v2 = drive_run(settings, ledger, _trained_and_ready(fake, ledger, settings, backend, blob, "0x2", 1.2).run_id,
                   backend)  # fmt: skip
    assert v2.state == RunState.ROLLING_OUT
    # A third version waits while the second one rolls out: one run changes the traffic at a time.
    v3 = _trained_and_ready(fake, ledger, settings, backend, blob, "0x3", 1.3)
    assert drive_run(settings, ledger, v3.run_id, backend).state == RunState.DEPLOYING
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 90, v2.deployment_name: 10}

    # While a version is being evaluated (here the third, as if it held the endpoint for its gate),
    # a rollback is refused and changes nothing.
    ledger.hold_endpoint(endpoint, v3.run_id, lambda _: True)
    with pytest.raises(RollbackError, match=f"run {v3.run_id} is being evaluated for it"):
        rollback(settings, ledger, endpoint, backend)
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 90, v2.deployment_name: 10}
    ledger.free_endpoint(endpoint, v3.run_id)

    # During the rollout: back to the version being replaced, which never stopped being deployed.
    assert rollback(settings, ledger, endpoint, backend).run_id == v1.run_id
    assert _traffic_puts(fake, endpoint)[-1] == {v1.deployment_name: 100}
    assert (ledger.get(v1.run_id).state, ledger.get(v2.run_id).state) == (RunState.DEPLOYED, RunState.ROLLED_BACK)
    again = f"serving all the traffic again: {v2.deployment_name} was rolled back"
    assert ledger.history(v1.run_id)[-1].message == again

    # Then the third goes, judged against what serves again.
    v3 = drive_run(settings, ledger, v3.run_id, backend)
    assert v3.state == RunState.ROLLING_OUT and v3.details["gate"]["compared_with"] == v1.deployment_name


def test_the_janitor_keeps_replaced_deployments_of_kept_endpoints_and_when_it_cannot_tell(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    from shared import janitor

    settings = _settings(azurite, ROLLOUT_SHARE_PERCENT="0")  # all at once
    backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
    blob = f"support-{uuid.uuid4().hex[:8]}.jsonl"
    v1 = drive_run(settings, ledger, _trained_and_ready(fake, ledger, settings, backend, blob, "0x1", 1.5).run_id,
                   backend)  # fmt: skip
    v2 = drive_run(settings, ledger, _trained_and_ready(fake, ledger, settings, backend, blob, "0x2", 1.2).run_id,
                   backend)  # fmt: skip
    assert (ledger.get(v1.run_id).state, v2.state) == (RunState.SUPERSEDED, RunState.DEPLOYED)
    endpoint, later = v1.endpoint_name or "", datetime.now(UTC) + timedelta(hours=25)

    fake.endpoints[endpoint]["tags"]["keep"] = "true"
    assert janitor.sweep(settings, ledger, past_due=False, now=later, backend=backend)["deployments_deleted"] == []
    fake.endpoints[endpoint]["tags"].pop("keep")
    denied = {"error": {"code": "AuthorizationFailed", "message": "no read access to the workspace"}}
    fake.fail_next("GET", r"/onlineEndpoints$", 403, denied)
    cannot_list = janitor.sweep(settings, ledger, past_due=False, now=later, backend=backend)
    assert cannot_list["deployments_deleted"] == [] and cannot_list["errors"]
    assert ledger.get(v1.run_id).state == RunState.SUPERSEDED and not fake.sent("DELETE", "/deployments/")

    report = janitor.sweep(settings, ledger, past_due=False, now=later, backend=backend)
    assert report["deployments_deleted"] == [f"{endpoint}/{v1.deployment_name}"]
    assert fake.sent("DELETE", "/deployments/")[-1].path.endswith(f"/deployments/{v1.deployment_name}")
    assert ledger.get(v1.run_id).state == RunState.TORN_DOWN and ledger.get(v2.run_id).state == RunState.DEPLOYED


def test_an_endpoint_this_app_did_not_make_is_never_deployed_to_or_deleted(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    settings = _settings(azurite)
    backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
    backend.workspace.online_endpoints.begin_create_or_update(ManagedOnlineEndpoint(name="theirs", auth_mode="key"))
    run = _submitted(settings, ledger, backend, f"support-{uuid.uuid4().hex[:8]}.jsonl", "0x1", endpoint="theirs")
    _deliver(settings, ledger, backend, _documented(RUN_COMPLETED, _job_ends(fake, run, "Completed")))
    failed = ledger.get(run.run_id)
    assert failed.state == RunState.DEPLOY_FAILED and "theirs exists and is not managed by this app" in (
        failed.reason or ""
    )
    assert not fake.sent("PUT", "/onlineEndpoints/theirs/deployments/") and not fake.sent("DELETE", "/theirs")
