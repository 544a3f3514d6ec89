"""The Azure ML backend through the real azure-ai-ml SDK, against a fake service at the HTTP
transport level: every assertion is about the REST requests the SDK really sends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError

from shared.backends.azureml.backend import DEPLOYMENT, AzureMLBackend, PreflightError, model_version_for
from shared.backends.azureml.component import merge_parameters
from shared.backends.interface import BackendError, DeployProgress, DeployState, JobReport, JobRequest, ModelRef
from shared.intake import submit_run
from shared.ledger import Ledger, Run, RunState, Upload
from shared.settings import load_settings
from shared.vocabulary import DATASETS_CONTAINER
from tests.fake_azureml import (
    ARM,
    LEGACY_TAGS,
    PHI3_RETIRED_METADATA,
    PHI4_SYSTEM_METADATA,
    PHI4_TAGS,
    WORKSPACE_ENV,
    FakeAzureML,
    FakeCredential,
    registry_model,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {**WORKSPACE_ENV, "BASE_MODEL": "Phi-4:8"}
PREPARED = "azureml://datastores/finetune_prepared/paths/chats-0123456789ab"
REQUEST = JobRequest("ft-chats-0123456789ab", PREPARED, "chats", {"num_train_epochs": 2, "learning_rate": 2e-5},
                     {"run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64})  # fmt: skip
CONVERSATION = [{"role": "user", "content": "hi"}]


def _unchecked(status: JobReport) -> list[str]:
    return [note for note in status.notes if "VM sizes" in note]


def _backend(fake: FakeAzureML, **env: str) -> AzureMLBackend:
    return AzureMLBackend(load_settings({**ENV, **env}), transport=fake, credential=FakeCredential())


@pytest.fixture
def fake() -> FakeAzureML:
    return FakeAzureML()


def test_submission_puts_the_registry_pipeline_with_our_inputs_settings_and_tags(fake: FakeAzureML) -> None:
    status = _backend(fake).submit(REQUEST)
    assert status.status == "NotStarted"
    (put,) = fake.sent("PUT", "/jobs/")
    assert put.path == f"{ARM}/jobs/{REQUEST.job_name}"  # the deterministic name
    body = put.body["properties"]
    assert body["jobType"] == "Pipeline"
    assert body["experimentName"] == "chat_completion_finetune"
    assert body["settings"]["force_rerun"] is True and body["settings"]["continue_on_step_failure"] is False
    assert body["tags"] == {"managed-by": "finetune-on-upload", "base_model": "Phi-4:8", "dataset": "chats",
                            "run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64}  # fmt: skip
    node = body["jobs"]["chat_completion_pipeline"]
    assert node["componentId"] == "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest"
    inputs = {name: spec.get("value", spec.get("uri")) for name, spec in node["inputs"].items()}
    assert inputs["mlflow_model_path"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    # Read with the compute cluster's identity through the workspace's datastore: no https:// URI.
    assert inputs["train_file_path"] == f"{PREPARED}/train_sft.jsonl"
    assert inputs["test_file_path"] == f"{PREPARED}/test_sft.jsonl"
    assert "identity" not in body  # a pipeline-level identity is ignored with pipeline components
    assert node["inputs"]["train_file_path"]["job_input_type"] == "uri_file"
    assert {inputs[f"compute_{step}"] for step in ("model_import", "preprocess", "finetune", "model_evaluation")} == {
        "gpu-a100"
    }
    assert inputs["number_of_gpu_to_use_finetuning"] == "1"  # discovered from the workspace's VM sizes
    # Ours, then the model's model_specific_defaults, then the upload's overrides; flags as strings.
    assert inputs["num_train_epochs"] == "2" and inputs["learning_rate"] == "2e-05"
    assert inputs["precision"] == "16" and inputs["save_total_limit"] == "1"
    assert inputs["apply_lora"] == "true" and inputs["apply_deepspeed"] == "true"
    assert inputs["deepspeed_stage"] == "3" and inputs["lr_scheduler_type"] == "cosine"
    assert node["outputs"]["mlflow_model_folder"]["value"] == "${{parent.outputs.trained_model}}"
    assert body["outputs"]["trained_model"]["jobOutputType"] == "mlflow_model"
    assert body["displayName"] == "Phi-4-ultrachat-bs1-cosine-ds3-lora-save_limit1-seqlen-1"
    assert not fake.sent("GET", "/jobs/.*/stream")  # never blocks on the job
    assert _unchecked(status) == []  # both VM sizes were checked against the system metadata's lists
    assert any("the model's own defaults override ours" in note for note in status.notes)


def test_model_specific_defaults_keys_that_are_not_component_inputs_are_dropped() -> None:
    tag = str({"precision": 16, "learning_rate_min": 1e-6, "learning_rate_max": 1e-4})
    merged, warnings = merge_parameters(tag, {})
    assert merged["precision"] == "16" and "learning_rate_min" not in merged and "learning_rate_max" not in merged
    assert any("'learning_rate_min'" in warning for warning in warnings)


def test_inputs_must_come_through_a_datastore(fake: FakeAzureML) -> None:
    public = JobRequest("ft-x", "https://stapp.blob.core.windows.net/prepared/x", "chats")
    with pytest.raises(BackendError, match="must be an azureml://datastores/ URI"):
        _backend(fake).submit(public)
    assert not fake.sent("PUT", "/jobs/")


def test_a_redelivered_submission_finds_the_job_instead_of_creating_a_second(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    backend.submit(REQUEST)
    assert len(fake.sent("PUT", "/jobs/")) == 1


def test_a_pinned_component_version_and_gpus_override(fake: FakeAzureML) -> None:
    _backend(fake, AZUREML_COMPONENT_VERSION="0.0.82", AZUREML_GPUS_PER_NODE="4").submit(REQUEST)
    node = fake.sent("PUT", "/jobs/")[0].body["properties"]["jobs"]["chat_completion_pipeline"]
    assert node["componentId"].endswith("/chat_completion_pipeline/versions/0.0.82")
    assert node["inputs"]["number_of_gpu_to_use_finetuning"]["value"] == "4"
    assert len(fake.sent("GET", "/vmSizes")) == 1  # for the quota check only, in the workspace's region
    assert fake.sent("GET", "/locations/eastus/usages")


def _phi4(**changes: object) -> dict[str, object]:
    return registry_model("Phi-4", "8", **{"tags": PHI4_TAGS, "system_metadata": PHI4_SYSTEM_METADATA, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda f: f.registry_models.update({("Phi-4", "8"): _phi4(archived=True)}),
         "Phi-4:8 is archived"),  # the flag the SDK's Model drops, read from the service's body
        (lambda f: f.registry_models.update({("Phi-4", "8"): _phi4(system_metadata=PHI3_RETIRED_METADATA)}),
         "retired for fine-tuning on 2025-08-30"),
        (lambda f: f.registry_models.update({("Phi-4", "8"): _phi4(
            tags={**LEGACY_TAGS, "FinetuneRetirementDate": "2025-08-30"}, system_metadata=None)}),
         "retired for fine-tuning on 2025-08-30"),
        (lambda f: f.registry_models.update({("Phi-4", "8"): _phi4(system_metadata={
            **PHI4_SYSTEM_METADATA, "tasks": {"fineTuningTasks": ["text-classification"]}})}),
         "fine-tunable for text-classification, not chat-completion"),
        (lambda f: setattr(f, "compute_size", "Standard_ND40rs_v2"),
         r"Standard_ND40rs_v2 is not allowed for Phi-4:8 \(system metadata supportedComputes.finetuneComputes\)"),
        (lambda f: setattr(f, "compute_size", "Standard_NC24rs_v3"), "Standard_NC24rs_v3 is retired"),
        (lambda f: setattr(f, "compute_state", "Failed"), "failed provisioning state"),
        (lambda f: setattr(f, "compute_type", "Kubernetes"), "gpu-a100 is not an Azure ML compute cluster"),
    ],
)  # fmt: skip
def test_preflight_refuses_before_anything_is_created(fake: FakeAzureML, setup: object, says: str) -> None:
    setup(fake)  # type: ignore[operator]
    with pytest.raises(PreflightError, match=says):
        _backend(fake).submit(REQUEST)
    assert not [r for r in fake.requests if r.method in ("PUT", "POST", "DELETE")]


def test_a_model_described_only_by_the_old_tags_is_checked_against_them(fake: FakeAzureML) -> None:
    fake.registry_models[("Phi-4", "8")] = _phi4(tags=LEGACY_TAGS, system_metadata=None)
    fake.compute_size = "Standard_NC40ads_H100_v5"  # in today's metadata, not in the old tag
    with pytest.raises(PreflightError, match=r"not allowed for Phi-4:8 \(tag finetune_compute_allow_list\)"):
        _backend(fake).submit(REQUEST)
    fake.compute_size = "Standard_NC24ads_A100_v4"
    refused = _backend(fake, AZUREML_INSTANCE_TYPE="Standard_NC96ads_A100_v4")  # off the old inference list
    with pytest.raises(PreflightError, match=r"deployment VM size .* \(tag inference_compute_allow_list\)"):
        refused.submit(REQUEST)
    assert _unchecked(_backend(fake).submit(REQUEST)) == []


@pytest.mark.parametrize("metadata_key", ["system_metadata", "systemMetadata"])
def test_system_metadata_is_read_under_either_spelling_and_as_a_string(fake: FakeAzureML, metadata_key: str) -> None:
    stringified = {key: json.dumps(value) for key, value in PHI4_SYSTEM_METADATA.items()}  # as republished
    fake.registry_models[("Phi-4", "8")] = _phi4(system_metadata=stringified, metadata_key=metadata_key)
    fake.compute_size = "Standard_NC40ads_H100_v5"  # allowed only by the metadata
    assert _unchecked(_backend(fake).submit(REQUEST)) == []


def test_a_model_naming_no_allow_list_is_submitted_and_says_so(fake: FakeAzureML) -> None:
    fake.registry_models[("Phi-4", "8")] = _phi4(system_metadata={"tasks": {"fineTuningTasks": ["chat-completion"]}})
    finetune, inference = _unchecked(_backend(fake).submit(REQUEST))
    assert (
        "Phi-4:8 names no fine-tuning VM sizes" in finetune and "Standard_NC24ads_A100_v4 was not checked" in finetune
    )
    assert "system metadata supportedComputes.finetuneComputes or tag finetune_compute_allow_list" in finetune
    assert "Phi-4:8 names no deployment VM sizes" in inference


def test_preflight_names_a_missing_cluster_model_or_bad_parameter(fake: FakeAzureML) -> None:
    with pytest.raises(PreflightError, match="compute cluster gpu-v100 does not exist"):
        _backend(fake, AZUREML_COMPUTE_CLUSTER="gpu-v100").submit(REQUEST)
    with pytest.raises(PreflightError, match="Phi-3-mini-4k-instruct:1 is not in the azureml registry"):
        _backend(fake, BASE_MODEL="Phi-3-mini-4k-instruct:1").submit(REQUEST)
    bad = JobRequest("ft-x", PREPARED, "chats", {"precision": "8"})
    with pytest.raises(PreflightError, match="precision='8'"):
        _backend(fake).submit(bad)
    assert not fake.sent("PUT", "/jobs/")


def test_a_model_whose_every_version_is_archived_has_no_latest(fake: FakeAzureML) -> None:
    """`models.get(name, label="latest")` raises ValidationException (not ResourceNotFoundError)
    when the registry lists no active version; it becomes a refusal naming the model."""
    fake.registry_models[("Phi-3-mini-4k-instruct", "15")] = registry_model(
        "Phi-3-mini-4k-instruct", "15", LEGACY_TAGS, system_metadata=PHI3_RETIRED_METADATA, archived=True
    )
    with pytest.raises(PreflightError, match=r"Phi-3-mini-4k-instruct has no active version .* does not exist"):
        _backend(fake, BASE_MODEL="Phi-3-mini-4k-instruct").submit(REQUEST)
    (listing,) = fake.sent("GET", "/models/Phi-3-mini-4k-instruct/versions$")
    assert listing.query["$orderBy"] == ["createdtime desc"] and listing.query["$top"] == ["1"]


def test_the_default_base_model_is_phi4_and_its_latest_version_is_read(fake: FakeAzureML) -> None:
    fake.registry_models[("Phi-4", "7")] = _phi4(created_at="2025-12-01T00:00:00Z")
    backend = AzureMLBackend(load_settings({**ENV, "BASE_MODEL": ""}), transport=fake, credential=FakeCredential())
    assert backend.base_model().label == "Phi-4:8"


def _discoverable(name: str, version: str, created_at: str, **changes: object) -> dict[str, object]:
    return registry_model(name, version, PHI4_TAGS, **{"system_metadata": PHI4_SYSTEM_METADATA,  # type: ignore[arg-type]
                                                       "created_at": created_at, **changes})  # fmt: skip


def test_discovery_picks_the_newest_generation_then_version_then_date_never_the_name(fake: FakeAzureML) -> None:
    discover = AzureMLBackend(load_settings({**ENV, "BASE_MODEL": "auto"}), transport=fake, credential=FakeCredential())
    models = fake.registry_models
    models[("Phi-3-mini-4k-instruct", "15")] = registry_model(
        "Phi-3-mini-4k-instruct", "15", LEGACY_TAGS, system_metadata=PHI3_RETIRED_METADATA, archived=True
    )
    models[("Phi-3.5-mini-instruct", "6")] = _discoverable("Phi-3.5-mini-instruct", "6", "2026-03-01T00:00:00Z")
    models[("Phi-4-reasoning", "3")] = _discoverable(  # newer, but not fine-tunable for chat
        "Phi-4-reasoning",
        "3",
        "2026-06-01T00:00:00Z",
        system_metadata={"tasks": {"inferenceTasks": ["chat-completion"]}},
    )
    # "Phi-4-mini-instruct" sorts after "Phi-4" by name; its lower version decides instead.
    models[("Phi-4-mini-instruct", "1")] = _discoverable("Phi-4-mini-instruct", "1", "2026-05-01T00:00:00Z")
    assert discover.base_model().label == "Phi-4:8"
    models[("Phi-4-mini-instruct", "8")] = _discoverable("Phi-4-mini-instruct", "8", "2026-05-02T00:00:00Z")
    assert discover.base_model().label == "Phi-4-mini-instruct:8"  # same version: the later one
    del models[("Phi-4-mini-instruct", "1")]
    models[("Phi-4-mini-instruct", "8")] = _discoverable("Phi-4-mini-instruct", "8", "2026-01-15T00:00:00Z")
    with pytest.raises(PreflightError, match="cannot choose between Phi-4:8, Phi-4-mini-instruct:8"):
        discover.base_model()


def test_429_and_503_are_retried(fake: FakeAzureML) -> None:
    fake.fail_next("GET", "/computes/", 503, {"error": {"code": "ServiceUnavailable", "message": "busy"}})
    fake.fail_next("PUT", "/jobs/", 429, {"error": {"code": "TooManyRequests", "message": "slow down"}})
    assert _backend(fake).submit(REQUEST).status == "NotStarted"
    assert len(fake.sent("GET", "/computes/")) == 2
    assert len(fake.sent("PUT", "/jobs/")) == 2


def _completed_job(fake: FakeAzureML) -> AzureMLBackend:
    backend = _backend(fake)
    backend.submit(REQUEST)
    fake.set_job_status(REQUEST.job_name, "Completed")
    return backend


def test_registration_is_deterministic_and_never_duplicated(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    first, second = backend.register(REQUEST.job_name), backend.register(REQUEST.job_name)
    assert first == second == ModelRef("Phi-4-chats", model_version_for(REQUEST.job_name))
    (put,) = fake.sent("PUT", "/models/")
    assert put.path == f"{ARM}/models/Phi-4-chats/versions/{first.version}"
    body = put.body["properties"]
    assert body["modelType"] == "mlflow_model"
    assert body["modelUri"] == f"azureml://jobs/{REQUEST.job_name}/outputs/trained_model"
    assert body["tags"]["job"] == REQUEST.job_name and body["tags"]["dataset_sha256"] == "d" * 64
    assert "Phi-4:8" in body["description"] and "chats" in body["description"]


def test_registering_an_unfinished_job_is_refused(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    with pytest.raises(BackendError, match="is NotStarted; only a Completed job"):
        backend.register(REQUEST.job_name)


def _serving_deployment(fake: FakeAzureML, tags: dict[str, str] | None = None) -> tuple[AzureMLBackend, ModelRef]:
    """A registered model whose endpoint and deployment have been created and have succeeded."""
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.continue_deployment(model, "ep-chats", tags or {}, lambda: CONVERSATION)
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    backend.continue_deployment(model, "ep-chats", tags or {}, lambda: CONVERSATION)
    fake.deployments[("ep-chats", DEPLOYMENT)]["properties"]["provisioningState"] = "Succeeded"
    return backend, model


def test_deployment_goes_endpoint_then_deployment_then_smoke_test_then_traffic(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    tags = {"run_id": "chats-0123456789ab"}
    deploying = DeployProgress(DeployState.DEPLOYING)
    assert backend.continue_deployment(model, "ep-chats", tags, lambda: CONVERSATION) == deploying
    (endpoint_put,) = fake.sent("PUT", r"/onlineEndpoints/ep-chats$")
    assert endpoint_put.body["properties"]["authMode"] == "Key"
    assert endpoint_put.body["tags"] == {"managed-by": "finetune-on-upload", "run_id": "chats-0123456789ab"}

    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    assert backend.continue_deployment(model, "ep-chats", tags, lambda: CONVERSATION) == deploying
    (deployment_put,) = fake.sent("PUT", f"/onlineEndpoints/ep-chats/deployments/{DEPLOYMENT}$")
    properties = deployment_put.body["properties"]
    assert properties["model"].endswith(f"/models/Phi-4-chats/versions/{model.version}")
    assert properties["instanceType"] == "Standard_NC24ads_A100_v4"
    assert deployment_put.body["sku"]["capacity"] == 1
    assert properties["livenessProbe"]["initialDelay"] == "PT10M"
    assert properties["requestSettings"]["requestTimeout"] == "PT1M30S"
    assert not fake.sent("POST", "/score")  # nothing is sent to a deployment still provisioning

    fake.deployments[("ep-chats", DEPLOYMENT)]["properties"]["provisioningState"] = "Succeeded"
    progress = backend.continue_deployment(model, "ep-chats", tags, lambda: CONVERSATION)
    assert progress.state == DeployState.DEPLOYED
    (attempt,) = progress.smoke_test
    assert (attempt.shape, attempt.status, attempt.answered) == ("input_string as a list of messages", 200, True)
    assert "a reply from the deployment" in attempt.excerpt
    (score,) = fake.sent("POST", "/score")
    assert score.headers["azureml-model-deployment"] == DEPLOYMENT
    assert score.headers["Authorization"] == "Bearer primary-ep-chats"
    # The current serving container's shape: a flat list of messages, no `params`.
    assert score.body == {"input_data": {"input_string": CONVERSATION, "parameters": {
        "temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}}}  # fmt: skip
    assert fake.sent("POST", "/onlineEndpoints/ep-chats/listKeys")
    traffic = fake.sent("PUT", r"/onlineEndpoints/ep-chats$")[-1]
    assert traffic.body["properties"]["traffic"] == {DEPLOYMENT: 100}

    duplicate = backend.continue_deployment(model, "ep-chats", tags, lambda: CONVERSATION)  # a duplicate event
    assert duplicate == DeployProgress(DeployState.DEPLOYED)
    assert len(fake.sent("PUT", r"/onlineEndpoints/ep-chats$")) == 2
    assert len(fake.sent("PUT", "/deployments/")) == 1 and len(fake.sent("POST", "/score")) == 1


def test_an_mlflow_deployment_refusing_the_flat_shape_gets_the_nested_one_and_is_kept(fake: FakeAzureML) -> None:
    fake.serving = "mlflow"
    backend, model = _serving_deployment(fake)
    progress = backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)
    assert progress.state == DeployState.DEPLOYED
    first, second = progress.smoke_test
    assert (first.status, first.answered) == (424, False) and "unexpected error occurred in scoring" in first.excerpt
    assert (second.shape, second.status, second.answered) == (
        "input_string as a list of conversations, with params", 200, True)  # fmt: skip
    flat, nested = fake.sent("POST", "/score")
    assert flat.body["input_data"]["input_string"] == CONVERSATION and "params" not in flat.body
    assert nested.body["input_data"]["input_string"] == [CONVERSATION] and nested.body["params"] == {}
    assert not fake.sent("DELETE", "/deployments/")
    assert fake.sent("PUT", r"/onlineEndpoints/ep-chats$")[-1].body["properties"]["traffic"] == {DEPLOYMENT: 100}


def test_the_deployment_fails_only_when_every_shape_failed_and_is_left_to_the_flow(fake: FakeAzureML) -> None:
    backend, model = _serving_deployment(fake)
    fake.fail_next("POST", "/score", 424, {"message": "upstream model error"})
    fake.fail_next("POST", "/score", 502, {"message": "Liveness probe failed"})
    progress = backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)
    assert progress.state == DeployState.FAILED
    assert [attempt.status for attempt in progress.smoke_test] == [424, 502]
    message = progress.message or ""
    assert "smoke test of ep-chats failed with every request shape" in message
    assert "424" in message and "upstream model error" in message and "Liveness probe failed" in message
    assert not fake.sent("DELETE", "")  # the flow removes the endpoint once the failure is recorded
    assert not [r for r in fake.sent("PUT", r"/onlineEndpoints/ep-chats$") if r.body["properties"].get("traffic")]


def test_a_failed_deployment_reports_its_logs_as_the_reason(fake: FakeAzureML) -> None:
    backend, model = _serving_deployment(fake)
    fake.deployments[("ep-chats", DEPLOYMENT)]["properties"]["provisioningState"] = "Failed"
    progress = backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)
    assert progress.state == DeployState.FAILED and progress.smoke_test == ()
    assert (progress.message or "").startswith(f"deployment {DEPLOYMENT} of ep-chats failed")
    assert not fake.sent("DELETE", "") and not fake.sent("POST", "/score")


def test_a_quota_error_becomes_a_failure_with_the_service_text(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    quota = "Not enough quota available for Standard_NC24ads_A100_v4 in SubscriptionId. Current usage/limit: 24/24."
    fake.fail_next("PUT", "/deployments/", 400, {"error": {"code": "InferencingClientCallFailed", "message": quota}})
    with pytest.raises(BackendError, match="Not enough quota available for Standard_NC24ads_A100_v4"):
        backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)


def test_a_deployment_size_off_the_inference_allow_list_is_refused(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    refused = AzureMLBackend(load_settings({**ENV, "AZUREML_INSTANCE_TYPE": "Standard_NC4as_T4_v3"}),
                             transport=fake, credential=FakeCredential())  # fmt: skip
    with pytest.raises(
        PreflightError,
        match=r"NC4as_T4_v3 is not allowed for Phi-4:8 \(system metadata supportedComputes.inferenceComputes\)",
    ):
        refused.deploy(model, "ep-chats", {})
    assert not fake.sent("PUT", "/onlineEndpoints/")


def test_listing_reads_idle_evidence_from_metrics_and_deletion_does_not_wait(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.continue_deployment(model, "ep-chats", {}, lambda: CONVERSATION)
    fake.endpoints["other"] = {**fake.endpoints["ep-chats"], "name": "other", "tags": {"owner": "someone"}}
    fake.metrics["ep-chats"] = [
        {"timeStamp": "2026-11-24T10:00:00Z", "total": 3.0},
        {"timeStamp": "2026-11-24T10:05:00Z", "total": None},
        {"timeStamp": "2026-11-24T10:06:00Z", "total": 1.0},
    ]
    (listed,) = backend.list_endpoints()
    assert listed.name == "ep-chats" and listed.last_request_at == "2026-11-24T10:06:00Z"
    (query,) = fake.sent("GET", "/providers/microsoft.insights/metrics")
    assert query.query["metricnames"] == ["RequestsPerMinute"]
    assert query.query["metricnamespace"] == ["Microsoft.MachineLearningServices/workspaces/onlineEndpoints"]
    assert query.query["interval"] == ["PT1M"] and query.query["aggregation"] == ["Total"]
    assert backend.delete_endpoint("ep-chats") is True
    (delete,) = fake.sent("DELETE", r"/onlineEndpoints/ep-chats$")
    assert delete.path == f"{ARM}/onlineEndpoints/ep-chats"
    assert backend.delete_endpoint("ep-chats") is False


def test_dry_run_prints_the_job_body_with_no_network(tmp_path: Path) -> None:
    prepared = tmp_path / "chats"
    prepared.mkdir()
    for name in ("train_sft.jsonl", "test_sft.jsonl"):
        (prepared / name).write_text("{}\n")
    env = {
        **os.environ,
        **ENV,
        "AZUREML_GPUS_PER_NODE": "2",
        "AZURE_CLIENT_ID": "",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "submit", "--backend", "azureml", "--dry-run", "--prepared", str(prepared),
         "--job", "ft-chats", "--set", "num_train_epochs=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    node = body["properties"]["jobs"]["chat_completion_pipeline"]
    assert node["inputs"]["number_of_gpu_to_use_finetuning"]["value"] == "2"
    assert node["inputs"]["num_train_epochs"]["value"] == "1"
    # The same datastore path a real submission uses: prepared/<name>/ through AZUREML_DATASTORE.
    assert (
        node["inputs"]["train_file_path"]["uri"] == "azureml://datastores/finetune_prepared/paths/chats/train_sft.jsonl"
    )
    assert "PUT" in result.stderr and "/jobs/ft-chats" in result.stderr


def test_the_local_trainers_own_packing_option_is_refused(fake: FakeAzureML) -> None:
    with pytest.raises(PreflightError, match="'packing' is not an input of chat_completion_pipeline"):
        _backend(fake).submit(JobRequest("ft-packed", PREPARED, "chats", {"packing": True}))
    assert not fake.sent("PUT", "/jobs/")


AUTHORIZATION_FAILED = {"error": {"code": "AuthorizationFailed", "message": (
    "The client 'finetune-app' with object id '11111111-2222-3333-4444-555555555555' does not have authorization to "
    "perform action 'Microsoft.MachineLearningServices/workspaces/computes/read' over scope '/subscriptions/x' or "
    "the scope is invalid.")}}  # fmt: skip


def _prepared_run(ledger: Ledger) -> Run:
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, f"chats-{uuid.uuid4().hex[:8]}.jsonl", "0x1"), "received")
    return ledger.advance(run, RunState.PREPARED, "prepared", details={"report": {"sha256": "d" * 64}})


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda f: f.fail_next("GET", "/computes/", 403, AUTHORIZATION_FAILED),
         "Azure ML submission failed: 403 AuthorizationFailed: The client 'finetune-app'"),
        (lambda f: f.registry_models.clear(), "base model Phi-4 has no active version"),
        (lambda f: f.fail_next("PUT", "/jobs/", 400, {"error": {"code": "UserError", "message": "Compute gpu-a100 "
                                                               "is not reachable from registry component"}}),
         "400 UserError: Compute gpu-a100 is not reachable"),
    ],
)  # fmt: skip
def test_a_refused_submission_is_a_recorded_failure_with_the_service_message(
    fake: FakeAzureML, ledger: Ledger, setup: object, says: str
) -> None:
    setup(fake)  # type: ignore[operator]
    env = {**ENV, "BASE_MODEL": "Phi-4"}
    run = submit_run(load_settings(env), ledger, _prepared_run(ledger), _backend(fake, **env))
    assert run.state == RunState.FAILED
    assert says in (run.reason or "")
    assert [entry.state for entry in ledger.history(run.run_id)][-1] == RunState.FAILED


def test_the_submission_records_what_the_registry_left_unchecked(fake: FakeAzureML, ledger: Ledger) -> None:
    fake.registry_models[("Phi-4", "8")] = _phi4(system_metadata={"tasks": {"fineTuningTasks": ["chat-completion"]}})
    run = submit_run(load_settings(ENV), ledger, _prepared_run(ledger), _backend(fake))
    assert run.state == RunState.SUBMITTED
    (entry,) = [entry for entry in ledger.history(run.run_id) if entry.state == RunState.SUBMITTED]
    assert "names no fine-tuning VM sizes" in entry.message and "names no deployment VM sizes" in entry.message
    assert len([note for note in run.details["submission_notes"] if "VM sizes" in note]) == 2
    (put,) = fake.sent("PUT", "/jobs/")
    uri = put.body["properties"]["jobs"]["chat_completion_pipeline"]["inputs"]["train_file_path"]["uri"]
    assert uri == f"azureml://datastores/finetune_prepared/paths/{run.run_id}/train_sft.jsonl"


class RefusingCredential(FakeCredential):
    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        raise ClientAuthenticationError("ManagedIdentityCredential authentication unavailable")


@pytest.mark.parametrize(
    ("call", "setup", "says"),
    [
        (lambda b: b.register(REQUEST.job_name), lambda f: f.fail_next("PUT", "/models/", 403, AUTHORIZATION_FAILED),
         "Azure ML registration failed: 403 AuthorizationFailed"),
        (lambda b: b.continue_deployment(b.register(REQUEST.job_name), "ep-chats", {}, lambda: CONVERSATION),
         lambda f: f.fail_next("PUT", "/onlineEndpoints/", 409, {"error": {"code": "Conflict", "message": "busy"}}),
         "Azure ML deployment failed: 409 Conflict: busy"),
        (lambda b: b.list_endpoints(), lambda f: f.fail_next("GET", "/onlineEndpoints", 403, AUTHORIZATION_FAILED),
         "Azure ML listing endpoints failed: 403"),
        (lambda b: b.job_status("ft-unknown"), lambda f: f.fail_next("GET", "/jobs/", 403, AUTHORIZATION_FAILED),
         "Azure ML reading a job's status failed: 403"),
    ],
)  # fmt: skip
def test_every_sdk_error_becomes_a_backend_error(fake: FakeAzureML, call: object, setup: object, says: str) -> None:
    backend = _completed_job(fake)
    setup(fake)  # type: ignore[operator]
    with pytest.raises(BackendError, match=says):
        call(backend)  # type: ignore[operator]


def test_a_credential_that_cannot_get_a_token_is_a_backend_error(fake: FakeAzureML) -> None:
    backend = AzureMLBackend(load_settings(ENV), transport=fake, credential=RefusingCredential())
    with pytest.raises(BackendError, match="Azure ML submission failed: ManagedIdentityCredential authentication"):
        backend.submit(REQUEST)
