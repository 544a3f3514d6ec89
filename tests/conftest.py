"""Shared fixtures: a real Azurite for every test that touches storage, a fresh function app."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import azure.functions as func
import pytest
from azure.data.tables import TableServiceClient

from shared.azurite import Azurite, start_azurite
from shared.ledger import Ledger
from shared.settings import APP_SETTINGS, STORAGE_IDENTITY_SETTINGS, Settings, get_settings


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = start_azurite()
    yield server
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No app setting from the outer environment leaks into a test."""
    for name in ("AzureWebJobsStorage", *STORAGE_IDENTITY_SETTINGS, *APP_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.fixture
def app_settings(azurite: Azurite, clean_env: pytest.MonkeyPatch) -> Settings:
    clean_env.setenv("AzureWebJobsStorage", azurite.connection_string)
    return get_settings()


@pytest.fixture
def ledger(azurite: Azurite) -> Ledger:
    """A ledger on a table of its own, so tests never see each other's runs."""
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    return Ledger(service.create_table(f"runs{uuid.uuid4().hex[:16]}"))


@pytest.fixture
def function_app(app_settings: Settings) -> func.FunctionApp:
    """A freshly imported app: the worker library lets each app instance be indexed only once."""
    import function_app as module

    return importlib.reload(module).app


@pytest.fixture
def user_function(function_app: func.FunctionApp) -> Callable[[str], Callable[..., Any]]:
    """The user function behind a trigger, as the worker calls it."""
    functions = {f.get_function_name(): f for f in function_app.get_functions()}

    def lookup(name: str) -> Callable[..., Any]:
        return functions[name].get_user_function()

    return lookup
