"""Every setting any configuration of the app reads. Each backend reads its own only when it is
configured, so the whole list needs every backend's plug-in: a developer's machine has them all,
the Azure package does not (the local backend is not shipped), hence this lives with the tests."""

from __future__ import annotations

from shared.backends.registry import BACKENDS, plugin
from shared.settings import CORE_SETTINGS, DEV_ONLY_CORE_SETTINGS, STORAGE_IDENTITY_SETTINGS, STORAGE_SETTING


def known_settings() -> tuple[str, ...]:
    backends = (name for backend in BACKENDS for name in plugin(backend).setting_names)
    return (STORAGE_SETTING, *STORAGE_IDENTITY_SETTINGS, *CORE_SETTINGS, *backends)


def dev_only_settings() -> tuple[str, ...]:
    """The settings only a developer's machine uses: the deployment in Azure sets none of them."""
    local = (
        name for backend in BACKENDS if not plugin(backend).runs_in_azure for name in plugin(backend).setting_names
    )
    return (*DEV_ONLY_CORE_SETTINGS, *local)
