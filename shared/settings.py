"""Every app setting the app reads, read and validated in one place.

Settings are environment variables (Azure Functions app settings; `local.settings.json` under
Core Tools). Each has a default that works locally, except the Azure ML workspace coordinates,
which are required only when `ML_BACKEND=azureml`. A bad value fails at start-up with one message
that names every offending setting and what it expects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from shared.ncrontab import Schedule

T = TypeVar("T")

BACKENDS = ("local", "azureml")
# BASE_MODEL when unset. Azure ML: a chat model the `chat_completion_pipeline` component
# fine-tunes on A100/H100 sizes (azureml-assets, assets/models/system/Phi-4/spec.yaml); the
# walkthrough's Phi-3 models are retired. `auto` asks it for its newest fine-tunable Phi instead.
DEFAULT_BASE_MODELS = {"local": "tiny-phi3", "azureml": "Phi-4"}
DISCOVER_BASE_MODEL = "auto"
STORAGE_SETTING = "AzureWebJobsStorage"
DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"

# Every name the app reads. tests/test_settings.py checks that `load_settings` reads exactly
# these, so `local.settings.sample.json` and the infrastructure can be checked against one list.
STORAGE_IDENTITY_SETTINGS = (
    f"{STORAGE_SETTING}__accountName",
    f"{STORAGE_SETTING}__blobServiceUri",
    f"{STORAGE_SETTING}__tableServiceUri",
    f"{STORAGE_SETTING}__credential",
    f"{STORAGE_SETTING}__clientId",
)
APP_SETTINGS = (
    "AZURE_CLIENT_ID",
    "ML_BACKEND",
    "JANITOR_SCHEDULE",
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZUREML_WORKSPACE_NAME",
    "AZUREML_COMPUTE_CLUSTER",
    "AZUREML_GPUS_PER_NODE",
    "AZUREML_COMPONENT_VERSION",
    "AZUREML_INSTANCE_TYPE",
    "AZUREML_EXPERIMENT_NAME",
    "AZUREML_DATASTORE",
    "DATASET_TEST_PERCENT",
    "DATASET_SAMPLE_PERCENT",
    "DATASET_MIN_CONVERSATIONS",
    "DATASET_MAX_INVALID_FRACTION",
    "DATASET_MAX_SEQ_LENGTH",
    "BASE_MODEL",
    "ENDPOINT_REQUEST_TIMEOUT_S",
    "ENDPOINT_IDLE_MINUTES",
    "ENDPOINT_MIN_AGE_MINUTES",
    "JANITOR_DRY_RUN",
    "JOB_EVENTS_TOPICS",
    "LIFECYCLE_TOPIC_ENDPOINT",
)
# Read only by the local backend; the cloud deployment has no use for them.
LOCAL_SETTINGS = ("LOCAL_DATA_DIR", "JOB_EVENTS_TOPIC_ENDPOINT", "JOB_EVENTS_TOPIC_KEY", "LIFECYCLE_TOPIC_KEY")
LOCAL_TOPIC = "local/job-events"  # the topic the local host's Event Grid endpoint stamps on events
KNOWN_SETTINGS = (STORAGE_SETTING, *STORAGE_IDENTITY_SETTINGS, *APP_SETTINGS, *LOCAL_SETTINGS)
MAX_REQUEST_TIMEOUT_S = 180  # Azure ML managed endpoints allow no more


class SettingsError(ValueError):
    """One or more app settings are missing or malformed."""


@dataclass(frozen=True)
class StorageConnection:
    """How to reach the app's storage account: a connection string, or service URIs plus an
    identity (the `AzureWebJobsStorage__*` identity-based form the Functions host uses too)."""

    connection_string: str | None = None
    blob_service_uri: str | None = None
    table_service_uri: str | None = None
    managed_identity_client_id: str | None = None
    use_managed_identity: bool = False

    @property
    def description(self) -> str:
        """Where the storage is, without any secret: safe to log."""
        if self.connection_string is None:
            return f"{self.blob_service_uri} (identity-based)"
        if self.connection_string.strip().lower() == DEVELOPMENT_STORAGE.lower():
            return "local development storage (Azurite)"
        fields = _connection_string_fields(self.connection_string)
        return fields.get("blobendpoint") or f"account {fields.get('accountname', '?')}"


@dataclass(frozen=True)
class AzureMLWorkspace:
    subscription_id: str
    resource_group: str
    workspace_name: str
    compute_cluster: str
    gpus_per_node: int | None
    component_version: str | None = None  # None: the registry's `latest` label
    instance_type: str = "Standard_NC24ads_A100_v4"
    experiment_name: str = "chat_completion_finetune"
    # The workspace's identity-based datastore for the app's `prepared` container (infra/ creates
    # it): jobs read their inputs through it with the compute cluster's identity.
    datastore: str = "finetune_prepared"


@dataclass(frozen=True)
class DatasetSettings:
    """How uploads are checked and split; a blob's metadata may override the percentages."""

    test_percent: float = 5.0
    sample_percent: float = 100.0
    min_conversations: int = 10
    max_invalid_fraction: float = 0.0
    max_seq_length: int = 4096


@dataclass(frozen=True)
class LocalBackendSettings:
    """Where the local backend keeps jobs, models and endpoints, and where its trainer reports."""

    data_dir: Path
    job_events_endpoint: str | None
    job_events_key: str | None


@dataclass(frozen=True)
class JanitorSettings:
    idle_minutes: float = 60.0
    min_age_minutes: float = 30.0
    dry_run: bool = False


@dataclass(frozen=True)
class Settings:
    storage: StorageConnection
    ml_backend: Literal["local", "azureml"]
    managed_identity_client_id: str | None
    janitor_schedule: str
    azureml: AzureMLWorkspace | None
    dataset: DatasetSettings
    base_model: str  # name[:version]; default per backend (DEFAULT_BASE_MODELS)
    endpoint_request_timeout_s: int
    local: LocalBackendSettings
    janitor: JanitorSettings
    job_event_topics: tuple[str, ...]  # accepted sources of job events, compared case-insensitively
    lifecycle_topic_endpoint: str | None
    lifecycle_topic_key: str | None  # None: publish with the app's identity (EventGrid Data Sender)


class _Reader:
    """Reads settings from a mapping, collecting every problem instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.errors: list[str] = []
        self.names_read: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.names_read.add(name)
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def parsed(self, name: str, default: T, expects: str, parse: Callable[[str], T]) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            self.errors.append(f"{name}={value!r}: expected {expects}")
            return default

    def required(self, name: str, expects: str) -> str:
        value = self.raw(name)
        if value is None:
            self.errors.append(f"{name} is not set: expected {expects}")
            return ""
        return value


def _one_of(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in options:
            raise ValueError(value)
        return value.lower()

    return parse


def _checked(convert: Callable[[str], T], accept: Callable[[T], bool]) -> Callable[[str], T]:
    """A parser that converts, then refuses values outside what `accept` allows."""

    def parse(value: str) -> T:
        converted = convert(value)
        if not accept(converted):
            raise ValueError(value)
        return converted

    return parse


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


class Rule(NamedTuple):
    """What a setting expects (said in errors) and how its text is parsed."""

    expects: str
    parse: Callable[[str], Any]


POSITIVE_INT = _checked(int, lambda number: number >= 1)
# Shared with the per-upload overrides in blob metadata (test_pc, sample_pc).
TEST_PERCENT = Rule("a percentage above 0 and below 100", _checked(float, lambda number: 0 < number < 100))
SAMPLE_PERCENT = Rule("a percentage above 0, at most 100", _checked(float, lambda number: 0 < number <= 100))
_MINUTES = Rule("a number of minutes, at least 0", _checked(float, lambda number: number >= 0))
_SCHEDULE = Rule(
    "an NCRONTAB schedule such as '0 */10 * * * *' or '0 30 9 * * Mon-Fri' (second minute hour day month day-of-week)",
    lambda value: Schedule(value).expression,  # the parser the local host fires timers with
)


def _https_uri(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(value)
    return value.rstrip("/")


def _connection_string_fields(connection_string: str) -> dict[str, str]:
    fields = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _storage(reader: _Reader) -> StorageConnection:
    connection_string = reader.raw(STORAGE_SETTING)
    account = reader.raw(f"{STORAGE_SETTING}__accountName")
    blob_uri = reader.parsed(f"{STORAGE_SETTING}__blobServiceUri", None, "an https:// blob service URI", _https_uri)
    table_uri = reader.parsed(f"{STORAGE_SETTING}__tableServiceUri", None, "an https:// table service URI", _https_uri)
    credential = reader.parsed(
        f"{STORAGE_SETTING}__credential", None, "'managedidentity'", _one_of(("managedidentity",))
    )
    # A user-assigned identity: the storage-specific client id, else the app's (AZURE_CLIENT_ID).
    client_id = reader.raw(f"{STORAGE_SETTING}__clientId") or reader.raw("AZURE_CLIENT_ID")

    if connection_string is not None:
        fields = _connection_string_fields(connection_string)
        is_dev = connection_string.lower() == DEVELOPMENT_STORAGE.lower()
        if not is_dev and not ({"accountname", "blobendpoint", "tableendpoint"} & fields.keys()):
            reader.errors.append(
                f"{STORAGE_SETTING} is not a storage connection string: expected "
                f"'{DEVELOPMENT_STORAGE}' or 'DefaultEndpointsProtocol=...;AccountName=...;...'"
            )
        return StorageConnection(connection_string=connection_string)

    if account is None and blob_uri is None and table_uri is None:
        # Nothing set: local development storage, as `local.settings.sample.json` has it.
        return StorageConnection(connection_string=DEVELOPMENT_STORAGE)
    if account is not None:
        blob_uri = blob_uri or f"https://{account}.blob.core.windows.net"
        table_uri = table_uri or f"https://{account}.table.core.windows.net"
    if blob_uri is None or table_uri is None:
        reader.errors.append(
            f"{STORAGE_SETTING}__accountName is not set: an identity-based connection needs it, "
            f"or both {STORAGE_SETTING}__blobServiceUri and {STORAGE_SETTING}__tableServiceUri"
        )
        return StorageConnection()
    return StorageConnection(
        blob_service_uri=blob_uri,
        table_service_uri=table_uri,
        managed_identity_client_id=client_id,
        use_managed_identity=credential == "managedidentity",
    )


def _azureml(reader: _Reader, required: bool) -> AzureMLWorkspace | None:
    gpus_per_node = reader.parsed("AZUREML_GPUS_PER_NODE", None, "a whole number of GPUs, at least 1", POSITIVE_INT)
    names = {
        "AZURE_SUBSCRIPTION_ID": "the Azure subscription id of the Azure ML workspace",
        "AZURE_RESOURCE_GROUP": "the resource group of the Azure ML workspace",
        "AZUREML_WORKSPACE_NAME": "the Azure ML workspace name",
        "AZUREML_COMPUTE_CLUSTER": "the name of a GPU compute cluster in the workspace",
    }
    component_version = reader.raw("AZUREML_COMPONENT_VERSION")
    instance_type = reader.raw("AZUREML_INSTANCE_TYPE") or AzureMLWorkspace.instance_type
    experiment_name = reader.raw("AZUREML_EXPERIMENT_NAME") or AzureMLWorkspace.experiment_name
    datastore = reader.parsed(
        "AZUREML_DATASTORE", AzureMLWorkspace.datastore, "a datastore name (letters, digits, underscores)",
        _checked(str, lambda name: re.fullmatch(r"[A-Za-z0-9_]{1,255}", name) is not None),
    )  # fmt: skip
    if not required:
        for name in names:
            reader.raw(name)
        return None
    values = [reader.required(name, f"{expects} (ML_BACKEND=azureml)") for name, expects in names.items()]
    return AzureMLWorkspace(*values, gpus_per_node, component_version, instance_type, experiment_name, datastore)


def _dataset(reader: _Reader) -> DatasetSettings:
    defaults = DatasetSettings()
    return DatasetSettings(
        test_percent=reader.parsed("DATASET_TEST_PERCENT", defaults.test_percent, *TEST_PERCENT),
        sample_percent=reader.parsed("DATASET_SAMPLE_PERCENT", defaults.sample_percent, *SAMPLE_PERCENT),
        min_conversations=reader.parsed(
            "DATASET_MIN_CONVERSATIONS", defaults.min_conversations, "a whole number, at least 1", POSITIVE_INT
        ),
        max_invalid_fraction=reader.parsed(
            "DATASET_MAX_INVALID_FRACTION",
            defaults.max_invalid_fraction,
            "a fraction from 0 (any invalid row rejects the upload) to below 1",
            _checked(float, lambda number: 0 <= number < 1),
        ),
        max_seq_length=reader.parsed(
            "DATASET_MAX_SEQ_LENGTH", defaults.max_seq_length, "a whole number of tokens, at least 1", POSITIVE_INT
        ),
    )


def _local(reader: _Reader) -> LocalBackendSettings:
    endpoint = reader.parsed("JOB_EVENTS_TOPIC_ENDPOINT", None, "an http(s):// Event Grid topic endpoint", _https_uri)
    key = reader.raw("JOB_EVENTS_TOPIC_KEY")
    if endpoint and not key:
        reader.errors.append("JOB_EVENTS_TOPIC_KEY is not set: expected the key of JOB_EVENTS_TOPIC_ENDPOINT")
    return LocalBackendSettings(
        data_dir=Path(reader.raw("LOCAL_DATA_DIR") or ".local").expanduser().resolve(),
        job_events_endpoint=endpoint,
        job_events_key=key,
    )


def _read(environ: Mapping[str, str]) -> tuple[Settings, _Reader]:
    reader = _Reader(environ)
    storage = _storage(reader)
    backend = reader.parsed("ML_BACKEND", "local", "one of: " + ", ".join(BACKENDS), _one_of(BACKENDS))
    schedule = reader.parsed("JANITOR_SCHEDULE", "0 */10 * * * *", *_SCHEDULE)
    azureml = _azureml(reader, required=backend == "azureml")
    dataset = _dataset(reader)
    client_id = reader.raw("AZURE_CLIENT_ID")
    base_model = reader.raw("BASE_MODEL") or DEFAULT_BASE_MODELS.get(backend, DEFAULT_BASE_MODELS["local"])
    timeout = reader.parsed(
        "ENDPOINT_REQUEST_TIMEOUT_S",
        90,
        f"a whole number of seconds from 1 to {MAX_REQUEST_TIMEOUT_S}",
        _checked(int, lambda number: 1 <= number <= MAX_REQUEST_TIMEOUT_S),
    )
    janitor = JanitorSettings(
        idle_minutes=reader.parsed("ENDPOINT_IDLE_MINUTES", 60.0, *_MINUTES),
        min_age_minutes=reader.parsed("ENDPOINT_MIN_AGE_MINUTES", 30.0, *_MINUTES),
        dry_run=reader.parsed("JANITOR_DRY_RUN", False, "true or false", _boolean),
    )
    workspace_topic = (
        f"/subscriptions/{azureml.subscription_id}/resourceGroups/{azureml.resource_group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{azureml.workspace_name}"
    ) if azureml else LOCAL_TOPIC  # fmt: skip
    topics = tuple(t.strip() for t in (reader.raw("JOB_EVENTS_TOPICS") or workspace_topic).split(",") if t.strip())
    lifecycle = reader.parsed("LIFECYCLE_TOPIC_ENDPOINT", None, "an http(s):// Event Grid topic endpoint", _https_uri)
    settings = Settings(
        storage, backend, client_id, schedule, azureml, dataset, base_model, timeout, _local(reader),  # type: ignore[arg-type]
        janitor, topics, lifecycle, reader.raw("LIFECYCLE_TOPIC_KEY"),
    )  # fmt: skip
    return settings, reader


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every app setting; raise SettingsError naming each bad one."""
    settings, reader = _read(os.environ if environ is None else environ)
    if reader.errors:
        raise SettingsError("Invalid app settings:\n  - " + "\n  - ".join(reader.errors))
    return settings


def settings_read(environ: Mapping[str, str]) -> set[str]:
    """The names `load_settings` looks at for this environment (for drift tests)."""
    return _read(environ)[1].names_read


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()`."""
    return load_settings()
