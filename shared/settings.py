"""Every app setting the app reads, read and validated in one place.

Settings are environment variables (Azure Functions app settings; `local.settings.json` under
Core Tools). Each has a default that works locally. Each backend reads its own section (its
package's `read_section`); a backend's required values are required only when it is the one
configured. A bad value fails at start-up with one message that names every offending setting and
what it expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from shared.backends.registry import BACKENDS, DEFAULT_BACKEND, plugin
from shared.costs.prices import RETAIL_PRICES_URL
from shared.ncrontab import Schedule
from shared.validation import (
    POSITIVE_INT,
    SAMPLE_PERCENT,
    TEST_PERCENT,
    USD,
    Rule,
    SettingsReader,
    checked,
    flag,
    http_uri,
    one_of,
    price_table,
)

STORAGE_SETTING = "AzureWebJobsStorage"
DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"
MAX_REQUEST_TIMEOUT_S = 180  # Azure ML managed endpoints allow no more

# Every name the app reads. tests/test_settings.py checks that `load_settings` reads exactly
# these, so `local.settings.sample.json` and the infrastructure can be checked against one list.
STORAGE_IDENTITY_SETTINGS = (
    f"{STORAGE_SETTING}__accountName",
    f"{STORAGE_SETTING}__blobServiceUri",
    f"{STORAGE_SETTING}__tableServiceUri",
    f"{STORAGE_SETTING}__credential",
    f"{STORAGE_SETTING}__clientId",
)
CORE_SETTINGS = (
    "AZURE_CLIENT_ID",
    "ML_BACKEND",
    "JANITOR_SCHEDULE",
    "DATASET_TEST_PERCENT",
    "DATASET_SAMPLE_PERCENT",
    "DATASET_MIN_CONVERSATIONS",
    "DATASET_MAX_INVALID_FRACTION",
    "DATASET_MAX_SEQ_LENGTH",
    "BASE_MODEL",
    "MAX_TRAINING_COST_USD",
    "PRICES_API_URL",
    "VM_PRICES_USD_PER_HOUR",
    "ENDPOINT_REQUEST_TIMEOUT_S",
    "ENDPOINT_IDLE_MINUTES",
    "ENDPOINT_MIN_AGE_MINUTES",
    "ENDPOINT_UNOBSERVED_MAX_HOURS",
    "JANITOR_DRY_RUN",
    "PROMOTION_MAX_LOSS_INCREASE_PERCENT",
    "GATE_CONVERSATIONS",
    "ROLLOUT_SHARE_PERCENT",
    "ROLLOUT_STEP_MINUTES",
    "ROLLBACK_WINDOW_HOURS",
    "JOB_EVENTS_TOPICS",
    "LIFECYCLE_TOPIC_ENDPOINT",
    "LIFECYCLE_TOPIC_KEY",
)
DEV_ONLY_CORE_SETTINGS = ("LIFECYCLE_TOPIC_KEY",)  # in Azure the app's identity publishes


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

    @property
    def account(self) -> str:
        """The storage account's name, however it is reached (key or identity, account name or
        service URI): the same account gives the same name."""
        if self.connection_string is None:
            return (urlparse(self.blob_service_uri or "").hostname or "").partition(".")[0]
        if self.connection_string.strip().lower() == DEVELOPMENT_STORAGE.lower():
            return "devstoreaccount1"
        fields = _connection_string_fields(self.connection_string)
        return fields.get("accountname") or (urlparse(fields.get("blobendpoint", "")).hostname or "").partition(".")[0]


@dataclass(frozen=True)
class DatasetSettings:
    """How uploads are checked, split and budgeted; a blob's metadata may override the
    percentages and the budget."""

    test_percent: float = 5.0
    sample_percent: float = 100.0
    min_conversations: int = 10
    max_invalid_fraction: float = 0.0
    max_seq_length: int = 4096
    max_training_cost_usd: float = 0.0  # 0: no limit


# Pay-as-you-go Linux prices in USD per hour, East US, for when the Retail Prices API is off or
# out of reach: a fallback remembered by the team, not a quote (the API is the source).
DEFAULT_VM_PRICES = {
    "Standard_NC24ads_A100_v4": 3.673,
    "Standard_NC48ads_A100_v4": 7.346,
    "Standard_NC96ads_A100_v4": 14.692,
    "Standard_NC40ads_H100_v5": 6.98,
}


@dataclass(frozen=True)
class PriceSettings:
    """Where VM prices come from: the Retail Prices API (None: off), then the table."""

    api_url: str | None = RETAIL_PRICES_URL
    table: tuple[tuple[str, float], ...] = tuple(DEFAULT_VM_PRICES.items())  # (VM size, USD per hour); hashable


@dataclass(frozen=True)
class JanitorSettings:
    idle_minutes: float = 60.0
    min_age_minutes: float = 30.0
    dry_run: bool = False
    # An endpoint whose requests cannot be observed (serverless endpoints: no request metric) is
    # torn down once its newest version is this old; 0: never (it bills until deleted by hand).
    unobserved_max_hours: float = 0.0


@dataclass(frozen=True)
class RolloutSettings:
    """How a new model version replaces the one an endpoint serves (see `shared.deployment` and `shared.promotion`)."""

    # The promotion rule: the new model's loss on its held-out conversations may exceed the live
    # model's (or, for an endpoint's first model, the base model's) by at most this many percent.
    max_loss_increase_percent: float = 1.0
    # Held-out conversations sent to the new deployment (and to the live one) before any traffic:
    # each must be answered with text, within the request timeout.
    gate_conversations: int = 5
    # The share of requests the new deployment takes first, for `step_minutes`, before all of them;
    # 0: all at once.
    share_percent: int = 10
    step_minutes: float = 15.0
    # How long a replaced deployment is kept at 0% traffic, ready for a rollback, before the
    # janitor deletes it.
    rollback_window_hours: float = 24.0


@dataclass(frozen=True)
class Settings:
    storage: StorageConnection
    ml_backend: str  # one of shared.backends.registry.BACKENDS
    managed_identity_client_id: str | None
    janitor_schedule: str
    dataset: DatasetSettings
    base_model: str  # name[:version]; when unset, the configured backend's default
    endpoint_request_timeout_s: int
    janitor: JanitorSettings
    job_event_topics: tuple[str, ...]  # accepted sources of job events, compared case-insensitively
    lifecycle_topic_endpoint: str | None
    lifecycle_topic_key: str | None  # None: publish with the app's identity (EventGrid Data Sender)
    backend_settings: Any  # the configured backend's own section (its package's settings module)
    prices: PriceSettings = PriceSettings()
    rollout: RolloutSettings = RolloutSettings()


_PRICE_TABLE = Rule(
    "VM sizes and USD prices per hour, such as 'Standard_NC24ads_A100_v4=3.67,Standard_NC40ads_H100_v5=6.98'",
    price_table,
)
_MINUTES = Rule("a number of minutes, at least 0", checked(float, lambda number: number >= 0))
_SCHEDULE = Rule(
    "an NCRONTAB schedule such as '0 */10 * * * *' or '0 30 9 * * Mon-Fri' (second minute hour day month day-of-week)",
    lambda value: Schedule(value).expression,  # the parser the local host fires timers with
)
_TIMEOUT = Rule(
    f"a whole number of seconds from 1 to {MAX_REQUEST_TIMEOUT_S}",
    checked(int, lambda number: 1 <= number <= MAX_REQUEST_TIMEOUT_S),
)


def _connection_string_fields(connection_string: str) -> dict[str, str]:
    fields = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _storage(reader: SettingsReader) -> StorageConnection:
    connection_string = reader.raw(STORAGE_SETTING)
    account = reader.raw(f"{STORAGE_SETTING}__accountName")
    blob_uri = reader.parsed(f"{STORAGE_SETTING}__blobServiceUri", None, Rule("an https:// blob service URI", http_uri))
    table_uri = reader.parsed(
        f"{STORAGE_SETTING}__tableServiceUri", None, Rule("an https:// table service URI", http_uri)
    )
    credential = reader.parsed(
        f"{STORAGE_SETTING}__credential", None, Rule("'managedidentity'", one_of(("managedidentity",)))
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


def _dataset(reader: SettingsReader) -> DatasetSettings:
    defaults = DatasetSettings()
    return DatasetSettings(
        test_percent=reader.parsed("DATASET_TEST_PERCENT", defaults.test_percent, TEST_PERCENT),
        sample_percent=reader.parsed("DATASET_SAMPLE_PERCENT", defaults.sample_percent, SAMPLE_PERCENT),
        min_conversations=reader.parsed("DATASET_MIN_CONVERSATIONS", defaults.min_conversations, POSITIVE_INT),
        max_invalid_fraction=reader.parsed(
            "DATASET_MAX_INVALID_FRACTION",
            defaults.max_invalid_fraction,
            Rule(
                "a fraction from 0 (any invalid row rejects the upload) to below 1",
                checked(float, lambda number: 0 <= number < 1),
            ),
        ),
        max_seq_length=reader.parsed(
            "DATASET_MAX_SEQ_LENGTH",
            defaults.max_seq_length,
            Rule("a whole number of tokens, at least 1", POSITIVE_INT.parse),
        ),
        max_training_cost_usd=reader.parsed("MAX_TRAINING_COST_USD", 0.0, USD),
    )


def _prices(reader: SettingsReader) -> PriceSettings:
    api = reader.raw("PRICES_API_URL")
    table = tuple(reader.parsed("VM_PRICES_USD_PER_HOUR", DEFAULT_VM_PRICES, _PRICE_TABLE).items())
    if api is not None and api.strip().lower() == "off":
        return PriceSettings(None, table)
    url = reader.parsed("PRICES_API_URL", RETAIL_PRICES_URL, Rule("an http(s):// URL, or off", http_uri))
    return PriceSettings(url, table)


def _rollout(reader: SettingsReader) -> RolloutSettings:
    defaults = RolloutSettings()
    return RolloutSettings(
        max_loss_increase_percent=reader.parsed(
            "PROMOTION_MAX_LOSS_INCREASE_PERCENT",
            defaults.max_loss_increase_percent,
            Rule("a number of percent, at least 0", checked(float, lambda number: number >= 0)),
        ),
        gate_conversations=reader.parsed(
            "GATE_CONVERSATIONS",
            defaults.gate_conversations,
            Rule("a whole number from 1 to 50", checked(int, lambda number: 1 <= number <= 50)),
        ),
        share_percent=reader.parsed(
            "ROLLOUT_SHARE_PERCENT",
            defaults.share_percent,
            Rule("a whole number of percent from 0 to 99", checked(int, lambda number: 0 <= number <= 99)),
        ),
        step_minutes=reader.parsed("ROLLOUT_STEP_MINUTES", defaults.step_minutes, _MINUTES),
        rollback_window_hours=reader.parsed(
            "ROLLBACK_WINDOW_HOURS",
            defaults.rollback_window_hours,
            Rule("a number of hours, at least 0", checked(float, lambda number: number >= 0)),
        ),
    )


def read_settings(environ: Mapping[str, str]) -> tuple[Settings, SettingsReader]:
    """The settings, and the reader that read them: its errors, and every name it looked at."""
    reader = SettingsReader(environ)
    storage = _storage(reader)
    backend = reader.parsed(
        "ML_BACKEND", DEFAULT_BACKEND, Rule("one of: " + ", ".join(BACKENDS), one_of(tuple(BACKENDS)))
    )
    # Only the configured backend's plug-in is imported: in Azure, the local one is not shipped.
    try:
        configured = plugin(backend)
    except ModuleNotFoundError:
        reader.errors.append(f"ML_BACKEND={backend!r}: that backend is not installed here (the local backend "
                             "stays on a developer's machine); set ML_BACKEND=azureml")  # fmt: skip
        return _unusable(storage), reader
    section = configured.read_section(reader)
    topics = reader.raw("JOB_EVENTS_TOPICS")
    settings = Settings(
        storage=storage,
        ml_backend=backend,
        managed_identity_client_id=reader.raw("AZURE_CLIENT_ID"),
        janitor_schedule=reader.parsed("JANITOR_SCHEDULE", "0 */10 * * * *", _SCHEDULE),
        dataset=_dataset(reader),
        base_model=reader.raw("BASE_MODEL") or configured.default_base_model,
        endpoint_request_timeout_s=reader.parsed("ENDPOINT_REQUEST_TIMEOUT_S", 90, _TIMEOUT),
        janitor=JanitorSettings(
            idle_minutes=reader.parsed("ENDPOINT_IDLE_MINUTES", 60.0, _MINUTES),
            min_age_minutes=reader.parsed("ENDPOINT_MIN_AGE_MINUTES", 30.0, _MINUTES),
            unobserved_max_hours=reader.parsed(
                "ENDPOINT_UNOBSERVED_MAX_HOURS",
                0.0,
                Rule("a number of hours, at least 0 (0: never)", checked(float, lambda number: number >= 0)),
            ),
            dry_run=reader.parsed("JANITOR_DRY_RUN", False, Rule("true or false", flag)),
        ),
        job_event_topics=tuple(t.strip() for t in topics.split(",") if t.strip())
        if topics
        else configured.default_job_event_topics(section),
        lifecycle_topic_endpoint=reader.parsed(
            "LIFECYCLE_TOPIC_ENDPOINT", None, Rule("an http(s):// Event Grid topic endpoint", http_uri)
        ),
        lifecycle_topic_key=reader.raw("LIFECYCLE_TOPIC_KEY"),
        backend_settings=section,
        prices=_prices(reader),
        rollout=_rollout(reader),
    )
    return settings, reader


def _unusable(storage: StorageConnection) -> Settings:
    """Settings that only carry the errors found: `load_settings` raises before anyone uses them."""
    return Settings(storage, "", None, "", DatasetSettings(), "", 0, JanitorSettings(), (), None, None, None)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every app setting; raise SettingsError naming each bad one."""
    settings, reader = read_settings(os.environ if environ is None else environ)
    if reader.errors:
        raise SettingsError("Invalid app settings:\n  - " + "\n  - ".join(reader.errors))
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()`."""
    return load_settings()
