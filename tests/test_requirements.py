"""The deployed app installs only requirements.txt: everything the cloud code paths import must
be there, and nothing of the local training stack."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What runs in Azure: the app, its triggers' code paths and the azureml backend.
CLOUD_MODULES = [
    "function_app.py", "functions", "shared/settings.py", "shared/ledger.py", "shared/storage.py",
    "shared/intake.py", "shared/ncrontab.py",
    "shared/events.py", "shared/deployment.py", "shared/janitor.py", "shared/lifecycle.py",
    "shared/status.py", "shared/training.py", "shared/datasets", "shared/backends/__init__.py",
    "shared/backends/azureml",
]  # fmt: skip
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
}
PROVIDED_BY_THOSE = ("azure.core",)  # azure-core comes with every Azure SDK package
LOCAL_ONLY = {"torch", "transformers", "peft", "trl", "mlflow", "tokenizers", "accelerate", "pandas", "datasets"}


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
    files = [
        p
        for entry in CLOUD_MODULES
        for p in ([REPO / entry] if entry.endswith(".py") else (REPO / entry).rglob("*.py"))
    ]
    imported = {name for path in files for name in _imports(path) if _third_party(name)}
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
