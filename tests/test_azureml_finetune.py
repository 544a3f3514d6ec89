"""The `azureml-finetune` backend through the real azure-ai-ml SDK against the transport-level fake:
the fine-tuning job's PUT body (the SDK's own builder, azure-rest-api-specs 2024-10-01-preview
`FineTuningJob`), the service's registered model, serverless endpoints, marketplace subscriptions,
scoring, teardown and every refusal, asserted on the REST requests sent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.backends.azureml.workspace import PreflightError
from shared.backends.azureml_finetune.backend import FineTuneBackend
from shared.backends.azureml_finetune.serverless import serverless_name
from shared.backends.interface import (
    BackendError,
    DeployState,
    JobRequest,
    ModelRef,
    TransientBackendError,
)
from shared.deployment import drive_run, rollback
from shared.dev.azurite import Azurite
from shared.events import handle_job_event
from shared.intake import submit_run
from shared.ledger import Ledger, Run, RunState, Upload
from shared.settings import Settings, load_settings
from shared.storage import container
from shared.vocabulary import DATASETS_CONTAINER, PREPARED_CONTAINER, RUN_STATUS_CHANGED, TEST_FILE
from tests.fake_azureml import (
    ARM,
    PHI4_MINI_TAGS,
    PHI4_SYSTEM_METADATA,
    WORKSPACE_ENV,
    WORKSPACE_ID,
    FakeAzureML,
    FakeCredential,
    registry_model,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in WORKSPACE_ENV.items() if k != "AZUREML_COMPUTE_CLUSTER"}, "ML_BACKEND": "azureml-finetune"}
MANAGED = {**ENV, "AZUREML_FINETUNE_COMPUTE": "Standard_NC24ads_A100_v4"}
PREPARED = "azureml://datastores/finetune_prepared/paths/chats-0123456789ab"
REQUEST = JobRequest("ft-chats-0123456789ab", PREPARED, "chats", {"num_train_epochs": 2, "learning_rate": 2e-5},
                     {"run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64})  # fmt: skip
JOB_API_VERSION = "2024-10-01-preview"  # azure-ai-ml 1.35.2 sends FineTuning jobs with this one
SERVERLESS_API_VERSION = "2024-01-01-preview"  # and serverless endpoints, subscriptions with this one
MINISTRAL = "azureml://registries/azureml-mistral/models/Ministral-3B"


def _phi4_mini(version: str = "3", tags: dict[str, str] | None = None, **metadata: Any) -> dict[str, Any]:
    return registry_model("Phi-4-mini-instruct", version, PHI4_MINI_TAGS if tags is None else tags,
                          system_metadata={**PHI4_SYSTEM_METADATA, **metadata})  # fmt: skip


@pytest.fixture
def fake() -> FakeAzureML:
    service = FakeAzureML()
    service.registry_models[("Phi-4-mini-instruct", "3")] = _phi4_mini()
    return service


def _backend(fake: FakeAzureML, **env: str) -> FineTuneBackend:
    return FineTuneBackend(load_settings({**ENV, **env}), transport=fake, credential=FakeCredential())


def _job_body(fake: FakeAzureML) -> dict[str, Any]:
    (put,) = fake.sent("PUT", "/jobs/")
    assert put.path == f"{ARM}/jobs/{REQUEST.job_name}" and put.query["api-version"] == [JOB_API_VERSION]
    return dict(put.body["properties"])


def test_serverless_submission_puts_the_finetuning_job_pinned_with_our_data_and_hyperparameters(
    fake: FakeAzureML,
) -> None:
    status = _backend(fake).submit(REQUEST)
    assert status.status == "NotStarted" and status.notes == ()  # region checked against the model's list
    body = _job_body(fake)
    assert body["jobType"] == "FineTuning"
    details = body["fineTuningDetails"]
    assert details["modelProvider"] == "Custom" and details["taskType"] == "chatCompletion"  # as the SDK sends it
    # The registry's latest version, pinned at submission.
    assert details["model"] == {"uri": "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/3",
                                "jobInputType": "mlflow_model"}  # fmt: skip
    assert details["trainingData"] == {"uri": f"{PREPARED}/train_sft.jsonl", "jobInputType": "uri_file"}
    assert details["validationData"] == {"uri": f"{PREPARED}/test_sft.jsonl", "jobInputType": "uri_file"}
    # Ours (per_device_train_batch_size) and the upload's, as strings; nothing else.
    assert details["hyperParameters"] == {"num_train_epochs": "2", "per_device_train_batch_size": "1",
                                          "learning_rate": "2e-05"}  # fmt: skip
    # Serverless: no compute, no instance types.
    assert "computeId" not in body and not (body.get("resources") or {}).get("instanceTypes")
    assert body["outputs"] == {"registered_model": {"assetName": "Phi-4-mini-instruct-chats-0123456789ab",
                                                    "jobOutputType": "mlflow_model"}}  # fmt: skip
    assert body["experimentName"] == "chat_completion_finetune"
    assert body["tags"] == {"managed-by": "finetune-on-upload", "base_model": "Phi-4-mini-instruct:3",
                            "base_model_id": "azureml://registries/azureml/models/Phi-4-mini-instruct",
                            "dataset": "chats", "run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64}  # fmt: skip
    assert not fake.sent("GET", "/computes/") and not fake.sent("GET", "/usages")  # no cluster, no quota


def test_managed_compute_sends_the_instance_type_after_checking_sizes_and_quota(fake: FakeAzureML) -> None:
    _backend(fake, **MANAGED).submit(REQUEST)
    body = _job_body(fake)
    assert body["resources"]["instanceTypes"] == ["Standard_NC24ads_A100_v4"] and "computeId" not in body
    assert fake.sent("GET", "/usages")  # the VM family's quota, before anything was created
    fake.quota["standardNCADSA100v4Family"] = (90, 96)
    with pytest.raises(PreflightError, match="quota"):
        _backend(fake, **MANAGED).submit(JobRequest("ft-other", PREPARED, "chats"))
    with pytest.raises(PreflightError, match="fine-tuning VM size Standard_D4s_v3 is not allowed for Phi-4-mini"):
        _backend(fake, **{**MANAGED, "AZUREML_FINETUNE_COMPUTE": "Standard_D4s_v3"}).submit(
            JobRequest("ft-small", PREPARED, "chats")
        )
    assert len(fake.sent("PUT", "/jobs/")) == 1


@pytest.mark.parametrize(
    ("model", "env", "says"),
    [
        (_phi4_mini(deploymentOptions=["MaaP"]), {},
         "not offered for serverless fine-tuning (its deployment options: MaaP)"),
        (_phi4_mini(tags={"maas-finetuning-deploy-regions": "westus3"}), {},
         "fine-tuned serverless only in westus3 (tag maas-finetuning-deploy-regions), not in the workspace's "
         "region eastus"),
        (_phi4_mini(maasFinetuning={"maasFinetuningDeployRegions": ["swedencentral"]}), {},
         "only in swedencentral (system metadata maasFinetuning.maasFinetuningDeployRegions)"),
        (_phi4_mini(tasks={"fineTuningTasks": ["text-classification"]}), {}, "not chat-completion"),
        (_phi4_mini(), {"BASE_MODEL": "Phi-4-mini-instruct:9"}, "Phi-4-mini-instruct:9 is not in the azureml registry"),
    ],
    ids=["not-serverless", "region-tag", "region-metadata", "not-chat", "missing-version"],
)  # fmt: skip
def test_preflight_refuses_a_model_not_fine_tunable_serverless_here_before_anything_is_created(
    fake: FakeAzureML, model: dict[str, Any], env: dict[str, str], says: str
) -> None:
    fake.registry_models[("Phi-4-mini-instruct", "3")] = model
    with pytest.raises(PreflightError, match=re.escape(says)):
        _backend(fake, **env).submit(REQUEST)
    assert not fake.sent("PUT", "")


def test_where_the_registry_names_no_regions_the_documented_ones_decide_else_it_says_so(fake: FakeAzureML) -> None:
    fake.registry_models[("Phi-4-mini-instruct", "3")] = _phi4_mini(tags={})
    assert _backend(fake).submit(REQUEST).notes == ()  # Foundry's table lists eastus for it
    fake.registry_models[("Llama-3.3-70B-Instruct", "1")] = registry_model(
        "Llama-3.3-70B-Instruct", "1", {}, system_metadata=PHI4_SYSTEM_METADATA
    )
    with pytest.raises(PreflightError, match=r"only in westus3 \(Foundry's documented regions; the registry names"):
        _backend(fake, BASE_MODEL="Llama-3.3-70B-Instruct").submit(JobRequest("ft-llama", PREPARED, "chats"))
    fake.registry_models[("House-chat-model", "1")] = registry_model(
        "House-chat-model", "1", {}, system_metadata=PHI4_SYSTEM_METADATA
    )
    status = _backend(fake, BASE_MODEL="House-chat-model").submit(JobRequest("ft-house", PREPARED, "chats"))
    assert status.notes == ("House-chat-model:1 names no serverless fine-tuning regions (system metadata "
                            "maasFinetuning.maasFinetuningDeployRegions or tag maas-finetuning-deploy-regions are "
                            "missing): eastus was not checked",)  # fmt: skip


def test_a_training_parameter_the_job_does_not_take_is_refused_by_name(fake: FakeAzureML) -> None:
    with pytest.raises(PreflightError, match="does not take lora_r, packing: it takes num_train_epochs"):
        _backend(fake).submit(JobRequest("ft-x", PREPARED, "chats", {"lora_r": 16, "packing": True}))
    assert not fake.sent("PUT", "")


def test_the_estimate_prices_managed_compute_and_says_why_serverless_has_no_price(fake: FakeAzureML) -> None:
    from shared.costs.estimate import budget_refusal

    prices = {"VM_PRICES_USD_PER_HOUR": "Standard_NC24ads_A100_v4=4.0"}  # the fake's env turns the API off
    managed = _backend(fake, **{**MANAGED, **prices}).estimate(1_000_000, {})
    assert managed.basis["vm_size"] == "Standard_NC24ads_A100_v4" and managed.basis["gpus"] == 1
    assert managed.training_usd == pytest.approx((managed.training_hours or 0) * 4.0)
    serverless = _backend(fake, **prices).estimate(1_000_000, {})
    assert serverless.training_usd is None and serverless.basis["training_tokens"] == 1_000_000
    refusal = budget_refusal(serverless, 5.0) or ""
    assert "cannot be estimated (the per-token price of serverless fine-tuning is the model offer's" in refusal
    assert not fake.sent("PUT", "")


def test_a_redelivered_submission_finds_its_job(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    first, second = backend.submit(REQUEST), backend.submit(REQUEST)
    assert first.job_name == second.job_name and len(fake.sent("PUT", "/jobs/")) == 1


def test_the_experimental_builders_own_errors_become_a_backend_error(
    fake: FakeAzureML, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.35's builder without validation data raises UnboundLocalError (the real one, here)."""
    from azure.ai.ml import finetuning

    real = finetuning.create_finetuning_job
    monkeypatch.setattr(finetuning, "create_finetuning_job", lambda **kw: real(**{**kw, "validation_data": None}))
    with pytest.raises(BackendError, match="azure-ai-ml could not build the fine-tuning job: UnboundLocalError"):
        _backend(fake).submit(REQUEST)
    assert not fake.sent("PUT", "/jobs/")


def test_the_registered_output_is_the_model_and_nothing_is_registered_twice(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    with pytest.raises(BackendError, match="is NotStarted; only a Completed job has a model"):
        backend.register(REQUEST.job_name)
    fake.set_job_status(REQUEST.job_name, "Completed")  # the service registers its output
    model = backend.register(REQUEST.job_name)
    assert model == ModelRef("Phi-4-mini-instruct-chats-0123456789ab", "1") == backend.register(REQUEST.job_name)
    assert not fake.sent("PUT", "/models/")
    (listed, *_) = fake.sent("GET", "/models/Phi-4-mini-instruct-chats-0123456789ab/versions$")
    assert listed.path.startswith(ARM)


def test_a_completed_job_whose_model_is_not_there_yet_is_tried_again(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    fake.jobs[REQUEST.job_name]["properties"]["status"] = "Completed"  # its event before its registration
    with pytest.raises(TransientBackendError, match="is not registered yet"):
        backend.register(REQUEST.job_name)


def test_a_registered_model_is_found_by_its_job_else_as_the_only_version_of_its_name(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    fake.set_job_status(REQUEST.job_name, "Completed")
    name = "Phi-4-mini-instruct-chats-0123456789ab"
    del fake.models[(name, "1")]["properties"]["jobName"]  # a registration that names no job
    assert backend.register(REQUEST.job_name) == ModelRef(name, "1")
    fake.models[(name, "2")] = {**fake.models[(name, "1")], "id": f"{ARM}/models/{name}/versions/2", "name": "2"}
    with pytest.raises(TransientBackendError, match="is not registered yet"):  # two, neither this job's
        backend.register(REQUEST.job_name)


def test_the_dry_run_body_is_the_body_a_submission_puts(fake: FakeAzureML) -> None:
    backend = _backend(fake, BASE_MODEL="Phi-4-mini-instruct:3")
    dry = backend.dry_run(REQUEST)["properties"]
    backend.submit(REQUEST)
    sent = _job_body(fake)
    # Run from a git checkout (as these tests are), the SDK adds the checkout's mlflow.source.git.*
    # and azureml.git.* properties; the app in Azure runs from none.
    git = ("mlflow.source.git", "azureml.git")
    sent["properties"] = {k: v for k, v in sent["properties"].items() if not k.startswith(git)}
    assert dry == sent


def _registered(fake: FakeAzureML, backend: FineTuneBackend, request: JobRequest = REQUEST) -> ModelRef:
    backend.submit(request)
    fake.set_job_status(request.job_name, "Completed")
    return backend.register(request.job_name)


TAGS = {"managed-by": "finetune-on-upload", "run_id": "chats-0123456789ab"}


def test_serverless_deployment_puts_a_serverless_endpoint_of_the_fine_tuned_model(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    model = _registered(fake, backend)
    assert not backend.splits_traffic
    progress = backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    assert progress.state == DeployState.DEPLOYING
    (put,) = fake.sent("PUT", "/serverlessEndpoints/")
    assert put.path == f"{ARM}/serverlessEndpoints/ft-chats-1a2b3c4d-0123456789ab"
    assert put.query["api-version"] == [SERVERLESS_API_VERSION]
    model_id = f"azureml://locations/eastus/workspaces/{WORKSPACE_ID}/models/{model.name}/versions/1"
    assert put.body["properties"] == {"modelSettings": {"modelId": model_id}}
    assert put.body["sku"] == {"name": "Consumption"} and put.body["location"] == "eastus"
    assert put.body["tags"] == {**TAGS, "endpoint": "ft-chats-1a2b3c4d", "deployment": "run-0123456789ab",
                                "traffic": "0"}  # fmt: skip
    assert not fake.sent("PUT", "/marketplaceSubscriptions/")  # a Microsoft model needs none
    backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    assert len(fake.sent("PUT", "/serverlessEndpoints/")) == 1  # found, not made again
    fake.provision_serverless("ft-chats-1a2b3c4d-0123456789ab")
    assert backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS).state == DeployState.READY
    fake.provision_serverless("ft-chats-1a2b3c4d-0123456789ab", "Failed")
    failed = backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    assert failed.state == DeployState.FAILED and "is failed" in (failed.message or "")


def test_a_serverless_endpoint_of_that_name_not_made_by_this_app_is_never_touched(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    model = _registered(fake, backend)
    backend.deploy(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    fake.serverless_endpoints["ft-chats-1a2b3c4d-0123456789ab"]["tags"] = {}
    with pytest.raises(BackendError, match="exists and is not managed by this app"):
        backend.deploy(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)


def test_a_partners_model_is_subscribed_on_the_marketplace_before_it_is_fine_tuned(fake: FakeAzureML) -> None:
    """As azureml-examples' serverless notebook does: the subscription first, to the base model's
    registry id without its version; then the job; then its serverless endpoint."""
    fake.registry_models[("Ministral-3B", "2")] = registry_model(
        "Ministral-3B", "2", PHI4_MINI_TAGS, system_metadata=PHI4_SYSTEM_METADATA, registry="azureml-mistral"
    )
    backend = _backend(fake, BASE_MODEL=MINISTRAL)
    request = JobRequest("ft-chats-0123456789ab", PREPARED, "chats", {}, {"run_id": "chats-0123456789ab"})
    fake.subscription_status = "PendingFulfillmentStart"
    with pytest.raises(PreflightError, match="must be subscribed to the model's Azure Marketplace offer"):
        backend.submit(request)
    (subscribe,) = fake.sent("PUT", "/marketplaceSubscriptions/")
    assert subscribe.path == f"{ARM}/marketplaceSubscriptions/Ministral-3B-sub"
    assert subscribe.body == {"properties": {"modelId": MINISTRAL}}
    assert not fake.sent("PUT", "/jobs/")
    fake.marketplace_subscriptions["Ministral-3B-sub"]["properties"]["marketplaceSubscriptionStatus"] = "Subscribed"
    model = _registered(fake, backend, request)  # the fake refuses the job without the subscription
    assert _job_body(fake)["fineTuningDetails"]["model"]["uri"] == f"{MINISTRAL}/versions/2"
    assert backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS).state == (
        DeployState.DEPLOYING
    )
    assert len(fake.sent("PUT", "/serverlessEndpoints/")) == 1  # the fake refuses it without the subscription
    assert len(fake.sent("PUT", "/marketplaceSubscriptions/")) == 1  # found, by the model it is for
    fake.marketplace_subscriptions["Ministral-3B-sub"]["properties"]["marketplaceSubscriptionStatus"] = "Suspended"
    failed = backend.continue_deployment(model, "ft-chats-1a2b3c4d", "run-aaaaaaaaaaaa", TAGS)
    assert failed.state == DeployState.FAILED and "Ministral-3B-sub" in (failed.message or "")
    assert "is suspended" in (failed.message or "")


def test_a_subscription_made_elsewhere_under_another_name_is_used(fake: FakeAzureML) -> None:
    fake.registry_models[("Ministral-3B", "2")] = registry_model(
        "Ministral-3B", "2", PHI4_MINI_TAGS, system_metadata=PHI4_SYSTEM_METADATA, registry="azureml-mistral"
    )
    fake.marketplace_subscriptions["ministral-from-the-portal"] = {
        "id": f"{ARM}/marketplaceSubscriptions/ministral-from-the-portal", "name": "ministral-from-the-portal",
        "properties": {"modelId": MINISTRAL, "marketplaceSubscriptionStatus": "Subscribed",
                       "provisioningState": "Succeeded",
                       "marketplacePlan": {"publisherId": "mistralai", "offerId": "o", "planId": "p"}},
    }  # fmt: skip
    _backend(fake, BASE_MODEL=MINISTRAL).submit(REQUEST)
    assert not fake.sent("PUT", "/marketplaceSubscriptions/") and fake.sent("PUT", "/jobs/")


def _ready(fake: FakeAzureML, backend: FineTuneBackend, model: ModelRef, endpoint: str, deployment: str) -> None:
    tags = {**TAGS, "run_id": f"chats-{deployment.removeprefix('run-')}"}
    backend.deploy(model, endpoint, deployment, tags)
    fake.provision_serverless(f"{endpoint}-{deployment.removeprefix('run-')}")


def test_traffic_is_all_or_nothing_and_scoring_is_a_chat_completion_with_the_key(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    model = _registered(fake, backend)
    _ready(fake, backend, model, "ft-chats-1a2b3c4d", "run-0123456789ab")
    greedy = {"do_sample": False, "max_new_tokens": 200}  # the evaluation gate's
    body = {"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": greedy}}
    status, text = backend.score("ft-chats-1a2b3c4d", "run-0123456789ab", body)
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"].startswith("a reply")
    (chat,) = fake.sent("POST", "/v1/chat/completions")
    assert chat.url == "https://ft-chats-1a2b3c4d-0123456789ab.eastus.models.ai.azure.com/v1/chat/completions"
    assert chat.body == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0}
    assert chat.headers["Authorization"] == "Bearer sk-primary-ft-chats-1a2b3c4d-0123456789ab"  # from listKeys
    assert backend.endpoint("ft-chats-1a2b3c4d").scoring_uri is None  # at 0%: nothing serves yet
    with pytest.raises(BackendError, match="serve one deployment at a time, so the split"):
        backend.set_traffic("ft-chats-1a2b3c4d", {"run-0123456789ab": 10, "run-aaaaaaaaaaaa": 90})
    backend.set_traffic("ft-chats-1a2b3c4d", {"run-0123456789ab": 100})
    endpoint = backend.endpoint("ft-chats-1a2b3c4d")
    assert endpoint.traffic == {"run-0123456789ab": 100} and endpoint.state == "Succeeded"
    assert endpoint.scoring_uri == "https://ft-chats-1a2b3c4d-0123456789ab.eastus.models.ai.azure.com"
    assert endpoint.model == model and backend.keys("ft-chats-1a2b3c4d")["primary_key"].startswith("sk-primary-")
    assert backend.invoke("ft-chats-1a2b3c4d", {"messages": [{"role": "user", "content": "hi"}]})["output"] == (
        "a reply from the serverless endpoint ft-chats-1a2b3c4d-0123456789ab"
    )
    # Tags alone change (ServerlessEndpoints_Update): the serverless endpoint is not sent again.
    (retag,) = fake.sent("PATCH", "/serverlessEndpoints/")
    member_tags = {**TAGS, "endpoint": "ft-chats-1a2b3c4d", "deployment": "run-0123456789ab", "traffic": "100"}
    assert retag.body == {"tags": member_tags} and retag.query["api-version"] == [SERVERLESS_API_VERSION]
    assert len(fake.sent("PUT", "/serverlessEndpoints/")) == 1
    with pytest.raises(BackendError, match="no ready serverless endpoint ft-chats-1a2b3c4d-aaaaaaaaaaaa to route"):
        backend.set_traffic("ft-chats-1a2b3c4d", {"run-aaaaaaaaaaaa": 100})  # deleted, or never made
    assert backend.endpoint("ft-chats-1a2b3c4d").traffic == {"run-0123456789ab": 100}  # nothing changed


def test_idle_serverless_endpoints_are_kept_unless_their_requests_can_be_observed(fake: FakeAzureML) -> None:
    from shared import janitor

    backend = _backend(fake)
    model = _registered(fake, backend)
    _ready(fake, backend, model, "ft-chats-1a2b3c4d", "run-0123456789ab")
    backend.set_traffic("ft-chats-1a2b3c4d", {"run-0123456789ab": 100})
    rules = backend.settings.janitor
    later = datetime(2026, 11, 30, tzinfo=UTC)
    (listed,) = backend.list_endpoints()
    assert not listed.usage_observed and listed.last_request_at is None
    assert janitor.judge(listed, rules, later).evidence == (
        "its requests cannot be observed (no request metric): idleness is unknown"
    )
    # Unless the settings give such endpoints a lifetime: counted from the serving version's creation.
    limited = replace(rules, unobserved_max_hours=48)
    assert not janitor.judge(listed, limited, datetime(2026, 11, 21, 12, tzinfo=UTC)).delete
    verdict = janitor.judge(listed, limited, datetime(2026, 11, 22, 11, tzinfo=UTC))
    assert verdict.delete and "the limit for such endpoints is 48 h (ENDPOINT_UNOBSERVED_MAX_HOURS)" in verdict.evidence
    # Where the resource names a request metric, it is read as a managed endpoint's is.
    namespace = "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints"
    fake.serverless_metric_definitions = [{"name": {"value": "ModelRequests"}, "unit": "Count", "namespace": namespace}]
    fake.metrics["ft-chats-1a2b3c4d-0123456789ab"] = [{"timeStamp": "2026-11-21T09:00:00Z", "total": 3.0}]
    (listed,) = backend.list_endpoints()
    assert listed.usage_observed and listed.last_request_at == "2026-11-21T09:00:00Z"
    (query,) = fake.sent("GET", "/serverlessEndpoints/[^/]+/providers/microsoft.insights/metrics$")
    assert query.query["metricnames"] == ["ModelRequests"]
    assert janitor.judge(listed, rules, later).delete
    assert backend.delete_endpoint("ft-chats-1a2b3c4d") is True
    assert fake.sent("DELETE", "/serverlessEndpoints/ft-chats-1a2b3c4d-0123456789ab$") and not fake.serverless_endpoints
    assert backend.delete_endpoint("ft-chats-1a2b3c4d") is False


def test_managed_compute_deploys_the_registered_model_to_a_managed_online_endpoint(fake: FakeAzureML) -> None:
    backend = _backend(fake, **MANAGED)
    model = _registered(fake, backend)
    assert backend.splits_traffic
    backend.deploy(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    fake.endpoints["ft-chats-1a2b3c4d"]["properties"]["provisioningState"] = "Succeeded"
    backend.deploy(model, "ft-chats-1a2b3c4d", "run-0123456789ab", TAGS)
    (deployment,) = fake.sent("PUT", "/onlineEndpoints/ft-chats-1a2b3c4d/deployments/run-0123456789ab$")
    assert deployment.body["properties"]["model"].endswith(f"/models/{model.name}/versions/1")
    assert not fake.sent("PUT", "/serverlessEndpoints/")
    # The deployment size is checked again against the base model's list, found through the job's
    # lineage tags (the service's registration carries none of ours).
    resized = _backend(fake, **{**MANAGED, "AZUREML_INSTANCE_TYPE": "Standard_D4s_v3"})
    with pytest.raises(
        BackendError, match="deployment VM size Standard_D4s_v3 is not allowed for Phi-4-mini-instruct:3"
    ):
        resized.deploy(model, "ft-chats-1a2b3c4d", "run-bbbbbbbbbbbb", TAGS)
    assert len(fake.sent("PUT", "/deployments/")) == 1


def test_dry_run_prints_the_finetuning_job_body_with_no_network(tmp_path: Path) -> None:
    prepared = tmp_path / "chats"
    prepared.mkdir()
    for name in ("train_sft.jsonl", "test_sft.jsonl"):
        (prepared / name).write_text("{}\n")
    env = {**os.environ, **ENV, "AZURE_CLIENT_ID": "", "HTTPS_PROXY": "http://127.0.0.1:9"}

    def dry_run(base_model: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shared.cli", "submit", "--backend", "azureml-finetune", "--dry-run",
             "--prepared", str(prepared), "--job", "ft-chats", *options],
            cwd=REPO, env={**env, "BASE_MODEL": base_model}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    result = dry_run("Phi-4-mini-instruct:3", "--set", "num_train_epochs=1")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)["properties"]
    assert body["jobType"] == "FineTuning" and "computeId" not in body
    details = body["fineTuningDetails"]
    assert details["model"]["uri"] == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/3"
    assert details["trainingData"]["uri"] == "azureml://datastores/finetune_prepared/paths/chats/train_sft.jsonl"
    assert details["hyperParameters"]["num_train_epochs"] == "1"
    assert f"PUT https://management.azure.com{ARM}/jobs/ft-chats" in result.stderr
    assert "experimental" not in result.stderr  # the pinned SDK's warning on every use is silenced
    unpinned = dry_run("Phi-4-mini-instruct")
    assert unpinned.returncode == 1 and "a dry run needs BASE_MODEL with its version" in unpinned.stderr
    assert "Traceback" not in unpinned.stderr and "PUT" not in unpinned.stderr and not unpinned.stdout


def test_a_serverless_endpoint_not_made_by_this_app_fails_the_run_and_is_never_deleted(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    settings = load_settings({**ENV, "AzureWebJobsStorage": azurite.connection_string})
    backend = FineTuneBackend(settings, transport=fake, credential=FakeCredential())
    blob = f"support-{uuid.uuid4().hex[:8]}.jsonl"
    v1 = drive_run(settings, ledger, _trained(fake, ledger, settings, backend, blob, "0x1", 1.5, None).run_id, backend)
    assert v1.state == RunState.DEPLOYED, v1.reason
    v2 = _trained(fake, ledger, settings, backend, blob, "0x2", 1.2, None)
    name = serverless_name(v2.endpoint_name or "", v2.deployment_name or "")
    fake.serverless_endpoints[name]["tags"] = {"owner": "someone else"}  # as if it had been there before
    failed = drive_run(settings, ledger, v2.run_id, backend)
    assert failed.state == RunState.DEPLOY_FAILED and "is not managed by this app" in (failed.reason or "")
    assert name in fake.serverless_endpoints and not fake.sent("DELETE", f"/serverlessEndpoints/{name}$")
    assert backend.endpoint(v1.endpoint_name or "").traffic == {v1.deployment_name: 100}  # v1 serves on


# The flow: events, the gate, promotion, rollback and teardown, with the ledger in Azurite.
WORKSPACE_TOPIC = ARM


def _event(job: str, run_type: str | None) -> dict[str, Any]:
    """RunStatusChanged as documented (Event Grid's Azure Machine Learning schema); the runType
    of a fine-tuning job is not documented, so any is taken."""
    return {"experimentId": "0fa9dfaa", "experimentName": "chat_completion_finetune", "runId": job,
            "runType": run_type, "runTags": {}, "runProperties": {}, "runStatus": "Completed"}  # fmt: skip


def _trained(fake: FakeAzureML, ledger: Ledger, settings: Settings, backend: FineTuneBackend, blob: str,
             version: str, eval_loss: float, run_type: str | None) -> Run:  # fmt: skip
    """An upload of `blob` submitted, its job completed (logging `eval_loss`) and announced; its
    serverless endpoint created and provisioned: the next drive judges it."""
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, blob, version), "received")
    run = ledger.advance(run, RunState.PREPARED, "prepared", details={"report": {"sha256": "d" * 64}})
    run = submit_run(settings, ledger, run, backend)
    assert run.state == RunState.SUBMITTED, run.reason
    held_out = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prepared = container(settings.storage, PREPARED_CONTAINER)
    prepared.upload_blob(f"{run.run_id}/{TEST_FILE}", json.dumps(held_out).encode() + b"\n", overwrite=True)
    fake.set_job_metrics(run.job_name or "", {"loss": [(10, eval_loss + 0.2)], "eval_loss": [(10, eval_loss)]})
    fake.set_job_status(run.job_name or "", "Completed")
    handled = handle_job_event(settings, ledger, _event(run.job_name or "", run_type), RUN_STATUS_CHANGED,
                               WORKSPACE_TOPIC, f"experiments/0fa9dfaa/runs/{run.job_name}", backend)  # fmt: skip
    assert handled == f"run {run.run_id} is deploying"
    run = ledger.get(run.run_id)
    fake.provision_serverless(serverless_name(run.endpoint_name or "", run.deployment_name or ""))
    return run


def test_the_flow_serves_each_version_from_its_own_serverless_endpoint_and_rolls_back(
    fake: FakeAzureML, ledger: Ledger, azurite: Azurite
) -> None:
    from shared import janitor

    fake.registry_models[("Phi-4-mini-instruct", "3")] = _phi4_mini()
    settings = load_settings({**ENV, "AzureWebJobsStorage": azurite.connection_string, "ROLLOUT_SHARE_PERCENT": "10",
                              "ROLLOUT_STEP_MINUTES": "15", "ENDPOINT_IDLE_MINUTES": "100000"})  # fmt: skip
    backend = FineTuneBackend(settings, transport=fake, credential=FakeCredential())
    blob = f"support-{uuid.uuid4().hex[:8]}.jsonl"

    v1 = _trained(fake, ledger, settings, backend, blob, "0x1", 1.5, run_type=None)
    assert not fake.sent("PUT", "/models/")  # the service's registration is the model
    v1 = drive_run(settings, ledger, v1.run_id, backend)
    assert v1.state == RunState.DEPLOYED, v1.reason
    endpoint = v1.endpoint_name or ""
    v1_url = f"https://{serverless_name(endpoint, v1.deployment_name or '')}.eastus.models.ai.azure.com"
    assert v1.endpoint_url == v1_url and backend.endpoint(endpoint).traffic == {v1.deployment_name: 100}
    assert fake.served[-1] == (endpoint, v1.deployment_name)  # the gate's held-out conversation

    # No split on serverless endpoints: a version that passes takes all the traffic at once.
    v2 = _trained(fake, ledger, settings, backend, blob, "0x2", 1.2, run_type="azureml.FineTuning")
    v2 = drive_run(settings, ledger, v2.run_id, backend)
    assert v2.state == RunState.DEPLOYED, v2.reason
    assert "(the endpoint serves one deployment at a time)" in ledger.history(v2.run_id)[-2].message
    assert ledger.get(v1.run_id).state == RunState.SUPERSEDED
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 0, v2.deployment_name: 100}
    assert v2.endpoint_url != v1_url and backend.endpoint(endpoint).scoring_uri == v2.endpoint_url

    # A worse one is refused and its serverless endpoint deleted; v2 keeps serving.
    v3 = _trained(fake, ledger, settings, backend, blob, "0x3", 2.5, run_type="azureml.FineTuning")
    v3 = drive_run(settings, ledger, v3.run_id, backend)
    assert v3.state == RunState.REFUSED and "held-out loss 2.5000 is +108.3%" in (v3.reason or "")
    assert serverless_name(endpoint, v3.deployment_name or "") not in fake.serverless_endpoints
    assert backend.endpoint(endpoint).traffic == {v1.deployment_name: 0, v2.deployment_name: 100}

    serving = rollback(settings, ledger, endpoint, backend)
    assert serving.run_id == v1.run_id and backend.endpoint(endpoint).scoring_uri == v1_url
    assert ledger.get(v2.run_id).state == RunState.ROLLED_BACK

    # Past the rollback window the replaced version's serverless endpoint goes; the serving one stays.
    report = janitor.sweep(
        settings, ledger, past_due=False, now=datetime.now(UTC) + timedelta(hours=25), backend=backend
    )
    assert report["deployments_deleted"] == [f"{endpoint}/{v2.deployment_name}"], report
    assert "idleness is unknown" in report["kept"][endpoint]
    assert set(fake.serverless_endpoints) == {serverless_name(endpoint, v1.deployment_name or "")}
