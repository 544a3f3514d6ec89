"""The infrastructure and the code cannot drift apart: the Bicep sets exactly the settings the
settings module reads, and routes exactly the events the job-events function accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

from shared.backends.azureml.settings import AzureMLWorkspace
from shared.backends.registry import BACKENDS, plugin
from shared.settings import STORAGE_SETTING, load_settings
from shared.vocabulary import (
    DATASETS_CONTAINER,
    JOB_EVENT_TYPES,
    PREPARED_CONTAINER,
    RUN_COMPLETED,
    RUN_STATUS_CHANGED,
    RUNS_TABLE,
    JobStatus,
)
from tests.fake_azureml import A100_H100
from tests.settings_catalog import dev_only_settings, known_settings

INFRA = Path(__file__).resolve().parent.parent / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
# Read by the Functions host and Application Insights, not by the app's settings module.
HOST_SETTINGS = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"}
# Local and connection-string alternatives to the identity-based storage settings the cloud uses.
AZUREML_COORDINATES = {"ML_BACKEND": "azureml", "AZURE_SUBSCRIPTION_ID": "s", "AZURE_RESOURCE_GROUP": "g",
                       "AZUREML_WORKSPACE_NAME": "w", "AZUREML_COMPUTE_CLUSTER": "c"}  # fmt: skip
LOCAL_ALTERNATIVES = {STORAGE_SETTING, f"{STORAGE_SETTING}__blobServiceUri", f"{STORAGE_SETTING}__tableServiceUri"}


def _parse(path: Path) -> dict[str, Any]:
    return BicepParser().parse(file_path=path)


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    assert _parse(path)


def test_app_settings_in_bicep_equal_the_settings_the_code_reads() -> None:
    function_app = _parse(INFRA / "modules" / "app.bicep")["resources"]["functionApp"]
    names = [setting["name"] for setting in function_app["config"]["properties"]["siteConfig"]["appSettings"]]
    assert len(names) == len(set(names))
    assert set(names) - HOST_SETTINGS == set(known_settings()) - LOCAL_ALTERNATIVES - set(dev_only_settings())


def test_no_secret_or_connection_string_in_app_settings() -> None:
    text = (INFRA / "modules" / "app.bicep").read_text()
    assert "AccountKey" not in text and "listKeys" not in text
    assert "allowSharedKeyAccess: false" in text


def _config(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource's body (pycep nests it one level deeper under a condition)."""
    config = resource["config"]
    return config["config"] if "condition" in config else config


def _job_subscriptions() -> dict[str, dict[str, Any]]:
    modules = _parse(INFRA / "events.bicep")["modules"]
    return {name: modules[name]["config"]["params"] for name in ("jobStatus", "jobCompleted")}


def test_both_success_events_are_subscribed_and_none_is_filtered_away() -> None:
    subscriptions = _job_subscriptions()
    by_type = {
        kind: params for params in subscriptions.values() for kind in params["eventFilter"]["includedEventTypes"]
    }
    assert set(by_type) == set(JOB_EVENT_TYPES)
    for params in subscriptions.values():
        assert "functionName=job_events" in json.dumps(_parse(INFRA / "events.bicep")["variables"]["jobEventsUrl"])
        assert params["endpointUrl"] == "jobEventsUrl"
    status_filter = {f["key"]: f for f in by_type[RUN_STATUS_CHANGED]["eventFilter"]["advancedFilters"]}
    # The documented samples have "runType": null: a StringIn filter on it would drop them.
    assert set(status_filter) == {"data.runStatus"}
    assert status_filter["data.runStatus"]["operatorType"] == "StringIn"
    assert sorted(status_filter["data.runStatus"]["values"]) == sorted(
        status.value for status in JobStatus if status.is_terminal
    )
    # RunCompleted has no runStatus and a null runType in the documented sample: a StringIn
    # filter on either key would drop every success event.
    assert by_type[RUN_COMPLETED]["eventFilter"].get("advancedFilters", []) == []


def test_upload_events_are_routed_for_the_datasets_container_to_the_intake_function() -> None:
    uploads = _parse(INFRA / "events.bicep")["modules"]["uploads"]["config"]["params"]
    assert uploads["eventFilter"] == {
        "includedEventTypes": ["Microsoft.Storage.BlobCreated"],
        "subjectBeginsWith": f"/blobServices/default/containers/{DATASETS_CONTAINER}/",
    }
    assert "functionName=Host.Functions.dataset_intake" in json.dumps(uploads["endpointUrl"])


def test_storage_holds_the_containers_and_table_the_app_uses() -> None:
    app = _parse(INFRA / "modules" / "app.bicep")
    variables = {name: spec["value"] for name, spec in app["variables"].items()}
    assert variables["datasetsContainer"] == DATASETS_CONTAINER
    assert variables["preparedContainer"] == PREPARED_CONTAINER
    assert variables["runsTable"] == RUNS_TABLE


def test_compute_defaults_to_an_allowed_size_and_scales_to_zero() -> None:
    # Phi-4's system metadata supportedComputes.finetuneComputes (azureml-assets spec.yaml).
    parameter = _parse(INFRA / "main.bicep")["parameters"]["computeVmSize"]
    (allowed,) = [d["argument"] for d in parameter["decorators"] if d["type"] == "allowed"]
    assert set(allowed) == set(A100_H100)
    assert parameter["default"] == "Standard_NC24ads_A100_v4"
    cluster = _parse(INFRA / "modules" / "ml.bicep")["resources"]["cluster"]["config"]["properties"]["properties"]
    assert cluster["scaleSettings"]["minNodeCount"] == 0


def test_the_gpu_cluster_reads_prepared_data_and_writes_outputs_with_its_own_identity() -> None:
    ml = _parse(INFRA / "modules" / "ml.bicep")
    app = _parse(INFRA / "modules" / "app.bicep")
    main = _parse(INFRA / "main.bicep")
    assert ml["resources"]["computeIdentity"]["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    identity = ml["resources"]["cluster"]["config"]["identity"]
    assert identity["type"] == "UserAssigned" and list(identity["userAssignedIdentities"]) == [
        "'${computeIdentity.id}'"
    ]
    roles = app["variables"]["roles"]["value"]

    reader = _config(app["resources"]["computePreparedAccess"])
    assert reader["scope"] == "preparedData" and reader["properties"]["principalId"] == "computePrincipalId"
    assert "storageBlobDataReader" in json.dumps(reader["properties"]["roleDefinitionId"])
    assert roles["storageBlobDataReader"] == "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
    assert _config(app["resources"]["preparedData"])["name"] == "preparedContainer"
    assert main["modules"]["app"]["config"]["params"]["computePrincipalId"] == {
        "operator": {"type": "property_accessor", "operands": {"operand_1": "ml", "operand_2": {
            "operator": {"type": "property_accessor", "operands": {"operand_1": "outputs",
                                                                   "operand_2": "computePrincipalId"}}}}}}  # fmt: skip

    writer = _config(ml["resources"]["computeOutputsAccess"])
    assert writer["scope"] == "workspaceStorage" and "computeIdentity" in json.dumps(
        writer["properties"]["principalId"]
    )
    assert ml["variables"]["storageBlobDataContributor"]["value"] == "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
    assert "storageBlobDataContributor" in json.dumps(writer["properties"]["roleDefinitionId"])
    # The storage a new workspace gets is the one the role goes to.
    workspace_storage = main["modules"]["ml"]["config"]["params"]["workspaceStorageAccountName"]
    assert workspace_storage["operator"]["operands"]["true_value"] == "stml${suffix}"
    assert _parse(INFRA / "modules" / "new-workspace.bicep")["resources"]["workspaceStorage"]["config"]["name"] == (
        "stml${suffix}"
    )


def test_jobs_read_through_an_identity_based_datastore_the_app_setting_names() -> None:
    main = _parse(INFRA / "main.bicep")
    assert main["variables"]["preparedDatastoreName"]["value"] == AzureMLWorkspace.datastore
    datastore = _config(_parse(INFRA / "modules" / "ml-access.bicep")["resources"]["preparedDatastore"])
    properties = datastore["properties"]
    assert datastore["name"] == "preparedDatastoreName"
    assert properties["datastoreType"] == "AzureBlob" and properties["credentials"] == {"credentialsType": "None"}
    assert (
        properties["containerName"] == "preparedContainerName" and properties["accountName"] == "appStorageAccountName"
    )
    access = main["modules"]["mlAccess"]["config"]["params"]
    assert access["preparedDatastoreName"] == "preparedDatastoreName"
    assert "preparedContainerName" in json.dumps(access["preparedContainerName"])
    app = _parse(INFRA / "modules" / "app.bicep")
    assert app["variables"]["preparedContainer"]["value"] == PREPARED_CONTAINER
    settings = _config(app["resources"]["functionApp"])["properties"]["siteConfig"]["appSettings"]
    assert {"name": "AZUREML_DATASTORE", "value": "preparedDatastoreName"} in settings


def test_the_base_model_is_each_backends_default_in_code_sample_and_infrastructure() -> None:
    """Empty everywhere: each backend's own default, so switching ML_BACKEND just works."""
    main = _parse(INFRA / "main.bicep")["parameters"]
    assert main["baseModel"]["default"] == ""
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert parameters["baseModel"]["value"] == "${BASE_MODEL=}"
    sample = json.loads((INFRA.parent / "local.settings.sample.json").read_text())["Values"]
    assert sample["BASE_MODEL"] == ""
    assert load_settings(sample).base_model == plugin("local").default_base_model
    assert load_settings({**sample, **AZUREML_COORDINATES}).base_model == "Phi-4"
    finetune = {**sample, **AZUREML_COORDINATES, "ML_BACKEND": "azureml-finetune"}
    assert load_settings(finetune).base_model == "Phi-4-mini-instruct"
    # Both Azure backends can be chosen at deployment, with the compute the fine-tuning job trains on.
    allowed = next(d["argument"] for d in main["mlBackend"]["decorators"] if d["type"] == "allowed")
    assert set(allowed) == {name for name in BACKENDS if plugin(name).runs_in_azure}
    assert parameters["mlBackend"]["value"] == "${ML_BACKEND=azureml}"
    assert main["finetuneCompute"]["default"] == sample["AZUREML_FINETUNE_COMPUTE"] == "serverless"
    assert sample["AZUREML_DATASTORE"] == AzureMLWorkspace.datastore


def test_redeploying_after_azd_down_purge_and_into_an_existing_workspace_does_not_collide() -> None:
    vault = _config(_parse(INFRA / "modules" / "new-workspace.bicep")["resources"]["workspaceVault"])
    assert "enablePurgeProtection" not in vault["properties"]  # a protected vault cannot be purged
    topic = _config(_parse(INFRA / "modules" / "ml.bicep")["resources"]["workspaceEvents"])
    assert topic["name"] == "workspaceEventsTopicName"  # the existing workspace's own topic, when it has one
    reused = _parse(INFRA / "main.bicep")["modules"]["ml"]["config"]["params"]["workspaceEventsTopicName"]
    assert reused["operator"]["operands"]["false_value"] == "existingWorkspaceEventsTopic"


def test_azd_project_points_at_the_function_app() -> None:
    project = yaml.safe_load((INFRA.parent / "azure.yaml").read_text())
    assert project["services"]["app"] == {"project": ".", "language": "python", "host": "function"}
    assert (INFRA.parent / project["hooks"]["postdeploy"]["posix"]["run"]).exists()
