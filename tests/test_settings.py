"""Settings: defaults that work locally, one clear error naming every bad setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.settings import (
    STORAGE_IDENTITY_SETTINGS,
    STORAGE_SETTING,
    SettingsError,
    StorageConnection,
    load_settings,
    read_settings,
)
from tests.settings_catalog import known_settings

REPO = Path(__file__).resolve().parent.parent
AZUREML = {
    "ML_BACKEND": "azureml",
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
    "AZURE_RESOURCE_GROUP": "rg-finetune",
    "AZUREML_WORKSPACE_NAME": "mlw-finetune",
    "AZUREML_COMPUTE_CLUSTER": "gpu-a100",
}


def test_defaults_work_locally() -> None:
    settings = load_settings({})
    assert settings.ml_backend == "local"
    assert settings.storage == StorageConnection(connection_string="UseDevelopmentStorage=true")
    assert settings.janitor_schedule == "0 */10 * * * *"
    assert settings.base_model == "tiny-phi3" and settings.backend_settings.data_dir.name == ".local"


def test_the_sample_local_settings_hold_every_app_setting_and_load() -> None:
    values = json.loads((REPO / "local.settings.sample.json").read_text())["Values"]
    assert set(values) == {"FUNCTIONS_WORKER_RUNTIME", *known_settings()} - set(STORAGE_IDENTITY_SETTINGS)
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values[STORAGE_SETTING] == "UseDevelopmentStorage=true"
    assert load_settings(values).ml_backend == "local"


def test_the_settings_module_reads_exactly_the_known_settings() -> None:
    """Each configuration reads the core settings and its own backend's; together, all known."""
    configurations = [{}, AZUREML, {**AZUREML, "ML_BACKEND": "azureml-finetune"},
                      {f"{STORAGE_SETTING}__accountName": "stfinetune"}]  # fmt: skip
    assert set().union(*(read_settings(environ)[1].names_read for environ in configurations)) == set(known_settings())
    assert (
        "AZUREML_WORKSPACE_NAME" not in read_settings({})[1].names_read
    )  # the local configuration never imports azureml


def test_azureml_backend_needs_its_workspace_and_names_every_missing_setting() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"ML_BACKEND": "AzureML", "AZURE_RESOURCE_GROUP": "rg"})
    message = str(error.value)
    for name in ("AZURE_SUBSCRIPTION_ID", "AZUREML_WORKSPACE_NAME", "AZUREML_COMPUTE_CLUSTER"):
        assert f"{name} is not set" in message
    assert "AZURE_RESOURCE_GROUP" not in message


def test_azureml_finetune_backend_settings_need_no_cluster_and_train_serverless_by_default() -> None:
    coordinates = {k: v for k, v in AZUREML.items() if k != "AZUREML_COMPUTE_CLUSTER"}
    settings = load_settings({**coordinates, "ML_BACKEND": "azureml-finetune"})
    workspace = settings.backend_settings
    assert workspace.serverless and workspace.training_compute == "serverless"
    assert settings.base_model == "Phi-4-mini-instruct" and settings.job_event_topics == (workspace.resource_id,)
    managed = load_settings({**coordinates, "ML_BACKEND": "azureml-finetune",
                             "AZUREML_FINETUNE_COMPUTE": "Standard_NC24ads_A100_v4"}).backend_settings  # fmt: skip
    assert not managed.serverless and managed.training_compute == "Standard_NC24ads_A100_v4"
    with pytest.raises(
        SettingsError, match=r"AZUREML_FINETUNE_COMPUTE='gpu cluster'.*serverless .* or an Azure VM size"
    ):
        load_settings({**coordinates, "ML_BACKEND": "azureml-finetune", "AZUREML_FINETUNE_COMPUTE": "gpu cluster"})
    with pytest.raises(SettingsError, match=r"AZUREML_WORKSPACE_NAME is not set.*ML_BACKEND=azureml-finetune"):
        load_settings({"ML_BACKEND": "azureml-finetune", "AZURE_SUBSCRIPTION_ID": "s", "AZURE_RESOURCE_GROUP": "g"})


def test_azureml_backend_settings() -> None:
    settings = load_settings({**AZUREML, "AZUREML_GPUS_PER_NODE": "4"})
    assert settings.ml_backend == "azureml"
    workspace = settings.backend_settings
    assert workspace.workspace_name == "mlw-finetune" and workspace.gpus_per_node == 4
    assert settings.base_model == "Phi-4" and settings.job_event_topics == (workspace.resource_id,)


@pytest.mark.parametrize(
    ("name", "value", "expects"),
    [
        ("ML_BACKEND", "sagemaker", "one of: local, azureml"),
        ("JANITOR_SCHEDULE", "0 */5 * * * * *", "an NCRONTAB schedule"),
        ("JANITOR_SCHEDULE", "0 61 * * * *", "an NCRONTAB schedule"),
        ("JANITOR_SCHEDULE", "0 0 9 L * *", "an NCRONTAB schedule"),
        (f"{STORAGE_SETTING}__credential", "password", "'managedidentity'"),
        (f"{STORAGE_SETTING}__blobServiceUri", "stfinetune.blob", "https:// blob service URI"),
    ],
)
def test_a_malformed_setting_is_named_with_what_it_expects(name: str, value: str, expects: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({name: value})
    assert f"{name}={value!r}: expected" in str(error.value) and expects in str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "expects"),
    [("AZUREML_GPUS_PER_NODE", "0", "at least 1"), ("AZUREML_GPUS_PER_NODE", "four", "at least 1"),
     ("AZUREML_DATASTORE", "prepared-data", "letters, digits, underscores")],
)  # fmt: skip
def test_a_backends_own_setting_is_checked_when_it_is_configured(name: str, value: str, expects: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**AZUREML, name: value})
    assert f"{name}={value!r}: expected" in str(error.value) and expects in str(error.value)


@pytest.mark.parametrize("schedule", ["0 30 9 * * Mon-Fri", "0 0 6 1 Jan,Jul *", "0 0 12 * * Sunday", "*/5 * * * *"])
def test_every_schedule_the_functions_host_takes_is_accepted(schedule: str) -> None:
    assert load_settings({"JANITOR_SCHEDULE": schedule}).janitor_schedule == schedule


def test_a_backend_that_is_not_installed_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """In Azure the local backend is not shipped: ML_BACKEND=local (or unset) names the fix."""
    import shared.backends.registry as registry

    monkeypatch.setitem(registry.BACKENDS, "local", "shared.backends.not_shipped")
    with pytest.raises(SettingsError, match="ML_BACKEND='local': that backend is not installed here"):
        load_settings({})


def test_all_bad_settings_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"ML_BACKEND": "x", "JANITOR_SCHEDULE": "y"})
    assert "ML_BACKEND='x'" in str(error.value) and "JANITOR_SCHEDULE='y'" in str(error.value)


def test_a_connection_string_that_is_not_one_is_refused() -> None:
    with pytest.raises(SettingsError, match="AzureWebJobsStorage is not a storage connection string"):
        load_settings({STORAGE_SETTING: "http://127.0.0.1:10000"})


def test_identity_based_storage_from_the_account_name() -> None:
    storage = load_settings(
        {
            f"{STORAGE_SETTING}__accountName": "stfinetune",
            f"{STORAGE_SETTING}__credential": "managedidentity",
            f"{STORAGE_SETTING}__clientId": "11111111-2222-3333-4444-555555555555",
        }
    ).storage
    assert storage.connection_string is None
    assert storage.blob_service_uri == "https://stfinetune.blob.core.windows.net"
    assert storage.table_service_uri == "https://stfinetune.table.core.windows.net"
    assert storage.use_managed_identity
    assert storage.managed_identity_client_id == "11111111-2222-3333-4444-555555555555"
    assert "identity-based" in storage.description


def test_identity_based_storage_from_service_uris() -> None:
    storage = load_settings(
        {
            f"{STORAGE_SETTING}__blobServiceUri": "https://stfinetune.blob.core.windows.net/",
            f"{STORAGE_SETTING}__tableServiceUri": "https://stfinetune.table.core.windows.net",
        }
    ).storage
    assert storage.blob_service_uri == "https://stfinetune.blob.core.windows.net"
    assert not storage.use_managed_identity


def test_identity_based_storage_needs_both_service_uris() -> None:
    with pytest.raises(SettingsError, match="__tableServiceUri"):
        load_settings({f"{STORAGE_SETTING}__blobServiceUri": "https://stfinetune.blob.core.windows.net"})


def test_storage_description_never_shows_the_key() -> None:
    key = "c2VjcmV0LWtleQ=="
    storage = load_settings(
        {STORAGE_SETTING: f"DefaultEndpointsProtocol=https;AccountName=stfinetune;AccountKey={key}"}
    ).storage
    assert key not in storage.description
    assert "stfinetune" in storage.description


def test_identity_based_clients_use_the_service_uris() -> None:
    from shared.storage import blob_service, table_service

    storage = load_settings({f"{STORAGE_SETTING}__accountName": "stfinetune"}).storage
    assert blob_service(storage).url.startswith("https://stfinetune.blob.core.windows.net")
    assert table_service(storage).url.startswith("https://stfinetune.table.core.windows.net")
