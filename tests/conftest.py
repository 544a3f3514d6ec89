"""Shared fixtures: a real Azurite for every test that touches storage, a fresh function app."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.data.tables import TableServiceClient

from shared.backends.local.processes import pid_of, read_json, running
from shared.dev.azurite import Azurite, start_azurite
from shared.ledger import Ledger
from shared.settings import Settings, get_settings
from tests.settings_catalog import known_settings


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = start_azurite()
    yield server
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No app setting from the outer environment leaks into a test."""
    for name in known_settings():
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def stop_local_processes(data_dir: Path) -> None:
    """Stop the trainers, endpoint servers and gateway a test started under `data_dir` that still
    run (a pid file outlives its process, and its pid may be another's by now)."""
    started = [*((job, "trainer") for job in data_dir.glob("jobs/*")),
               *((server, "server") for server in data_dir.glob("servers/*")),
               (data_dir / "gateway", "gateway")]  # fmt: skip
    for folder, role in started:
        recorded = (read_json(folder / "status.json") or {}).get("pid")  # a job's, also where a test wrote one
        pid = pid_of(folder, role) or recorded
        if pid and running(folder, role, recorded):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def app_settings(azurite: Azurite, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    """Settings for the app under test: Azurite storage, and a local backend of its own."""
    clean_env.setenv("AzureWebJobsStorage", azurite.connection_string)
    clean_env.setenv("LOCAL_DATA_DIR", str(tmp_path / "local"))
    yield get_settings()
    stop_local_processes(tmp_path / "local")


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


# `pytest -m "not slow"` answers in seconds: what needs Azurite, trains a model or starts
# processes is marked slow here, by the fixtures it uses or the module it lives in.
SLOW_FIXTURES = {"azurite"}
SLOW_MODULES = {"tests.test_local_backend", "tests.test_serving", "tests.test_flow", "tests.test_demo"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or (module and module.__name__ in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
