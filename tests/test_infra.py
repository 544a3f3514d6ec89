"""The infrastructure and the code cannot drift apart: the Bicep sets exactly the settings the
settings module reads, and routes exactly the events the job-events function accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

from shared.events import JOB_EVENT_TYPES, PIPELINE_RUN_TYPE, TERMINAL_STATUSES
from shared.settings import KNOWN_SETTINGS, LOCAL_SETTINGS, STORAGE_SETTING
from shared.storage import DATASETS_CONTAINER, PREPARED_CONTAINER, RUNS_TABLE

INFRA = Path(__file__).resolve().parent.parent / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
# Read by the Functions host and Application Insights, not by the app's settings module.
HOST_SETTINGS = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"}
# Local and connection-string alternatives to the identity-based storage settings the cloud uses.
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
    assert set(names) - HOST_SETTINGS == set(KNOWN_SETTINGS) - LOCAL_ALTERNATIVES - set(LOCAL_SETTINGS)


def test_no_secret_or_connection_string_in_app_settings() -> None:
    text = (INFRA / "modules" / "app.bicep").read_text()
    assert "AccountKey" not in text and "listKeys" not in text
    assert "allowSharedKeyAccess: false" in text


def test_job_event_filters_match_what_the_function_accepts() -> None:
    job_filter = _parse(INFRA / "events.bicep")["modules"]["jobStatus"]["config"]["params"]["eventFilter"]
    assert set(job_filter["includedEventTypes"]) <= set(JOB_EVENT_TYPES)
    advanced = {f["key"]: f for f in job_filter["advancedFilters"]}
    assert advanced["data.runType"]["operatorType"] == "StringIn"
    assert advanced["data.runType"]["values"] == [PIPELINE_RUN_TYPE]
    assert advanced["data.runStatus"]["operatorType"] == "StringIn"
    assert sorted(advanced["data.runStatus"]["values"]) == sorted(TERMINAL_STATUSES)


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


def test_compute_defaults_to_an_allowed_a100_size_and_scales_to_zero() -> None:
    # The Phi models' finetune_compute_allow_list: A100 sizes only (NCv3 sizes are retired).
    allow_list = {
        "Standard_NC24ads_A100_v4",
        "Standard_NC48ads_A100_v4",
        "Standard_NC96ads_A100_v4",
        "Standard_ND96asr_v4",
        "Standard_ND96amsr_A100_v4",
    }
    parameter = _parse(INFRA / "main.bicep")["parameters"]["computeVmSize"]
    (allowed,) = [d["argument"] for d in parameter["decorators"] if d["type"] == "allowed"]
    assert set(allowed) == allow_list
    assert parameter["default"] == "Standard_NC24ads_A100_v4"
    cluster = _parse(INFRA / "modules" / "ml.bicep")["resources"]["cluster"]["config"]["properties"]["properties"]
    assert cluster["scaleSettings"]["minNodeCount"] == 0


def test_azd_project_points_at_the_function_app() -> None:
    project = yaml.safe_load((INFRA.parent / "azure.yaml").read_text())
    assert project["services"]["app"] == {"project": ".", "language": "python", "host": "function"}
    assert (INFRA.parent / project["hooks"]["postdeploy"]["posix"]["run"]).exists()
