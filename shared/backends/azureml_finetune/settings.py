"""The `azureml-finetune` backend's settings section and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.backends.azureml.settings import COMMON_SETTING_NAMES, Workspace, common_settings, read_coordinates
from shared.validation import Rule, SettingsReader, checked

# Listed for serverless fine-tuning of chat completion in Foundry's region table
# (MicrosoftDocs/azure-ai-docs, articles/ai-foundry/includes/region-availability-maas.md) and the
# model the azureml-examples serverless notebook fine-tunes; a Microsoft model, so no marketplace
# subscription.
DEFAULT_BASE_MODEL = "Phi-4-mini-instruct"
SERVERLESS = "serverless"
_COMPUTE = Rule(
    f"{SERVERLESS} (billed per token, no quota) or an Azure VM size such as Standard_NC24ads_A100_v4 (managed compute)",
    checked(str, lambda value: value == SERVERLESS or re.fullmatch(r"Standard_[A-Za-z0-9_]+", value) is not None),
)


@dataclass(frozen=True, kw_only=True)
class FineTuneWorkspace(Workspace):
    """The workspace, and where its fine-tuning jobs train: `serverless` (the model's provider
    runs the training and bills per token; the model is then served from a serverless endpoint) or
    a VM size (managed compute in the workspace, which needs its GPU quota; the model is served from
    a managed online endpoint of AZUREML_INSTANCE_TYPE)."""

    training_compute: str = SERVERLESS

    @property
    def serverless(self) -> bool:
        return self.training_compute == SERVERLESS


def read_section(reader: SettingsReader) -> FineTuneWorkspace:
    subscription, group, workspace = read_coordinates(reader, "azureml-finetune")
    compute = reader.parsed("AZUREML_FINETUNE_COMPUTE", SERVERLESS, _COMPUTE)
    return FineTuneWorkspace(subscription, group, workspace, training_compute=compute, **common_settings(reader))


SETTING_NAMES = (*COMMON_SETTING_NAMES, "AZUREML_FINETUNE_COMPUTE")
