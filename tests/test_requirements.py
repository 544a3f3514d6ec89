"""The deployed app installs only requirements.txt: everything the cloud code paths import must
be there, and nothing of the local training stack."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from shared.backends.registry import BACKENDS, plugin
from tests.imports import MODULES, REPO, loaded_by_name, reachable

DISTRIBUTIONS = {
    "azure.functions": "azure-functions",
    "azurefunctions.extensions.bindings": "azurefunctions-extensions-bindings-blob",
    "croniter": "croniter",
    "azure.storage.blob": "azure-storage-blob",
    "azure.data.tables": "azure-data-tables",
    "azure.eventgrid": "azure-eventgrid",
    "azure.identity": "azure-identity",
    "azure.ai.ml": "azure-ai-ml",
    "orjson": "orjson",
    "pyarrow": "pyarrow",
    "datasets": "datasets",
}
# azure-core comes with every Azure SDK package, huggingface_hub and fsspec with datasets.
PROVIDED_BY_THOSE = ("azure.core", "huggingface_hub", "fsspec")
LOCAL_ONLY = {"torch", "transformers", "peft", "trl", "mlflow", "tokenizers", "accelerate", "pandas"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _third_party(name: str) -> bool:
    root = name.split(".", maxsplit=1)[0]
    return root not in sys.stdlib_module_names and root not in ("shared", "functions", "__future__")


def test_requirements_cover_every_cloud_import_and_no_training_stack() -> None:

    imported = {name for path in _reachable_from_the_app() for name in _imports(path) if _third_party(name)}
    required = {line.split("==")[0].strip().lower() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}  # fmt: skip
    for name in imported:
        if name.startswith(PROVIDED_BY_THOSE):
            continue
        distribution = next((dist for module, dist in DISTRIBUTIONS.items() if name.startswith(module)), None)
        assert distribution is not None, f"{name} is imported on the cloud path; map it to its distribution"
        assert distribution in required, f"{name} needs {distribution} in requirements.txt"
    assert not required & LOCAL_ONLY
    assert not {name.split(".")[0] for name in imported} & LOCAL_ONLY


def _funcignore() -> list[str]:
    lines = (REPO / ".funcignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _excluded(path: Path, patterns: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == pattern or relative.startswith(f"{pattern}/") for pattern in patterns)


def _reachable_from_the_app() -> set[Path]:
    """Every project file the app in Azure can import: from `function_app`, and from the backends
    that run in Azure (the registry imports the configured one by name)."""
    in_azure = loaded_by_name(name for name in BACKENDS if plugin(name).runs_in_azure)
    return {MODULES[module] for module in reachable(["function_app", *in_azure])}


def test_the_azure_package_leaves_out_dev_tools_and_ships_everything_the_app_imports() -> None:
    patterns = _funcignore()
    dev_only = [".venv", ".venv-checkov", ".local", ".azurite", "mlruns", "node_modules", "tests", "bench",
                "infra", "shared/backends/local", "shared/dev",
                "shared/cli.py", "local.settings.json"]  # fmt: skip
    assert [entry for entry in dev_only if entry not in patterns] == []
    shipped = _reachable_from_the_app()
    assert REPO / "shared" / "backends" / "azureml" / "backend.py" in shipped
    assert [path.relative_to(REPO).as_posix() for path in shipped if _excluded(path, patterns)] == []
