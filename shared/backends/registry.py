"""Which backends exist. Each is a package whose `PLUGIN` (a `BackendPlugin`) says what it needs
and how to make it; a package is imported only when its backend is configured, its heavy code
(azure.ai.ml, torch) only when a backend object does the work.

Adding a backend: a package with a `PLUGIN`, one line below, its tests and its README section."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.backends.interface import Backend, BackendPlugin
    from shared.settings import Settings

BACKENDS = {
    "local": "shared.backends.local",
    "azureml": "shared.backends.azureml",
    "azureml-finetune": "shared.backends.azureml_finetune",
}
DEFAULT_BACKEND = "local"


def plugin(name: str) -> BackendPlugin:
    """The backend's plug-in; ModuleNotFoundError when its package is not installed (in Azure,
    the local backend is not shipped)."""
    found: BackendPlugin = importlib.import_module(BACKENDS[name]).PLUGIN
    return found


def get_backend(settings: Settings) -> Backend:
    module, _, name = plugin(settings.ml_backend).backend_class.partition(":")
    backend: Backend = getattr(importlib.import_module(module), name)(settings)
    return backend
