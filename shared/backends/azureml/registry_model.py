"""What the `azureml` registry says about a base model, read from the REST body of a model version.

azure-ai-ml 1.35's `Model` drops what the preflight needs: `_from_rest_object` reads no archived
flag, and for registry models no system metadata (the registry's generated ModelVersion has no
such field, so `Model._system_metadata` stays None). The backend therefore reads the raw body.

Since mid-2026 the registry keeps a model's fine-tuning tasks, supported computes and
deprecation dates in its system metadata (azureml-assets, `assets/models/system/Phi-4/spec.yaml`:
`tasks.fineTuningTasks`, `supportedComputes.finetuneComputes` / `inferenceComputes`,
`deprecation.finetuneRetirementDate`); older versions carry them as tags (`task`,
`finetune_compute_allow_list`, `FinetuneRetirementDate`) or properties (`finetuning-tasks`).
System metadata is read first, the old places second. Published values may be nested or
stringified (JSON, or a Python literal), so both are read."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Purpose = Literal["finetune", "inference"]
_COMPUTES_KEY = {"finetune": "finetuneComputes", "inference": "inferenceComputes"}
_ALLOW_LIST_TAG = {"finetune": "finetune_compute_allow_list", "inference": "inference_compute_allow_list"}
SERVERLESS_REGIONS_TAG = "maas-finetuning-deploy-regions"


def _structured(value: Any) -> Any:
    """A value as published: nested already, or a JSON or Python-literal string of one."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError):
            continue
    return value


def _path(data: Any, *keys: str) -> Any:
    for key in keys:
        data = _structured(data)
        if not isinstance(data, Mapping):
            return None
        data = next((value for name, value in data.items() if name.lower() == key.lower()), None)
    return _structured(data)


def _names(value: Any) -> list[str] | None:
    """A list of names, from a list or a comma-separated string; None when there is none."""
    if isinstance(value, str):
        value = [part.strip(" '\"[]") for part in value.split(",")]
    if isinstance(value, list | tuple):
        names = [str(item).strip() for item in value if str(item).strip()]
        return names or None
    return None


@dataclass(frozen=True)
class RegistryModel:
    name: str
    version: str
    id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)
    system_metadata: Mapping[str, Any] = field(default_factory=dict)
    archived: bool = False
    created_at: str = ""

    @classmethod
    def from_rest(cls, body: Mapping[str, Any]) -> RegistryModel:
        """From the service's JSON: `{"id": "azureml://registries/<r>/models/<name>/versions/<v>",
        "name": "<v>", "systemData": {...}, "properties": {"tags", "properties", "isArchived",
        "stage", "system_metadata" | "systemMetadata", ...}}`."""
        identifier = str(body.get("id") or "")
        match = re.search(r"/models/([^/]+)/versions/([^/]+)$", identifier)
        properties = body.get("properties") or {}
        metadata = _structured(properties.get("system_metadata", properties.get("systemMetadata")))
        archived = properties.get("isArchived") is True or str(properties.get("stage", "")).lower() == "archived"
        return cls(
            name=match.group(1) if match else str(body.get("name") or ""),
            version=match.group(2) if match else str(body.get("name") or ""),
            id=identifier,
            tags=dict(properties.get("tags") or {}),
            properties=dict(properties.get("properties") or {}),
            system_metadata=metadata if isinstance(metadata, Mapping) else {},
            archived=archived,
            created_at=str((body.get("systemData") or {}).get("createdAt") or ""),
        )

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def finetune_tasks(self) -> list[str] | None:
        return _names(_path(self.system_metadata, "tasks", "fineTuningTasks")) or _names(
            self.properties.get("finetuning-tasks")
        )

    def inference_tasks(self) -> list[str] | None:
        return _names(_path(self.system_metadata, "tasks", "inferenceTasks")) or _names(self.tags.get("task"))

    def allowed_computes(self, purpose: Purpose) -> tuple[list[str] | None, str]:
        """The VM sizes the registry allows for fine-tuning or inference, and where that was
        read; (None, the places looked at) when neither names any."""
        key, tag = _COMPUTES_KEY[purpose], _ALLOW_LIST_TAG[purpose]
        from_metadata = _names(_path(self.system_metadata, "supportedComputes", key))
        if from_metadata:
            return from_metadata, f"system metadata supportedComputes.{key}"
        from_tags = _names(_structured(self.tags.get(tag)))
        if from_tags:
            return from_tags, f"tag {tag}"
        return None, f"system metadata supportedComputes.{key} or tag {tag}"

    def finetune_retirement(self) -> str | None:
        """The fine-tune retirement date (YYYY-MM-DD), from system metadata or the old tags."""
        date = _path(self.system_metadata, "deprecation", "finetuneRetirementDate")
        if not date:
            date = next((value for key, value in self.tags.items() if _is_retirement_tag(key)), None)
        return str(date)[:10] if date else None

    def deployment_options(self) -> list[str] | None:
        """How the catalog offers the model (`ServerlessMaaS`: serverless endpoints), if it says."""
        return _names(_path(self.system_metadata, "deploymentOptions"))

    def serverless_finetune_regions(self) -> tuple[list[str] | None, str]:
        """The regions where the model is fine-tuned serverless and its fine-tuned versions
        deployed, and where that was read; (None, the places looked at) when neither names any.
        azureml-assets keeps them in system metadata `maasFinetuning.maasFinetuningDeployRegions`
        (phi-3.5 specs); azureml-examples' serverless notebook reads the tag
        `maas-finetuning-deploy-regions`."""
        from_metadata = _names(_path(self.system_metadata, "maasFinetuning", "maasFinetuningDeployRegions"))
        if from_metadata:
            return from_metadata, "system metadata maasFinetuning.maasFinetuningDeployRegions"
        from_tags = _names(_structured(self.tags.get(SERVERLESS_REGIONS_TAG)))
        if from_tags:
            return from_tags, f"tag {SERVERLESS_REGIONS_TAG}"
        return None, f"system metadata maasFinetuning.maasFinetuningDeployRegions or tag {SERVERLESS_REGIONS_TAG}"

    def model_specific_defaults(self) -> str | None:
        return self.tags.get("model_specific_defaults")


def _is_retirement_tag(key: str) -> bool:
    """`FinetuneRetirementDate`, `finetune_retirement_date` and the like."""
    compact = re.sub(r"[^a-z]", "", key.lower())
    return "retirement" in compact and ("finetun" in compact or compact.startswith("retirement"))
