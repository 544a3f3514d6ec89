"""The Azure ML backend through the real azure-ai-ml SDK, against a fake service at the HTTP
transport level: every assertion is about the REST requests the SDK really sends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.backends import BackendError, JobRequest, ModelRef
from shared.backends.azureml.backend import DEPLOYMENT, AzureMLBackend, PreflightError, model_version_for
from shared.settings import load_settings
from tests.fake_azureml import ARM, RG, SUB, WS, FakeAzureML, FakeCredential, registry_model

REPO = Path(__file__).resolve().parent.parent
ENV = {
    "ML_BACKEND": "azureml",
    "AZURE_SUBSCRIPTION_ID": SUB,
    "AZURE_RESOURCE_GROUP": RG,
    "AZUREML_WORKSPACE_NAME": WS,
    "AZUREML_COMPUTE_CLUSTER": "gpu-a100",
    "BASE_MODEL": "Phi-4:7",
}
PREPARED = "https://stapp.blob.core.windows.net/prepared/chats-0123456789ab"
REQUEST = JobRequest("ft-chats-0123456789ab", PREPARED, "chats", {"num_train_epochs": 2, "learning_rate": 2e-5},
                     {"run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64})  # fmt: skip
SMOKE = {"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {"max_new_tokens": 20}}}


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
    assert body["tags"] == {"managed-by": "finetune-on-upload", "base_model": "Phi-4:7", "dataset": "chats",
                            "run_id": "chats-0123456789ab", "dataset_sha256": "d" * 64}  # fmt: skip
    node = body["jobs"]["chat_completion_pipeline"]
    assert node["componentId"] == "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest"
    inputs = {name: spec.get("value", spec.get("uri")) for name, spec in node["inputs"].items()}
    assert inputs["mlflow_model_path"] == "azureml://registries/azureml/models/Phi-4/versions/7"
    assert inputs["train_file_path"] == f"{PREPARED}/train_sft.jsonl"
    assert inputs["test_file_path"] == f"{PREPARED}/test_sft.jsonl"
    assert node["inputs"]["train_file_path"]["job_input_type"] == "uri_file"
    assert {inputs[f"compute_{step}"] for step in ("model_import", "preprocess", "finetune", "model_evaluation")} == {
        "gpu-a100"
    }
    assert inputs["number_of_gpu_to_use_finetuning"] == "1"  # discovered from the workspace's VM sizes
    # Ours, then the model's model_specific_defaults, then the upload's overrides; flags as strings.
    assert inputs["num_train_epochs"] == "2" and inputs["learning_rate"] == "2e-05"
    assert inputs["precision"] == "16" and inputs["save_total_limit"] == "1"
    assert inputs["apply_lora"] == "true" and inputs["apply_deepspeed"] == "true"
    assert inputs["lr_scheduler_type"] == "cosine"
    assert "learning_rate_min" not in inputs and "learning_rate_max" not in inputs
    assert node["outputs"]["mlflow_model_folder"]["value"] == "${{parent.outputs.trained_model}}"
    assert body["outputs"]["trained_model"]["jobOutputType"] == "mlflow_model"
    assert body["displayName"] == "Phi-4-ultrachat-bs1-cosine-ds2-lora-save_limit1-seqlen-1"
    assert not fake.sent("GET", "/jobs/.*/stream")  # never blocks on the job


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
    assert not fake.sent("GET", "/vmSizes")


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda f: f.registry_models.update({("Phi-4", "7"): registry_model("Phi-4", "7", {}, archived=True)}),
         "is archived"),
        (lambda f: f.registry_models.update({("Phi-4", "7"): registry_model(
            "Phi-4", "7", {"finetune_retirement_date": "2025-08-30"})}), "retired for fine-tuning on 2025-08-30"),
        (lambda f: setattr(f, "compute_size", "Standard_ND40rs_v2"), "is not in Phi-4's finetune_compute_allow_list"),
        (lambda f: setattr(f, "compute_size", "Standard_NC24rs_v3"), "Standard_NC24rs_v3 is retired"),
        (lambda f: setattr(f, "compute_state", "Failed"), "failed provisioning state"),
    ],
)  # fmt: skip
def test_preflight_refuses_before_anything_is_created(fake: FakeAzureML, setup: object, says: str) -> None:
    setup(fake)  # type: ignore[operator]
    with pytest.raises(PreflightError, match=says):
        _backend(fake).submit(REQUEST)
    assert not [r for r in fake.requests if r.method in ("PUT", "POST", "DELETE")]


def test_preflight_names_a_missing_cluster_model_or_bad_parameter(fake: FakeAzureML) -> None:
    with pytest.raises(PreflightError, match="compute cluster gpu-v100 does not exist"):
        _backend(fake, AZUREML_COMPUTE_CLUSTER="gpu-v100").submit(REQUEST)
    with pytest.raises(PreflightError, match="Phi-3-mini-4k-instruct:1 is not in the azureml registry"):
        _backend(fake, BASE_MODEL="Phi-3-mini-4k-instruct:1").submit(REQUEST)
    bad = JobRequest("ft-x", PREPARED, "chats", {"precision": "8"})
    with pytest.raises(PreflightError, match="precision='8'"):
        _backend(fake).submit(bad)
    assert not fake.sent("PUT", "/jobs/")


def test_the_base_model_defaults_to_the_newest_finetunable_phi(fake: FakeAzureML) -> None:
    tags = {"task": "chat-completion", "finetune_compute_allow_list": "['Standard_NC24ads_A100_v4']"}
    fake.registry_models[("Phi-3-mini-4k-instruct", "15")] = registry_model(
        "Phi-3-mini-4k-instruct", "15", tags, archived=True
    )
    fake.registry_models[("Phi-3.5-mini-instruct", "6")] = registry_model("Phi-3.5-mini-instruct", "6", tags)
    fake.registry_models[("Phi-4-reasoning", "1")] = registry_model("Phi-4-reasoning", "1", {"task": "chat-completion"})
    backend = AzureMLBackend(load_settings({**ENV, "BASE_MODEL": ""}), transport=fake, credential=FakeCredential())
    assert backend.base_model().name == "Phi-4"


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
    assert "Phi-4:7" in body["description"] and "chats" in body["description"]


def test_registering_an_unfinished_job_is_refused(fake: FakeAzureML) -> None:
    backend = _backend(fake)
    backend.submit(REQUEST)
    with pytest.raises(BackendError, match="is NotStarted; only a Completed job"):
        backend.register(REQUEST.job_name)


def test_deployment_goes_endpoint_then_deployment_then_smoke_test_then_traffic(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    tags = {"run_id": "chats-0123456789ab"}
    assert backend.advance(model, "ep-chats", tags, lambda: SMOKE) == ("deploying", None)
    (endpoint_put,) = fake.sent("PUT", r"/onlineEndpoints/ep-chats$")
    assert endpoint_put.body["properties"]["authMode"] == "Key"
    assert endpoint_put.body["tags"] == {"managed-by": "finetune-on-upload", "run_id": "chats-0123456789ab"}

    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    assert backend.advance(model, "ep-chats", tags, lambda: SMOKE) == ("deploying", None)
    (deployment_put,) = fake.sent("PUT", f"/onlineEndpoints/ep-chats/deployments/{DEPLOYMENT}$")
    properties = deployment_put.body["properties"]
    assert properties["model"].endswith(f"/models/Phi-4-chats/versions/{model.version}")
    assert properties["instanceType"] == "Standard_NC24ads_A100_v4"
    assert deployment_put.body["sku"]["capacity"] == 1
    assert properties["livenessProbe"]["initialDelay"] == "PT10M"
    assert properties["requestSettings"]["requestTimeout"] == "PT1M30S"
    assert not fake.sent("POST", "/score")  # nothing is sent to a deployment still provisioning

    fake.deployments[("ep-chats", DEPLOYMENT)]["properties"]["provisioningState"] = "Succeeded"
    assert backend.advance(model, "ep-chats", tags, lambda: SMOKE) == ("deployed", None)
    (score,) = fake.sent("POST", "/score")
    assert score.headers["azureml-model-deployment"] == DEPLOYMENT
    assert score.headers["Authorization"] == "Bearer primary-ep-chats"
    assert score.body == SMOKE
    assert fake.sent("POST", "/onlineEndpoints/ep-chats/listKeys")
    traffic = fake.sent("PUT", r"/onlineEndpoints/ep-chats$")[-1]
    assert traffic.body["properties"]["traffic"] == {DEPLOYMENT: 100}

    assert backend.advance(model, "ep-chats", tags, lambda: SMOKE) == ("deployed", None)  # a duplicate event
    assert len(fake.sent("PUT", r"/onlineEndpoints/ep-chats$")) == 2
    assert len(fake.sent("PUT", "/deployments/")) == 1 and len(fake.sent("POST", "/score")) == 1


def test_a_failed_smoke_test_is_reported_and_the_deployment_deleted(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.advance(model, "ep-chats", {}, lambda: SMOKE)
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    backend.advance(model, "ep-chats", {}, lambda: SMOKE)
    fake.deployments[("ep-chats", DEPLOYMENT)]["properties"]["provisioningState"] = "Succeeded"
    fake.fail_next("POST", "/score", 424, {"message": "upstream model error"})
    state, message = backend.advance(model, "ep-chats", {}, lambda: SMOKE)
    assert state == "failed" and "smoke test of ep-chats failed" in (message or "") and "424" in (message or "")
    assert fake.sent("DELETE", f"/deployments/{DEPLOYMENT}$")
    assert not [r for r in fake.sent("PUT", r"/onlineEndpoints/ep-chats$") if r.body["properties"].get("traffic")]


def test_a_quota_error_becomes_a_failure_with_the_service_text(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.advance(model, "ep-chats", {}, lambda: SMOKE)
    fake.endpoints["ep-chats"]["properties"]["provisioningState"] = "Succeeded"
    quota = "Not enough quota available for Standard_NC24ads_A100_v4 in SubscriptionId. Current usage/limit: 24/24."
    fake.fail_next("PUT", "/deployments/", 400, {"error": {"code": "InferencingClientCallFailed", "message": quota}})
    with pytest.raises(BackendError, match="Not enough quota available for Standard_NC24ads_A100_v4"):
        backend.advance(model, "ep-chats", {}, lambda: SMOKE)


def test_a_deployment_size_off_the_inference_allow_list_is_refused(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    refused = AzureMLBackend(load_settings({**ENV, "AZUREML_INSTANCE_TYPE": "Standard_NC4as_T4_v3"}),
                             transport=fake, credential=FakeCredential())  # fmt: skip
    with pytest.raises(PreflightError, match="Standard_NC4as_T4_v3 is not in Phi-4's inference_compute_allow_list"):
        refused.deploy(model, "ep-chats", {})
    assert not fake.sent("PUT", "/onlineEndpoints/")


def test_listing_reads_idle_evidence_from_metrics_and_deletion_does_not_wait(fake: FakeAzureML) -> None:
    backend = _completed_job(fake)
    model = backend.register(REQUEST.job_name)
    backend.advance(model, "ep-chats", {}, lambda: SMOKE)
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
    assert node["inputs"]["train_file_path"]["uri"].endswith("/chats/train_sft.jsonl")
    assert "PUT" in result.stderr and "/jobs/ft-chats" in result.stderr


def test_the_local_trainers_own_packing_option_is_refused(fake: FakeAzureML) -> None:
    with pytest.raises(PreflightError, match="'packing' is not an input of chat_completion_pipeline"):
        _backend(fake).submit(JobRequest("ft-packed", PREPARED, "chats", {"packing": True}))
    assert not fake.sent("PUT", "/jobs/")
