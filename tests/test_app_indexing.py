"""The app indexes the way the Python worker indexes it, with the bindings the host expects."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import pytest

REPO = Path(__file__).resolve().parent.parent

EXPECTED_BINDINGS = {
    "dataset_intake": [
        {
            "direction": "IN",
            "type": "blobTrigger",
            "name": "upload",
            "path": "datasets/{name}",
            "connection": "AzureWebJobsStorage",
            "source": "EventGrid",
        }
    ],
    "job_events": [{"direction": "IN", "type": "eventGridTrigger", "name": "event"}],
    "endpoint_janitor": [
        {
            "direction": "IN",
            "type": "timerTrigger",
            "name": "timer",
            "schedule": "%JANITOR_SCHEDULE%",
            "runOnStartup": False,
            "useMonitor": True,
        }
    ],
    "run_status": [
        {
            "direction": "IN",
            "type": "httpTrigger",
            "name": "req",
            "methods": ["GET"],
            "authLevel": "FUNCTION",
            "route": "runs/{run_id?}",
        },
        {"direction": "OUT", "type": "http", "name": "$return"},
    ],
    "endpoint_rollback": [
        {
            "direction": "IN",
            "type": "httpTrigger",
            "name": "req",
            "methods": ["POST"],
            "authLevel": "FUNCTION",
            "route": "endpoints/{endpoint}/rollback",
        },
        {"direction": "OUT", "type": "http", "name": "$return"},
    ],
}


def test_module_holds_exactly_one_function_app(function_app: func.FunctionApp) -> None:
    import function_app as module

    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionRegister)]
    assert apps == [function_app]


def test_every_function_has_a_unique_name_and_the_expected_bindings(function_app: func.FunctionApp) -> None:
    functions = function_app.get_functions()
    names = [f.get_function_name() for f in functions]
    assert len(names) == len(set(names))
    bindings = {f.get_function_name(): json.loads(f.get_function_json())["bindings"] for f in functions}
    assert bindings == EXPECTED_BINDINGS
    for f in functions:
        assert json.loads(f.get_function_json())["scriptFile"] == "function_app.py"


def test_every_signature_matches_its_bindings(function_app: func.FunctionApp) -> None:
    for f in function_app.get_functions():
        bindings = json.loads(f.get_function_json())["bindings"]
        parameters = inspect.signature(f.get_user_function()).parameters
        assert set(parameters) == {b["name"] for b in bindings if b["name"] != "$return"}, f.get_function_name()
        has_return_binding = any(b["name"] == "$return" for b in bindings)
        return_annotation = inspect.signature(f.get_user_function()).return_annotation
        assert (return_annotation is not None and return_annotation != "None") == has_return_binding


def test_binding_types_are_ones_the_worker_converts(function_app: func.FunctionApp) -> None:
    """The worker refuses a parameter whose annotation its converter for that binding rejects; an
    SDK type (the intake's BlobClient) goes to the binding extension's converter instead."""
    from azure.functions import blob, eventgrid, http, timer
    from azurefunctions.extensions.base import get_binding_registry

    converters = {
        "blobTrigger": blob.BlobConverter,
        "eventGridTrigger": eventgrid.EventGridEventInConverter,
        "timerTrigger": timer.TimerRequestConverter,
        "httpTrigger": http.HttpRequestConverter,
    }
    for f in function_app.get_functions():
        parameters = inspect.signature(f.get_user_function()).parameters
        for binding in json.loads(f.get_function_json())["bindings"]:
            if binding["direction"] == "IN":
                annotation = parameters[binding["name"]].annotation
                converter = (
                    get_binding_registry().get(binding["type"])
                    if get_binding_registry().check_supported_type(annotation)
                    else converters[binding["type"]]
                )
                assert converter.check_input_type_annotation(annotation), f.get_function_name()


def test_host_json_is_valid_for_core_tools() -> None:
    host = json.loads((REPO / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensionBundle"] == {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.*, 5.0.0)"}
    assert host["extensions"]["blobs"]["poisonBlobThreshold"] >= 1


def _import_in_fresh_interpreter(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120, check=False
    )


HEAVY_MODULES = ["azure.ai.ml", "torch", "transformers", "peft", "mlflow", "pandas", "datasets", "trl"]
# The blob binding extension imports azure.storage.blob and azure.identity to build the intake's
# BlobClient (bench/cold_start.py measures that cost); no other client library loads at import.
CLIENT_MODULES = ["azure.data.tables", "azure.eventgrid"]


def test_importing_the_app_loads_no_heavy_library() -> None:
    code = (
        "import sys, json, function_app; "
        f"print(json.dumps([m for m in {HEAVY_MODULES + CLIENT_MODULES!r} if m in sys.modules]))"
    )
    result = _import_in_fresh_interpreter(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("ML_BACKEND", "sagemaker"), ("JANITOR_SCHEDULE", "every ten minutes")],
)
def test_a_bad_setting_stops_the_app_at_start_up_naming_it(name: str, value: str) -> None:
    import os

    result = _import_in_fresh_interpreter("import function_app", env={**os.environ, name: value})
    assert result.returncode != 0
    assert f"{name}={value!r}" in result.stderr
