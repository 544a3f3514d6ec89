"""The Azure ML backend's settings section and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from shared.validation import POSITIVE_INT, Rule, SettingsReader, checked

if TYPE_CHECKING:
    from shared.settings import Settings

# A chat model the `chat_completion_pipeline` component fine-tunes on A100/H100 sizes (azureml-assets,
# assets/models/system/Phi-4/spec.yaml); the walkthrough's Phi-3 models are retired. BASE_MODEL=auto
# asks the registry for its newest fine-tunable Phi chat model instead.
DEFAULT_BASE_MODEL = "Phi-4"
DISCOVER_BASE_MODEL = "auto"
_COORDINATES = {
    "AZURE_SUBSCRIPTION_ID": "the Azure subscription id of the Azure ML workspace",
    "AZURE_RESOURCE_GROUP": "the resource group of the Azure ML workspace",
    "AZUREML_WORKSPACE_NAME": "the Azure ML workspace name",
}
_CLUSTER = "the name of a GPU compute cluster in the workspace (ML_BACKEND=azureml)"
_DATASTORE_NAME = Rule("a datastore name (letters, digits, underscores)",
                       checked(str, lambda name: re.fullmatch(r"[A-Za-z0-9_]{1,255}", name) is not None))  # fmt: skip


@dataclass(frozen=True)
class Workspace:
    """An Azure ML workspace, as both Azure ML backends use it."""

    subscription_id: str
    resource_group: str
    workspace_name: str
    instance_type: str = "Standard_NC24ads_A100_v4"  # the VM size of managed online deployments
    experiment_name: str = "chat_completion_finetune"
    # The workspace's identity-based datastore for the app's `prepared` container (infra/ creates
    # it): jobs read their inputs through it with the compute's identity.
    datastore: str = "finetune_prepared"

    @property
    def resource_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
                f"Microsoft.MachineLearningServices/workspaces/{self.workspace_name}")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AzureMLWorkspace(Workspace):
    """The workspace and the compute cluster the registry pipeline runs on."""

    compute_cluster: str
    gpus_per_node: int | None = None  # None: discovered from the workspace's VM sizes
    component_version: str | None = None  # None: the registry's `latest` label


def read_section(reader: SettingsReader) -> AzureMLWorkspace:
    gpus_per_node = reader.parsed("AZUREML_GPUS_PER_NODE", None, POSITIVE_INT)
    component_version = reader.raw("AZUREML_COMPONENT_VERSION")
    subscription, group, workspace = read_coordinates(reader, "azureml")
    cluster = reader.required("AZUREML_COMPUTE_CLUSTER", _CLUSTER)
    return AzureMLWorkspace(subscription, group, workspace, compute_cluster=cluster, gpus_per_node=gpus_per_node,
                            component_version=component_version, **common_settings(reader))  # fmt: skip


def read_coordinates(reader: SettingsReader, backend: str) -> tuple[str, str, str]:
    """The workspace's subscription, resource group and name, each required."""
    subscription, group, workspace = (
        reader.required(name, f"{expects} (ML_BACKEND={backend})") for name, expects in _COORDINATES.items()
    )
    return subscription, group, workspace


def common_settings(reader: SettingsReader) -> dict[str, Any]:
    """The settings both Azure ML backends read beyond the workspace's coordinates."""
    return {
        "instance_type": reader.raw("AZUREML_INSTANCE_TYPE") or Workspace.instance_type,
        "experiment_name": reader.raw("AZUREML_EXPERIMENT_NAME") or Workspace.experiment_name,
        "datastore": reader.parsed("AZUREML_DATASTORE", Workspace.datastore, _DATASTORE_NAME),
    }


W = TypeVar("W", bound=Workspace)


def workspace_settings(settings: Settings, kind: type[W]) -> W:
    """The configured backend's workspace section, of the `kind` the caller works with."""
    from shared.backends.interface import BackendError

    section = settings.backend_settings
    if not isinstance(section, kind):
        raise BackendError(f"ML_BACKEND={settings.ml_backend} has no {kind.__name__} settings")
    return section


def prepared_uri(datastore: str, run_id: str) -> str:
    """Where a job reads a run's prepared files: the workspace's identity-based datastore on the
    app's `prepared` container. A datastore is one container, so the path starts at the run."""
    return f"azureml://datastores/{datastore}/paths/{run_id}"


# What both Azure ML backends read; then what the pipeline backend alone reads.
COMMON_SETTING_NAMES = (*_COORDINATES, "AZUREML_INSTANCE_TYPE", "AZUREML_EXPERIMENT_NAME", "AZUREML_DATASTORE")
SETTING_NAMES = (*COMMON_SETTING_NAMES, "AZUREML_COMPUTE_CLUSTER", "AZUREML_GPUS_PER_NODE", "AZUREML_COMPONENT_VERSION")
