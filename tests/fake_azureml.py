"""A fake Azure ML at the HTTP transport level: the real azure-ai-ml SDK runs against it, and every
request it sends is recorded for the tests to assert. Responses have the shapes the service
returns (only the fields the SDK reads); state (jobs, models, endpoints) lives in dictionaries."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import HttpResponse, HttpTransport

SUB, RG, WS = "00000000-0000-0000-0000-000000000001", "rg-ml", "mlw-test"
# App settings for the Azure ML backend against this fake.
WORKSPACE_ENV = {
    "ML_BACKEND": "azureml",
    "AZURE_SUBSCRIPTION_ID": SUB,
    "AZURE_RESOURCE_GROUP": RG,
    "AZUREML_WORKSPACE_NAME": WS,
    "AZUREML_COMPUTE_CLUSTER": "gpu-a100",
    "PRICES_API_URL": "off",  # prices from the VM_PRICES_USD_PER_HOUR table; tests of the API set it
}
ARM = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
VM_SIZES = rf"/subscriptions/{SUB}/providers/Microsoft.MachineLearningServices/locations/[^/]+/vmSizes"
USAGES = rf"/subscriptions/{SUB}/providers/Microsoft.MachineLearningServices/locations/[^/]+/usages"
REGISTRY_HOST = "https://eastus.api.azureml.ms/"
REGISTRY_PATH = (
    "/mferp/managementfrontend/subscriptions/reg-sub/resourceGroups/reg-rg"
    "/providers/Microsoft.MachineLearningServices/registries/azureml"
)


def _fake_jwt(scopes: tuple[str, ...]) -> str:
    """An unsigned token with the claims the SDK reads (it decodes, never verifies, the JWT)."""

    def part(payload: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")

    audience = scopes[0].removesuffix("/.default") if scopes else ""
    claims = {"aud": audience, "exp": int(time.time()) + 3600, "oid": "fake-object", "tid": "fake-tenant"}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(_fake_jwt(scopes), int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        return AccessTokenInfo(_fake_jwt(scopes), int(time.time()) + 3600)


@dataclass
class Recorded:
    method: str
    url: str
    headers: dict[str, str]
    body: Any

    @property
    def path(self) -> str:
        return urlparse(self.url).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlparse(self.url).query)


class _Response(HttpResponse):
    def __init__(self, request: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(request, None)
        self.status_code = status
        self.reason = "OK" if status < 400 else "Error"
        self._body = json.dumps(body).encode() if body is not None else b""
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.content_type = "application/json"

    # Both response APIs: the legacy transport one and azure.core.rest's, which parts of the SDK use.
    def body(self) -> bytes:
        return self._body

    def read(self) -> bytes:
        return self._body

    @property
    def content(self) -> bytes:
        return self._body

    def iter_bytes(self, **kwargs: Any) -> Any:
        yield self._body

    def json(self) -> Any:
        return json.loads(self._body) if self._body else None

    def text(self, encoding: str | None = None) -> str:
        return self._body.decode()


def registry_model(
    name: str,
    version: str,
    tags: dict[str, str] | None = None,
    *,
    system_metadata: dict[str, Any] | None = None,
    archived: bool = False,
    created_at: str = "2026-01-15T00:00:00Z",
    metadata_key: str = "system_metadata",
) -> dict[str, Any]:
    """A registry model version as the registry's data plane returns it (azure-rest-api-specs
    MFE.Dataplane 2021-10-01-dataplanepreview ModelVersion, plus the system metadata the SDK writes
    under `properties.system_metadata`). Tag values are strings: the SDK publishes `str(value)`."""
    properties: dict[str, Any] = {
        "description": f"{name} from the azureml registry",
        "tags": tags or {},
        "properties": {},
        "isAnonymous": False,
        "isArchived": archived,
        "flavors": {"mlflow": {"data": {}}},
        "modelType": "mlflow_model",
        "modelUri": f"azureml://registries/azureml/models/{name}/versions/{version}",
    }
    if system_metadata is not None:
        properties[metadata_key] = system_metadata
    return {
        "id": f"azureml://registries/azureml/models/{name}/versions/{version}",
        "name": version,
        "type": "Microsoft.MachineLearningServices/registries/models/versions",
        "systemData": {"createdAt": created_at, "createdBy": "azureml", "lastModifiedAt": created_at},
        "properties": properties,
    }


# Phi-4 as azureml-assets publishes it (assets/models/system/Phi-4/spec.yaml, version 8): the only
# tag left is model_specific_defaults; tasks and supported computes are system metadata.
A100_H100 = ["Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_NC96ads_A100_v4", "Standard_ND96asr_v4",
             "Standard_ND96amsr_A100_v4", "Standard_NC40ads_H100_v5", "Standard_NC80adis_H100_v5",
             "Standard_ND96isr_H100_v5"]  # fmt: skip
PHI4_DEFAULTS = str(
    {"apply_deepspeed": "true", "deepspeed_stage": 3, "apply_lora": "true", "apply_ort": "false", "precision": 16,
     "ignore_mismatched_sizes": "false", "num_train_epochs": 1, "per_device_train_batch_size": 1,
     "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 5e-6,
     "lr_scheduler_type": "cosine", "logging_strategy": "steps", "logging_steps": 10, "save_total_limit": 1}
)  # fmt: skip
PHI4_TAGS = {"model_specific_defaults": PHI4_DEFAULTS}
PHI4_SYSTEM_METADATA: dict[str, Any] = {
    "deploymentOptions": ["UnifiedEndpointMaaS", "MaaP", "ServerlessMaaS"],
    "tasks": {"fineTuningTasks": ["chat-completion"], "inferenceTasks": ["chat-completion"]},
    "SKU": {"finetuneMinSkuSpec": "24|1|220|64", "inferenceMinSkuSpec": "24|1|220|64"},
    "supportedComputes": {"inferenceComputes": A100_H100, "finetuneComputes": A100_H100},
    "inferenceSupportedEnvs": ["vllm"],
}
# The same facts as tags, as versions published before the 2026 move carry them.
LEGACY_TAGS = {
    "task": "chat-completion",
    "finetune_compute_allow_list": str(A100_H100[:5]),
    "inference_compute_allow_list": str(A100_H100[:2]),
    "model_specific_defaults": PHI4_DEFAULTS,
}
# A retired model: phi-3-mini-4k-instruct's spec.yaml (version 15), archived, with its dates.
PHI3_RETIRED_METADATA: dict[str, Any] = {
    **PHI4_SYSTEM_METADATA,
    "deprecation": {
        "finetuneDeprecationDate": "2025-06-30T00:00:00.000000Z",
        "finetuneRetirementDate": "2025-08-30T00:00:00.000000Z",
        "inferenceDeprecationDate": "2025-06-30T00:00:00.000000Z",
        "inferenceRetirementDate": "2025-08-30T00:00:00.000000Z",
    },
}


@dataclass
class FakeAzureML(HttpTransport):
    """Routes requests by method and path; `fail_next` injects service errors."""

    compute_size: str = "Standard_NC24ads_A100_v4"
    compute_state: str = "Succeeded"
    compute_type: str = "AmlCompute"
    serving: str = "vllm"  # which serving container answers /score: vllm or mlflow
    registry_models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Azure ML vCPU quota by family: (in use, limit); the regional total likewise.
    quota: dict[str, tuple[int, int]] = field(default_factory=lambda: {"standardNCADSA100v4Family": (0, 96)})
    total_quota: tuple[int, int] = (0, 200)
    requests: list[Recorded] = field(default_factory=list)
    injected: list[tuple[str, str, int, Any]] = field(default_factory=list)  # (method, path regex, status, body)

    def __post_init__(self) -> None:
        if not self.registry_models:
            self.registry_models[("Phi-4", "8")] = registry_model(
                "Phi-4", "8", PHI4_TAGS, system_metadata=PHI4_SYSTEM_METADATA
            )

    # HttpTransport
    def __enter__(self) -> FakeAzureML:
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def fail_next(self, method: str, path_pattern: str, status: int, body: Any = None) -> None:
        self.injected.append((method, path_pattern, status, body))

    def sent(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def send(self, request: Any, **kwargs: Any) -> HttpResponse:
        raw = request.body if hasattr(request, "body") else request.content
        if isinstance(raw, bytes | bytearray):
            raw = raw.decode()
        body = json.loads(raw) if raw else None
        recorded = Recorded(request.method, request.url, dict(request.headers), body)
        self.requests.append(recorded)
        for index, (method, pattern, status, error) in enumerate(self.injected):
            if method == request.method and re.search(pattern, recorded.path):
                del self.injected[index]
                throttled = {"Retry-After": "0"} if status in (429, 503) else {}
                return _Response(request, status, error, throttled)
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, recorded.path)
            if method == request.method and match:
                status, reply = handler(recorded, *match.groups())
                return _Response(request, status, reply)
        return _Response(request, 404, _error("NotFound", f"no fake route for {request.method} {recorded.path}"))

    def _routes(self) -> list[tuple[str, str, Callable[..., tuple[int, Any]]]]:
        return [
            ("GET", r"/registrymanagement/v1.0/registries/azureml/discovery", self._discovery),
            ("GET", REGISTRY_PATH + r"/models/([^/]+)/versions/([^/]+)", self._registry_model),
            ("GET", REGISTRY_PATH + r"/models/([^/]+)/versions", self._registry_model_latest),
            ("GET", REGISTRY_PATH + r"/models", self._registry_containers),
            ("GET", ARM + r"/computes/([^/]+)", self._compute),
            ("GET", VM_SIZES, self._vm_sizes),
            ("GET", USAGES, self._usages),
            ("GET", ARM, self._workspace),
            ("GET", ARM + r"/jobs/([^/]+)", self._get(self.jobs.get)),
            ("PUT", ARM + r"/jobs/([^/]+)", self._put_job),
            ("GET", ARM + r"/models/([^/]+)/versions/([^/]+)", self._get(lambda *k: self.models.get(k))),
            ("PUT", ARM + r"/models/([^/]+)/versions/([^/]+)", self._put_model),
            ("GET", ARM + r"/onlineEndpoints", self._list_endpoints),
            ("GET", ARM + r"/onlineEndpoints/([^/]+)", self._get(self.endpoints.get)),
            ("PUT", ARM + r"/onlineEndpoints/([^/]+)", self._put_endpoint),
            ("DELETE", ARM + r"/onlineEndpoints/([^/]+)", self._delete_endpoint),
            ("POST", ARM + r"/onlineEndpoints/([^/]+)/listKeys", self._keys),
            ("GET", ARM + r"/onlineEndpoints/([^/]+)/deployments", self._list_deployments),
            ("GET", ARM + r"/onlineEndpoints/([^/]+)/deployments/([^/]+)", self._get(lambda *k: self.deployments.get(k))),  # noqa: E501
            ("PUT", ARM + r"/onlineEndpoints/([^/]+)/deployments/([^/]+)", self._put_deployment),
            ("DELETE", ARM + r"/onlineEndpoints/([^/]+)/deployments/([^/]+)", self._delete_deployment),
            ("GET", ARM + r"/onlineEndpoints/([^/]+)/providers/microsoft.insights/metrics", self._metrics),
            ("POST", r"/score", self._score),
        ]  # fmt: skip

    # Handlers: each returns (status, JSON body).
    @staticmethod
    def _get(lookup: Callable[..., Any]) -> Callable[..., tuple[int, Any]]:
        def handler(request: Recorded, *keys: str) -> tuple[int, Any]:
            found = lookup(*keys)
            return (200, found) if found is not None else (404, _error("NotFound", f"{'/'.join(keys)} not found"))

        return handler

    def _discovery(self, request: Recorded) -> tuple[int, Any]:
        return 200, {
            "registryName": "azureml",
            "primaryRegion": "eastus",
            "regions": ["eastus"],
            "subscriptionId": "reg-sub",
            "resourceGroup": "reg-rg",
            "primaryRegionResourceProviderUri": REGISTRY_HOST,
        }

    def _registry_model(self, request: Recorded, name: str, version: str) -> tuple[int, Any]:
        found = self.registry_models.get((name, version))
        return (200, found) if found else (404, _error("NotFound", f"model {name}:{version} not found"))

    def _registry_model_latest(self, request: Recorded, name: str) -> tuple[int, Any]:
        """The list the SDK asks for to resolve `latest` ($orderBy=createdtime desc, $top=1).
        Archived versions are not listed (the service's default view is active versions)."""
        versions = [m for (n, _), m in self.registry_models.items() if n == name and not m["properties"]["isArchived"]]
        versions.sort(key=lambda m: m["systemData"]["createdAt"], reverse="desc" in str(request.query.get("$orderBy")))
        top = int(request.query.get("$top", [len(versions)])[0])
        return 200, {"value": versions[:top]}

    def _registry_containers(self, request: Recorded) -> tuple[int, Any]:
        names = sorted({name for name, _ in self.registry_models})
        return 200, {"value": [{"name": n, "id": f"{REGISTRY_PATH}/models/{n}", "properties": {}} for n in names]}

    def _workspace(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"id": ARM, "name": WS, "location": "eastus", "properties": {}}

    def _compute(self, request: Recorded, name: str) -> tuple[int, Any]:
        if name != "gpu-a100":
            return 404, _error("NotFound", f"compute {name} not found")
        return 200, {
            "id": f"{ARM}/computes/{name}",
            "name": name,
            "location": "eastus",
            "properties": {
                "computeType": self.compute_type,
                "provisioningState": self.compute_state,
                "properties": {"vmSize": self.compute_size, "scaleSettings": {"minNodeCount": 0, "maxNodeCount": 2}},
            },
        }

    def _vm_sizes(self, request: Recorded) -> tuple[int, Any]:
        """The VM size list (azure-rest-api-specs, machinelearningservices,
        examples/VirtualMachineSize/list.json): not paged, `family` names the quota family."""
        return 200, {"value": [
            _vm_size("Standard_NC24ads_A100_v4", "standardNCADSA100v4Family", 24, 1),
            _vm_size("Standard_NC96ads_A100_v4", "standardNCADSA100v4Family", 96, 4),
            _vm_size("Standard_NC40ads_H100_v5", "standardNCadsH100v5Family", 40, 1),
            _vm_size("Standard_NC80adis_H100_v5", "standardNCadsH100v5Family", 80, 2),
            _vm_size("Standard_ND96isr_H100_v5", "standardNDSH100v5Family", 96, 8),
            _vm_size("Standard_D4s_v3", "standardDSv3Family", 4, 0),
        ]}  # fmt: skip

    def _usages(self, request: Recorded) -> tuple[int, Any]:
        """The Azure ML quota usages of the region (examples/Usage/list.json; as the live
        service sends them, `name.value` is the VM family's token): for each family the
        subscription's dedicated and low-priority rows, then the per-workspace breakdown."""
        rows = [_usage("Total Cluster Dedicated Regional vCPUs", "TotalDedicatedCores", *self.total_quota)]
        for family, (in_use, limit) in self.quota.items():
            # standardNCSv3Family is labelled "Standard NCSv3 Family Cluster Dedicated vCPUs"
            label = "Standard " + family.removeprefix("standard").removesuffix("Family")
            rows += [
                _usage(f"{label} Family Cluster Dedicated vCPUs", family, in_use, limit),
                _usage(f"{label} Family Cluster LowPriority vCPUs", family, 0, 100,
                       "Microsoft.MachineLearningServices/vmFamily/lowPriorityCores/usages"),
                _usage(f"{label} Family Cluster Dedicated vCPUs", family, in_use, limit,
                       "Microsoft.MachineLearningServices/workspaces/dedicatedCores/usages"),
            ]  # fmt: skip
        return 200, {"value": rows}

    def _put_job(self, request: Recorded, name: str) -> tuple[int, Any]:
        job = {**request.body, "id": f"{ARM}/jobs/{name}", "name": name}
        job["properties"] = {
            **job["properties"],
            "status": "NotStarted",
            "services": {"Studio": {"endpoint": f"https://ml.azure.com/runs/{name}"}},
        }
        self.jobs[name] = job
        return 201, job

    def set_job_status(self, name: str, status: str) -> None:
        self.jobs[name]["properties"]["status"] = status

    def _put_model(self, request: Recorded, name: str, version: str) -> tuple[int, Any]:
        model = {**request.body, "id": f"{ARM}/models/{name}/versions/{version}", "name": version}
        model["properties"] = {"flavors": {}, **model["properties"]}
        self.models[(name, version)] = model
        return 201, model

    def _endpoint_body(self, name: str, body: dict[str, Any], state: str) -> dict[str, Any]:
        props = body.get("properties", {})
        return {
            **body,
            "id": f"{ARM}/onlineEndpoints/{name}",
            "name": name,
            "location": "eastus",
            "identity": {"type": "SystemAssigned"},
            "properties": {
                **props,
                "provisioningState": state,
                "scoringUri": f"https://{name}.eastus.inference.ml.azure.com/score",
                "properties": {"createdAt": "2026-11-20T10:00:00Z", **props.get("properties", {})},
            },
        }

    def _put_endpoint(self, request: Recorded, name: str) -> tuple[int, Any]:
        state = "Succeeded" if name in self.endpoints else "Creating"
        self.endpoints[name] = self._endpoint_body(name, request.body, state)
        return 201, self.endpoints[name]

    def _list_endpoints(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"value": list(self.endpoints.values())}

    def _delete_endpoint(self, request: Recorded, name: str) -> tuple[int, Any]:
        if self.endpoints.pop(name, None) is None:
            return 404, _error("NotFound", f"endpoint {name} not found")
        return 202, None

    def _keys(self, request: Recorded, name: str) -> tuple[int, Any]:
        return 200, {"primaryKey": f"primary-{name}", "secondaryKey": f"secondary-{name}"}

    def _put_deployment(self, request: Recorded, endpoint: str, name: str) -> tuple[int, Any]:
        self.deployments[(endpoint, name)] = {
            **request.body, "id": f"{ARM}/onlineEndpoints/{endpoint}/deployments/{name}", "name": name,
            "location": "eastus", "sku": {"name": "Default", "capacity": 1},
            "properties": {"scaleSettings": {"scaleType": "Default"}, **request.body["properties"],
                           "provisioningState": "Creating"},
        }  # fmt: skip
        return 201, self.deployments[(endpoint, name)]

    def _list_deployments(self, request: Recorded, endpoint: str) -> tuple[int, Any]:
        return 200, {"value": [d for (e, _), d in self.deployments.items() if e == endpoint]}

    def _delete_deployment(self, request: Recorded, endpoint: str, name: str) -> tuple[int, Any]:
        self.deployments.pop((endpoint, name), None)
        return 202, None

    def _metrics(self, request: Recorded, endpoint: str) -> tuple[int, Any]:
        points = self.metrics.get(endpoint, [])
        return 200, {"value": [{"name": {"value": "RequestsPerMinute"}, "timeseries": [{"data": points}]}]}

    def _score(self, request: Recorded) -> tuple[int, Any]:
        """As a serving container answers. `vllm`: the foundation-model serving container
        (azureml-assets foundation-model-serve, managed_inference.py) takes `input_string` as a
        list of messages and answers `{"output": ...}`. `mlflow`: the MLflow scoring of a
        fine-tuned chat model takes a list of conversations and answers pandas records."""
        data = (request.body or {}).get("input_data") or {}
        conversation = data.get("input_string")
        flat = isinstance(conversation, list) and all(isinstance(m, dict) and "role" in m for m in conversation)
        nested = isinstance(conversation, list) and len(conversation) == 1 and isinstance(conversation[0], list)
        if self.serving == "vllm" and flat:
            return 200, {"output": "a reply from the deployment", "finish_reason": "stop", "model": "fine-tuned"}
        if self.serving == "mlflow" and nested and "params" in request.body:
            return 200, [{"0": "a reply from the deployment"}]
        if self.serving == "vllm":
            return 400, {"output": None, "error": {"status_code": 400, "body": "input_string must hold messages"}}
        return 424, {"message": "An unexpected error occurred in scoring script. Check the logs for more info."}


def _vm_size(name: str, family: str, vcpus: int, gpus: int) -> dict[str, Any]:
    return {"name": name, "family": family, "vCPUs": vcpus, "gpus": gpus, "osVhdSizeMB": 1047552,
            "maxResourceVolumeMB": 65536, "memoryGB": 220.0, "lowPriorityCapable": True, "premiumIO": True,
            "supportedComputeTypes": ["AmlCompute", "ComputeInstance", "MIR"]}  # fmt: skip


DEDICATED_USAGE = "Microsoft.MachineLearningServices/vmFamily/dedicatedCores/usages"


def _usage(label: str, value: str, in_use: int, limit: int, kind: str = DEDICATED_USAGE) -> dict[str, Any]:
    return {"id": f"/subscriptions/{SUB}/providers/Microsoft.MachineLearningServices/locations/eastus/usages/{value}",
            "amlWorkspaceLocation": "eastus", "type": kind, "unit": "Count", "currentValue": in_use, "limit": limit,
            "name": {"value": value, "localizedValue": label}}  # fmt: skip


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
