"""Which backends exist. Each is a package whose `PLUGIN` says what it needs and makes it; a
package is imported only when its backend is configured or its settings are read, and its heavy
code (azure.ai.ml, torch) only when a backend object does the work.

Adding a backend: a package with a `PLUGIN`, one line below, its tests and its README section."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.backends.interface import Backend
    from shared.settings import Settings
    from shared.validation import SettingsReader

BACKENDS = {
    "local": "shared.backends.local",
    "azureml": "shared.backends.azureml",
}
DEFAULT_BACKEND = "local"


@dataclass(frozen=True)
class BackendPlugin:
    """What the rest of the app knows about a backend, and nothing more."""

    name: str
    setting_names: tuple[str, ...]  # every app setting it reads
    # Its settings section, read from the environment when it is the backend configured.
    read_settings: Callable[[SettingsReader], Any]
    default_base_model: str
    # Where its job events come from, when JOB_EVENTS_TOPICS does not say.
    default_job_event_topics: Callable[[Any], tuple[str, ...]]
    backend_class: str  # "module:Class", imported only when a backend object is made
    runs_in_azure: bool  # False: a developer's machine only (its settings stay out of infra/)

    def create(self, settings: Settings) -> Backend:
        module, _, name = self.backend_class.partition(":")
        backend: Backend = getattr(importlib.import_module(module), name)(settings)
        return backend


def plugin(name: str) -> BackendPlugin:
    found: BackendPlugin = importlib.import_module(BACKENDS[name]).PLUGIN
    return found


def get_backend(settings: Settings) -> Backend:
    return plugin(settings.ml_backend).create(settings)
