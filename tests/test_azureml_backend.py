"""The Azure ML backend through the real azure-ai-ml SDK, against a fake service at the HTTP
transport level: every assertion is about the REST requests the SDK really sends."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError

from shared.backends.azureml.backend import AzureMLBackend, PreflightError, model_version_for
from shared.backends.azureml.component import merge_parameters
from shared.backends.interface import (
    BackendError,
    DeployProgress,
    DeployState,
    JobReport,
    JobRequest,
    ModelRef,
    TransientBackendError,
)
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


RUN_TAGS = {"run_id": "chats-0123456789ab"}
SECOND = JobRequest("ft-chats-second", PREPARED, "chats", {}, {"run_id": "chats-second"})


def _ready(fake: FakeAzureML, backend: AzureMLBackend, model: ModelRef, deployment: str) -> None:
    """`deployment` of ep-chats created (and the endpoint first, when missing) and succeeded."""
    backend.continue_deployment(model, "ep-chats", deployment, RUN_TAGS)
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    backend.continue_deployment(model, "ep-chats", deployment, RUN_TAGS)
    fake.deployments[("ep-chats", deployment)]["properties"]["provisioningState"] = "Succeeded"


def _blue_serving(fake: FakeAzureML) -> tuple[AzureMLBackend, ModelRef]:
    """ep-chats with its deployment blue taking all the traffic."""
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    _ready(fake, backend, model, "blue")
    backend.set_traffic("ep-chats", {"blue": 100})
    return backend, model


def _green_beside_blue(fake: FakeAzureML) -> tuple[AzureMLBackend, ModelRef, ModelRef]:
    """blue serving the first model, green (ready, at 0%) the second's."""
    backend, blue = _blue_serving(fake)
    backend.submit(SECOND)
    fake.set_job_status(SECOND.job_name, "Completed")
    green = backend.register(SECOND.job_name)
    _ready(fake, backend, green, "green")
    return backend, blue, green


def _traffic_puts(fake: FakeAzureML) -> list[Any]:
    return [put.body["properties"].get("traffic") for put in fake.sent("PUT", r"/onlineEndpoints/ep-chats$")]


def test_deployment_goes_endpoint_then_deployment_then_ready_at_no_traffic(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    deploying = DeployProgress(DeployState.DEPLOYING)
    assert backend.continue_deployment(model, "ep-chats", "blue", RUN_TAGS) == deploying
    (endpoint_put,) = fake.sent("PUT", r"/onlineEndpoints/ep-chats$")
    assert endpoint_put.body["properties"]["authMode"] == "Key"
    assert endpoint_put.body["tags"] == {"managed-by": "finetune-on-upload", "run_id": "chats-0123456789ab"}
    assert not endpoint_put.body["properties"].get("description")  # no model serves yet
    assert not fake.sent("PUT", "/deployments/")  # not before the endpoint has succeeded

    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    assert backend.continue_deployment(model, "ep-chats", "blue", RUN_TAGS) == deploying
    (deployment_put,) = fake.sent("PUT", "/onlineEndpoints/ep-chats/deployments/blue$")
    properties = deployment_put.body["properties"]
    assert properties["model"].endswith(f"/models/Phi-4-chats/versions/{model.version}")
    assert properties["instanceType"] == "Standard_NC24ads_A100_v4"
    assert deployment_put.body["sku"]["capacity"] == 1
    assert properties["livenessProbe"]["initialDelay"] == "PT10M"
    assert properties["requestSettings"]["requestTimeout"] == "PT1M30S"
    assert deployment_put.body["tags"] == {"managed-by": "finetune-on-upload", "run_id": "chats-0123456789ab"}
    assert len(fake.sent("GET", "/usages")) == 2  # the submission's check and the endpoint's: not a third

    fake.deployments[("ep-chats", "blue")]["properties"]["provisioningState"] = "Succeeded"
    assert backend.continue_deployment(model, "ep-chats", "blue", RUN_TAGS) == DeployProgress(DeployState.READY)
    assert backend.continue_deployment(model, "ep-chats", "blue", RUN_TAGS) == DeployProgress(DeployState.READY)
    assert len(fake.sent("PUT", "/deployments/")) == 1 and len(fake.sent("PUT", "/onlineEndpoints/ep-chats$")) == 1
    assert not fake.sent("POST", "/score")  # the flow smoke-tests it, and routes the traffic
    assert backend.endpoint("ep-chats").traffic == {"blue": 0}


def test_a_second_deployment_is_checked_and_leaves_the_traffic_as_it_is(fake: FakeAzureML) -> None:
    backend, blue = _blue_serving(fake)
    usages = len(fake.sent("GET", "/usages"))
    fake.quota = {"standardNCADSA100v4Family": (24, 24)}  # blue holds the family's whole quota
    with pytest.raises(PreflightError, match="for the endpoint's deployment: Standard_NC24ads_A100_v4 needs 24"):
        backend.deploy(blue, "ep-chats", "green", {"run_id": "chats-second"})
    assert not fake.sent("PUT", "/deployments/green$")
    fake.quota = {"standardNCADSA100v4Family": (24, 48)}
    backend.deploy(blue, "ep-chats", "green", {"run_id": "chats-second"})
    assert len(fake.sent("GET", "/usages")) == usages + 2  # each try checked the quota
    (green_put,) = fake.sent("PUT", "/onlineEndpoints/ep-chats/deployments/green$")
    assert green_put.body["tags"]["run_id"] == "chats-second"
    assert _traffic_puts(fake) == [{}, {"blue": 100}]  # the creation, then the routing: nothing since
    assert fake.endpoints["ep-chats"]["properties"]["traffic"] == {"blue": 100}
    assert backend.endpoint("ep-chats").traffic == {"blue": 100, "green": 0}


def test_traffic_moves_from_blue_to_green_and_the_description_follows_the_largest_share(fake: FakeAzureML) -> None:
    backend, blue, green = _green_beside_blue(fake)
    backend.set_traffic("ep-chats", {"blue": 90, "green": 10})
    assert _traffic_puts(fake)[-1] == {"blue": 90, "green": 10}
    assert fake.sent("PUT", r"/onlineEndpoints/ep-chats$")[-1].body["properties"]["description"] == (
        f"Phi-4-chats:{blue.version}"
    )
    backend.set_traffic("ep-chats", {"green": 100, "blue": 0})
    assert _traffic_puts(fake)[-1] == {"green": 100}  # the SDK sends no 0% entries; the PUT replaces the map
    endpoint = backend.endpoint("ep-chats")
    assert endpoint.traffic == {"green": 100, "blue": 0}
    assert endpoint.model == green  # read back from the description
    # The service answers with the model's ARM id; `azureml:name:version` is read too.
    fake.deployments[("ep-chats", "blue")]["properties"]["model"] = "azureml:Phi-4-chats:7"
    backend.set_traffic("ep-chats", {"blue": 100})
    assert backend.endpoint("ep-chats").model == ModelRef("Phi-4-chats", "7")
    backend.set_traffic("ep-chats", {"blue": 0})  # serving nothing
    assert _traffic_puts(fake)[-1] == {}
    assert backend.endpoint("ep-chats").model is None


def test_score_with_the_header_reaches_the_named_deployment_whatever_the_traffic(fake: FakeAzureML) -> None:
    backend, _, _ = _green_beside_blue(fake)
    body = {"input_data": {"input_string": CONVERSATION}}
    status, text = backend.score("ep-chats", "green", body)  # green takes 0%
    assert status == 200 and "a reply from the deployment green" in text
    score = fake.sent("POST", "/score")[-1]
    assert score.headers["azureml-model-deployment"] == "green"
    assert score.headers["Authorization"] == "Bearer primary-ep-chats"
    assert score.body == body
    status, text = backend.score("ep-chats", None, body)
    assert status == 200 and "a reply from the deployment blue" in text
    assert "azureml-model-deployment" not in fake.sent("POST", "/score")[-1].headers
    assert backend.invoke("ep-chats", body, deployment="green") == {"output": "a reply from the deployment green"}
    assert fake.served == [("ep-chats", "green"), ("ep-chats", "blue"), ("ep-chats", "green")]
    status, text = backend.score("ep-chats", "purple", body)
    assert status == 404 and "deployment purple not found" in text


def test_the_mlflow_container_refuses_the_flat_shape_and_answers_the_nested_one(fake: FakeAzureML) -> None:
    fake.serving = "mlflow"
    backend, _ = _blue_serving(fake)
    status, text = backend.score("ep-chats", "blue", {"input_data": {"input_string": CONVERSATION}})
    assert status == 424 and "unexpected error occurred in scoring" in text
    nested = {"input_data": {"input_string": [CONVERSATION]}, "params": {}}
    assert backend.score("ep-chats", "blue", nested) == (200, '[{"0": "a reply from the deployment blue"}]')


@pytest.mark.timeout(60)  # waiting on the poller would hang here
def test_deleting_a_deployment_starts_it_and_does_not_wait(fake: FakeAzureML) -> None:
    backend, _, _ = _green_beside_blue(fake)
    backend.set_traffic("ep-chats", {"green": 100})
    fake.deletions_finish = False
    try:
        assert backend.delete_deployment("ep-chats", "blue") is True
    finally:
        fake.deletions_finish = True  # the poller's thread ends at its next poll
    (delete,) = fake.sent("DELETE", "/deployments/")
    assert delete.path == f"{ARM}/onlineEndpoints/ep-chats/deployments/blue"
    assert ("ep-chats", "blue") not in fake.deployments and ("ep-chats", "green") in fake.deployments
    assert backend.delete_deployment("ep-chats", "blue") is False
    assert backend.endpoint("ep-chats").traffic == {"green": 100}


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda b: b.set_traffic("ep-chats", {"blue": 50, "purple": 50}),
         "Azure ML routing traffic failed: 400 UserError: Traffic rules reference deployments that do not exist in "
         "endpoint ep-chats: purple"),
        (lambda b: b.set_traffic("ep-chats", {"blue": 90, "green": 20}),
         "Azure ML routing traffic failed: 400 UserError: Traffic values of endpoint ep-chats must sum to 100 "
         r"\(or 0\), not 110"),
        (lambda b: b.delete_deployment("ep-chats", "blue"),
         "Azure ML deleting a deployment failed: 400 UserError: deployment blue takes 100% of endpoint ep-chats's "
         "traffic"),
    ],
)  # fmt: skip
def test_what_the_service_refuses_is_a_backend_error_with_its_message(fake: FakeAzureML, call: Any, says: str) -> None:
    backend, _, _ = _green_beside_blue(fake)
    with pytest.raises(BackendError, match=says):
        call(backend)
    assert fake.endpoints["ep-chats"]["properties"]["traffic"] == {"blue": 100}
    assert ("ep-chats", "blue") in fake.deployments


def test_a_failed_deployment_reports_its_own_logs_as_the_reason(fake: FakeAzureML) -> None:
    backend, _, green = _green_beside_blue(fake)
    fake.deployment_logs[("ep-chats", "blue")] = "blue is fine"
    fake.deployment_logs[("ep-chats", "green")] = "vllm: torch.OutOfMemoryError: CUDA out of memory"
    fake.deployments[("ep-chats", "green")]["properties"]["provisioningState"] = "Failed"
    progress = backend.continue_deployment(green, "ep-chats", "green", RUN_TAGS)
    assert progress.state == DeployState.FAILED
    assert progress.message == "deployment green of ep-chats failed: vllm: torch.OutOfMemoryError: CUDA out of memory"
    (logs,) = fake.sent("POST", "/getLogs")
    assert logs.path.endswith("/deployments/green/getLogs") and logs.body["tail"] == 20
    assert not fake.sent("DELETE", "") and not fake.sent("POST", "/score")  # the flow removes it


def test_a_quota_error_becomes_a_failure_with_the_service_text(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.continue_deployment(model, "ep-chats", "blue", {})
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    quota = "Not enough quota available for Standard_NC24ads_A100_v4 in SubscriptionId. Current usage/limit: 24/24."
    fake.fail_next("PUT", "/deployments/", 400, {"error": {"code": "InferencingClientCallFailed", "message": quota}})
    with pytest.raises(BackendError, match="Not enough quota available for Standard_NC24ads_A100_v4"):
        backend.continue_deployment(model, "ep-chats", "blue", {})


def test_a_deployment_size_off_the_inference_allow_list_is_refused(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    refused = AzureMLBackend(load_settings({**ENV, "AZUREML_INSTANCE_TYPE": "Standard_NC4as_T4_v3"}),
                             transport=fake, credential=FakeCredential())  # fmt: skip
    with pytest.raises(
        PreflightError,
        match=r"NC4as_T4_v3 is not allowed for Phi-4:8 \(system metadata supportedComputes.inferenceComputes\)",
    ):
        refused.deploy(model, "ep-chats", "blue", {})
    assert not fake.sent("PUT", "/onlineEndpoints/")


def test_listing_reads_idle_evidence_from_metrics_and_deletion_does_not_wait(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.continue_deployment(model, "ep-chats", "blue", {})
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
        (lambda b: b.continue_deployment(b.register(REQUEST.job_name), "ep-chats", "blue", {}),
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


MLFLOW_RUNS = f"/mlflow/v1.0{ARM}/api/2.0/mlflow/runs"


@pytest.mark.parametrize("nested", [False, True], ids=["step-under-job", "step-under-pipeline-component"])
def test_job_metrics_are_the_latest_each_run_logged_to_mlflow(fake: FakeAzureML, nested: bool) -> None:
    backend = _completed_job(fake)
    fake.set_job_metrics(REQUEST.job_name, {
        "loss": [(10, 2.1), (20, 1.6)], "eval_loss": [(10, 1.9), (20, 1.5)],
        "train_loss": [(20, 1.8)], "epoch": [(20, 1.0)],
    }, nested=nested)  # fmt: skip
    metrics = backend.job_metrics(REQUEST.job_name)
    assert metrics["eval_loss"] == 1.5 and metrics["loss"] == 1.6 and metrics["epoch"] == 1.0
    assert metrics["train_loss"] == 1.8  # the trainer's mean over the run, not its last logged loss
    assert metrics["perplexity"] == pytest.approx(math.exp(1.5)) and metrics["steps"] == 20
    # The workspace's tracking URI, over https, with an Azure Resource Manager token.
    (get,) = fake.sent("GET", f"{MLFLOW_RUNS}/get$")
    assert get.url.startswith(f"https://eastus.api.azureml.ms{MLFLOW_RUNS}/get?")
    assert get.query == {"run_id": [REQUEST.job_name]} and get.headers["Authorization"].startswith("Bearer ")
    (search,) = fake.sent("POST", f"{MLFLOW_RUNS}/search$")
    assert search.headers["Content-Type"] == "application/json"
    assert search.body["experiment_ids"] == [fake.mlflow_runs[REQUEST.job_name].experiment_id]
    assert search.body["filter"] == f"tags.mlflow.rootRunId = '{REQUEST.job_name}'"


def test_the_value_logged_last_wins_whichever_run_and_step_logged_it(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    fake.set_job_metrics(REQUEST.job_name, {"eval_loss": [(10, 1.9)]})
    fake.set_job_metrics(REQUEST.job_name, {"eval_loss": [(100, 1.4)]}, node="model_evaluation")
    fake.set_job_metrics(REQUEST.job_name, {"eval_loss": [(20, 1.5)]})  # the fine-tune run again, later
    assert backend.job_metrics(REQUEST.job_name)["eval_loss"] == 1.5


def test_a_job_without_an_evaluation_set_has_its_last_loss_and_no_perplexity(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    fake.set_job_metrics(REQUEST.job_name, {"loss": [(5, 2.4), (10, 2.2)]})
    fake.set_job_metrics(REQUEST.job_name, {}, node="model_import")  # a step that logs nothing
    assert backend.job_metrics(REQUEST.job_name) == {"loss": 2.2, "train_loss": 2.2, "steps": 10}


@pytest.mark.parametrize("root_tagged", [True, False])
def test_a_job_whose_runs_logged_no_metrics_has_none(fake: FakeAzureML, root_tagged: bool) -> None:
    backend = _completed_job(fake)
    if not root_tagged:  # undocumented either way: then the search finds no run, and MLflow answers {}
        del fake.mlflow_runs[REQUEST.job_name].tags["mlflow.rootRunId"]
    assert backend.job_metrics(REQUEST.job_name) == {}
    assert fake.sent("POST", f"{MLFLOW_RUNS}/search$")  # its runs were searched, and none had any


MLFLOW_UNAVAILABLE = {"error_code": "INTERNAL_ERROR", "message": "the tracking store is unavailable"}


@pytest.mark.parametrize(
    ("method", "api", "status", "body", "says"),
    [
        ("POST", "search", 403, AUTHORIZATION_FAILED,
         "Azure ML reading a job's metrics failed: 403 AuthorizationFailed: The client 'finetune-app'"),
        ("GET", "get", 500, MLFLOW_UNAVAILABLE,  # MLflow's own error shape
         "Azure ML reading a job's metrics failed: 500 the tracking store is unavailable"),
    ],
)  # fmt: skip
def test_an_mlflow_error_is_a_backend_error_with_the_service_message(
    fake: FakeAzureML, method: str, api: str, status: int, body: Any, says: str
) -> None:
    backend = _completed_job(fake)
    fake.set_job_metrics(REQUEST.job_name, {"eval_loss": [(20, 1.5)]})
    fake.fail_next(method, f"{MLFLOW_RUNS}/{api}$", status, body)
    with pytest.raises(BackendError, match=says) as refused:
        backend.job_metrics(REQUEST.job_name)
    # A 5xx is worth asking again later (the client has no retry policy of its own).
    assert isinstance(refused.value, TransientBackendError) == (status >= 500)


def test_a_job_unknown_to_mlflow_is_a_backend_error(fake: FakeAzureML) -> None:
    with pytest.raises(BackendError, match="404 Run 'ft-unknown' not found"):
        _backend(fake).job_metrics("ft-unknown")
    fake.fail_next("GET", f"{MLFLOW_RUNS}/get$", 200, {})  # an answer without the run: no traceback either
    with pytest.raises(BackendError, match="MLflow API answered no run for job 'ft-unknown'"):
        _backend(fake).job_metrics("ft-unknown")


def test_a_workspace_without_a_tracking_uri_is_a_backend_error(
    fake: FakeAzureML, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake, "_workspace", lambda request: (200, {"id": ARM, "name": "mlw-test", "properties": {}}))
    with pytest.raises(BackendError, match="workspace mlw-test names no MLflow tracking URI"):
        _backend(fake).job_metrics(REQUEST.job_name)
    assert not fake.sent("GET", "/api/2.0/mlflow/")
