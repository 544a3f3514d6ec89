"""A fake Azure ML at the HTTP transport level: the real azure-ai-ml SDK runs against it, and every
request it sends is recorded for the tests to assert. Responses have the shapes the service
returns (only the fields the SDK reads); state (jobs, models, endpoints and their deployments)
lives in dictionaries. An endpoint hosts several deployments and splits its traffic between them
as its `properties.traffic` says (azure-rest-api-specs, machinelearningservices stable 2025-09-01,
mfe.json: OnlineEndpoint.traffic, "Traffic values need to sum to 100"); what the service refuses
beyond that is our assumption, noted where it is made."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import HttpResponse, HttpTransport
from azure.core.utils import CaseInsensitiveDict

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
OPERATION_RESULTS = (
    f"/subscriptions/{SUB}/providers/Microsoft.MachineLearningServices/locations/eastus/mfeOperationResults"
)
DEPLOYMENT_HEADER = "azureml-model-deployment"
# The workspace's MLflow tracking URI as ARM answers it (Workspace.properties.mlFlowTrackingUri),
# and the MLflow REST API under it (mlflow.org/docs/latest/rest-api.html).
MLFLOW_TRACKING_URI = f"azureml://eastus.api.azureml.ms/mlflow/v1.0{ARM}"
MLFLOW_API = f"/mlflow/v1.0{ARM}/api/2.0/mlflow"
PIPELINE_COMPONENT = "chat_completion_pipeline"
REGISTRY_HOST = "https://eastus.api.azureml.ms/"
REGISTRY_PATH = (
    "/mferp/managementfrontend/subscriptions/reg-sub/resourceGroups/reg-rg"
    "/providers/Microsoft.MachineLearningServices/registries/([^/]+)"
)
WORKSPACE_ID = "5d1c0f3e-7a2b-4c8d-9e6f-0a1b2c3d4e5f"  # Workspace.properties.workspaceId (a GUID)


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
        # Case-insensitive, as HTTP headers are: the SDK's pollers look for "location".
        self.headers = CaseInsensitiveDict({"Content-Type": "application/json", **(headers or {})})
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
    registry: str = "azureml",
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
        "modelUri": f"azureml://registries/{registry}/models/{name}/versions/{version}",
    }
    if system_metadata is not None:
        properties[metadata_key] = system_metadata
    return {
        "id": f"azureml://registries/{registry}/models/{name}/versions/{version}",
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
# Phi-4-mini-instruct, the model azureml-examples' serverless fine-tuning notebook uses: azureml-assets
# has no spec of it, so Phi-4's system metadata stands in, with the serverless fine-tuning regions
# as the notebook reads them (tag `maas-finetuning-deploy-regions`; the value's format is not
# documented: a Python-literal list, as the registry's other list tags) and as its support table
# lists them.
SERVERLESS_REGIONS = ["eastus2", "eastus", "northcentralus", "westus3", "westus", "southcentralus"]
PHI4_MINI_TAGS = {"maas-finetuning-deploy-regions": str(SERVERLESS_REGIONS)}
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
class MlflowRun:
    """A run of Azure ML's MLflow tracking: a job's, or one of its pipeline's steps'."""

    run_id: str
    experiment_id: str
    tags: dict[str, str]
    logged: list[dict[str, Any]] = field(default_factory=list)  # every value: key, value, timestamp, step

    def body(self) -> dict[str, Any]:
        """As MLflow's runs/get and runs/search answer: only the latest value of each metric."""
        latest: dict[str, dict[str, Any]] = {}
        for metric in sorted(self.logged, key=lambda metric: (metric["timestamp"], metric["step"])):
            latest[metric["key"]] = metric
        return {
            "info": {"run_id": self.run_id, "run_uuid": self.run_id, "experiment_id": self.experiment_id,
                     "run_name": self.tags["mlflow.runName"], "status": "FINISHED", "lifecycle_stage": "active"},
            "data": {"metrics": list(latest.values()), "params": [],
                     "tags": [{"key": key, "value": value} for key, value in self.tags.items()]},
        }  # fmt: skip


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
    deployment_logs: dict[tuple[str, str], str] = field(default_factory=dict)
    served: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, deployment) per answered score
    deletions_finish: bool = True  # False: a deletion's operation stays in progress (202) when polled
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    mlflow_runs: dict[str, MlflowRun] = field(default_factory=dict)  # by run id; a job's is its name
    # Azure ML vCPU quota by family: (in use, limit); the regional total likewise.
    quota: dict[str, tuple[int, int]] = field(default_factory=lambda: {"standardNCADSA100v4Family": (0, 96)})
    total_quota: tuple[int, int] = (0, 200)
    serverless_endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    marketplace_subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscription_status: str = "Subscribed"  # what a new marketplace subscription becomes
    # The metric definitions a serverless endpoint answers: none is documented, so by default none.
    serverless_metric_definitions: list[dict[str, Any]] = field(default_factory=list)
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
                status, reply, *headers = handler(recorded, *match.groups())
                return _Response(request, status, reply, *headers)
        return _Response(request, 404, _error("NotFound", f"no fake route for {request.method} {recorded.path}"))

    def _routes(self) -> list[tuple[str, str, Callable[..., tuple[Any, ...]]]]:
        return [
            ("GET", r"/registrymanagement/v1.0/registries/([^/]+)/discovery", self._discovery),
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
            ("GET", OPERATION_RESULTS + r"/([^/]+)", self._operation_result),
            ("POST", ARM + r"/onlineEndpoints/([^/]+)/deployments/([^/]+)/getLogs", self._deployment_logs),
            ("GET", ARM + r"/onlineEndpoints/([^/]+)/providers/microsoft.insights/metrics", self._metrics),
            ("GET", MLFLOW_API + r"/runs/get", self._mlflow_get_run),
            ("POST", MLFLOW_API + r"/runs/search", self._mlflow_search_runs),
            ("POST", r"/score", self._score),
            ("GET", ARM + r"/models/([^/]+)/versions", self._list_model_versions),
            ("GET", ARM + r"/serverlessEndpoints", self._list_serverless),
            ("GET", ARM + r"/serverlessEndpoints/([^/]+)", self._get(self.serverless_endpoints.get)),
            ("PUT", ARM + r"/serverlessEndpoints/([^/]+)", self._put_serverless),
            ("PATCH", ARM + r"/serverlessEndpoints/([^/]+)", self._patch_serverless),
            ("DELETE", ARM + r"/serverlessEndpoints/([^/]+)", self._delete_serverless),
            ("POST", ARM + r"/serverlessEndpoints/([^/]+)/listKeys", self._serverless_keys),
            ("GET", ARM + r"/serverlessEndpoints/([^/]+)/providers/microsoft.insights/metricDefinitions",
             self._serverless_metric_definitions),
            ("GET", ARM + r"/serverlessEndpoints/([^/]+)/providers/microsoft.insights/metrics", self._metrics),
            ("GET", ARM + r"/marketplaceSubscriptions", self._list_subscriptions),
            ("GET", ARM + r"/marketplaceSubscriptions/([^/]+)", self._get(self.marketplace_subscriptions.get)),
            ("PUT", ARM + r"/marketplaceSubscriptions/([^/]+)", self._put_subscription),
            ("POST", r"/v1/chat/completions", self._chat_completions),
        ]  # fmt: skip

    # Handlers: each returns (status, JSON body) or (status, JSON body, response headers).
    @staticmethod
    def _get(lookup: Callable[..., Any]) -> Callable[..., tuple[int, Any]]:
        def handler(request: Recorded, *keys: str) -> tuple[int, Any]:
            found = lookup(*keys)
            return (200, found) if found is not None else (404, _error("NotFound", f"{'/'.join(keys)} not found"))

        return handler

    def _discovery(self, request: Recorded, registry: str) -> tuple[int, Any]:
        return 200, {
            "registryName": registry,
            "primaryRegion": "eastus",
            "regions": ["eastus"],
            "subscriptionId": "reg-sub",
            "resourceGroup": "reg-rg",
            "primaryRegionResourceProviderUri": REGISTRY_HOST,
        }

    def _in_registry(self, registry: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {key: model for key, model in self.registry_models.items()
                if model["id"].startswith(f"azureml://registries/{registry}/")}  # fmt: skip

    def _registry_model(self, request: Recorded, registry: str, name: str, version: str) -> tuple[int, Any]:
        found = self._in_registry(registry).get((name, version))
        return (200, found) if found else (404, _error("NotFound", f"model {name}:{version} not found"))

    def _registry_model_latest(self, request: Recorded, registry: str, name: str) -> tuple[int, Any]:
        """The list the SDK asks for to resolve `latest` ($orderBy=createdtime desc, $top=1).
        Archived versions are not listed (the service's default view is active versions)."""
        versions = [m for (n, _), m in self._in_registry(registry).items()
                    if n == name and not m["properties"]["isArchived"]]  # fmt: skip
        versions.sort(key=lambda m: m["systemData"]["createdAt"], reverse="desc" in str(request.query.get("$orderBy")))
        top = int(request.query.get("$top", [len(versions)])[0])
        return 200, {"value": versions[:top]}

    def _registry_containers(self, request: Recorded, registry: str) -> tuple[int, Any]:
        names = sorted({name for name, _ in self._in_registry(registry)})
        path = REGISTRY_PATH.replace("([^/]+)", registry)
        return 200, {"value": [{"name": n, "id": f"{path}/models/{n}", "properties": {}} for n in names]}

    def _workspace(self, request: Recorded) -> tuple[int, Any]:
        """The workspace (azure-rest-api-specs, workspaceRP.json: WorkspaceProperties, whose
        read-only `mlFlowTrackingUri` the SDK reads as `mlflow_tracking_uri`)."""
        properties = {"mlFlowTrackingUri": MLFLOW_TRACKING_URI, "workspaceId": WORKSPACE_ID}
        return 200, {"id": ARM, "name": WS, "location": "eastus", "properties": properties}

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
        """A fine-tuning job of a partner's model is refused without the workspace's subscription
        to its offer (our assumption: azureml-examples' serverless notebook subscribes first)."""
        details = request.body["properties"].get("fineTuningDetails") or {}
        base = str((details.get("model") or {}).get("uri", "")).rsplit("/versions/", 1)[0]
        if base and not base.startswith("azureml://registries/azureml/") and not self._subscribed(base):
            return 400, _error("UserError", f"no marketplace subscription to {base} in this workspace")
        job = {**request.body, "id": f"{ARM}/jobs/{name}", "name": name}
        job["properties"] = {
            **job["properties"],
            "status": "NotStarted",
            "services": {"Studio": {"endpoint": f"https://ml.azure.com/runs/{name}"}},
        }
        self.jobs[name] = job
        self._job_run(name, job["properties"].get("experimentName") or "Default")
        return 201, job

    def set_job_status(self, name: str, status: str) -> None:
        """A fine-tuning job that completes has registered its model (its `registered_model`
        output) by then, as the service does."""
        job = self.jobs[name]["properties"]
        job["status"] = status
        if status == "Completed" and job.get("jobType") == "FineTuning":
            self.register_output(name)

    def register_output(self, job_name: str) -> tuple[str, str]:
        """What the service registers for a fine-tuning job: its `registered_model` output's
        asset name, next version (azureml-examples take version 1 of a fresh name), naming the job
        (ModelVersion.properties.jobName) and the base model (`baseModelId`, as azureml-assets'
        register_model step records it)."""
        job = self.jobs[job_name]["properties"]
        name = job["outputs"]["registered_model"]["assetName"]
        version = str(1 + sum(1 for (n, _) in self.models if n == name))
        base = job["fineTuningDetails"]["model"]["uri"].rsplit("/", 2)[0]
        self.models[(name, version)] = {
            "id": f"{ARM}/models/{name}/versions/{version}", "name": version,
            "properties": {"jobName": job_name, "modelType": "mlflow_model", "flavors": {},
                           "modelUri": f"azureml://jobs/{job_name}/outputs/registered_model",
                           "properties": {"baseModelId": base, "maas-finetuning": "true"}, "tags": {}},
            "systemData": {"createdAt": "2026-11-20T10:00:00Z"},
        }  # fmt: skip
        return name, version

    def set_job_metrics(self, job_name: str, metrics: dict[str, list[tuple[int, float]]], *,
                        node: str = "finetune", nested: bool = False) -> None:  # fmt: skip
        """The run of the job's step `node` logs `metrics` ({key: [(step, value), ...]}, in the
        order logged): a child of the job's run or, `nested`, of the run of the registry pipeline
        component the step belongs to (which of the two the service does is not documented)."""
        parent = self._job_run(job_name, "Default")
        if nested:
            parent = self._child_run(parent, PIPELINE_COMPONENT)
        run = self._child_run(parent, node)
        for key, points in metrics.items():
            for step, value in points:
                run.logged.append({"key": key, "value": value, "timestamp": self._now_ms(), "step": step})

    def _now_ms(self) -> int:
        """A strictly increasing clock: each metric is logged after the one before."""
        logged = sum(len(run.logged) for run in self.mlflow_runs.values())
        return 1_790_000_000_000 + 1000 * logged

    def _job_run(self, job_name: str, experiment_name: str) -> MlflowRun:
        """The job's own run, created with the job: its run id is the job's name."""
        if job_name not in self.mlflow_runs:
            experiment_id = str(uuid.uuid5(uuid.NAMESPACE_URL, experiment_name))
            tags = {"mlflow.runName": job_name, "mlflow.rootRunId": job_name}
            self.mlflow_runs[job_name] = MlflowRun(job_name, experiment_id, tags)
        return self.mlflow_runs[job_name]

    def _child_run(self, parent: MlflowRun, name: str) -> MlflowRun:
        run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{parent.run_id}/{name}"))
        if run_id not in self.mlflow_runs:
            tags = {"mlflow.runName": name, "mlflow.parentRunId": parent.run_id,
                    "mlflow.rootRunId": parent.tags["mlflow.rootRunId"]}  # fmt: skip
            self.mlflow_runs[run_id] = MlflowRun(run_id, parent.experiment_id, tags)
        return self.mlflow_runs[run_id]

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
        refused = self._traffic_refusal(name, request.body.get("properties", {}).get("traffic") or {})
        if refused:
            return 400, _error("UserError", refused)
        state = "Succeeded" if name in self.endpoints else "Creating"
        self.endpoints[name] = self._endpoint_body(name, request.body, state)
        return 201, self.endpoints[name]

    def _traffic_refusal(self, endpoint: str, traffic: dict[str, int]) -> str | None:
        """Why a traffic map is refused: it names a deployment the endpoint does not host, or its
        percentages do not sum to 100 (the spec's rule) or to 0 (no deployment serves: the
        troubleshooting guide's 404 for an endpoint with no positive weight implies the service
        accepts that state)."""
        unknown = sorted(name for name in traffic if (endpoint, name) not in self.deployments)
        if unknown:
            return f"Traffic rules reference deployments that do not exist in endpoint {endpoint}: {', '.join(unknown)}"
        if sum(traffic.values()) not in (0, 100):
            return f"Traffic values of endpoint {endpoint} must sum to 100 (or 0), not {sum(traffic.values())}"
        return None

    def _list_endpoints(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"value": list(self.endpoints.values())}

    def _delete_endpoint(self, request: Recorded, name: str) -> tuple[int, Any]:
        if self.endpoints.pop(name, None) is None:
            return 404, _error("NotFound", f"endpoint {name} not found")
        for key in [key for key in self.deployments if key[0] == name]:  # its deployments go with it
            del self.deployments[key]
        return 202, None

    def _keys(self, request: Recorded, name: str) -> tuple[int, Any]:
        return 200, {"primaryKey": f"primary-{name}", "secondaryKey": f"secondary-{name}"}

    def _put_deployment(self, request: Recorded, endpoint: str, name: str) -> tuple[int, Any]:
        """Creating a deployment leaves the endpoint's traffic as it is: a new one takes 0% until
        the endpoint's traffic names it (azureml-examples, online-endpoints-safe-rollout.ipynb)."""
        self.deployments[(endpoint, name)] = {
            **request.body, "id": f"{ARM}/onlineEndpoints/{endpoint}/deployments/{name}", "name": name,
            "location": "eastus", "sku": {"name": "Default", "capacity": 1},
            "properties": {"scaleSettings": {"scaleType": "Default"}, **request.body["properties"],
                           "provisioningState": "Creating"},
        }  # fmt: skip
        return 201, self.deployments[(endpoint, name)]

    def _list_deployments(self, request: Recorded, endpoint: str) -> tuple[int, Any]:
        return 200, {"value": [d for (e, _), d in self.deployments.items() if e == endpoint]}

    def _delete_deployment(self, request: Recorded, endpoint: str, name: str) -> tuple[int, Any, dict[str, str]]:
        """ARM's asynchronous delete (the spec's OnlineDeployments_Delete: 202 with Location,
        final state via location); the fake deletes at once and the location answers done. A
        deployment that takes traffic is refused: our assumption, the specs and docs do not say."""
        if (endpoint, name) not in self.deployments:
            return 404, _error("NotFound", f"deployment {name} not found in endpoint {endpoint}"), {}
        share = (self.endpoints[endpoint]["properties"].get("traffic") or {}).get(name, 0)
        if share > 0:
            return 400, _error("UserError", f"deployment {name} takes {share}% of endpoint {endpoint}'s traffic: "
                                            "set it to 0 before deleting it"), {}  # fmt: skip
        del self.deployments[(endpoint, name)]
        location = f"https://management.azure.com{OPERATION_RESULTS}/delete-{endpoint}-{name}"
        return 202, None, {"Location": location, "Retry-After": "10"}  # the spec's least

    def _operation_result(self, request: Recorded, operation: str) -> tuple[int, Any, dict[str, str]]:
        """The location a deletion is polled at: 202 while it runs, 200 once done."""
        return (200, None, {}) if self.deletions_finish else (202, None, {"Retry-After": "10"})

    def _deployment_logs(self, request: Recorded, endpoint: str, name: str) -> tuple[int, Any]:
        return 200, {"content": self.deployment_logs.get((endpoint, name), "")}

    def _metrics(self, request: Recorded, endpoint: str) -> tuple[int, Any]:
        points = self.metrics.get(endpoint, [])
        return 200, {"value": [{"name": {"value": "RequestsPerMinute"}, "timeseries": [{"data": points}]}]}

    def _mlflow_get_run(self, request: Recorded) -> tuple[int, Any]:
        """runs/get?run_id=: the run, or MLflow's RESOURCE_DOES_NOT_EXIST."""
        run_id = (request.query.get("run_id") or request.query.get("run_uuid") or [""])[0]
        if run_id not in self.mlflow_runs:
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run '{run_id}' not found."}
        return 200, {"run": self.mlflow_runs[run_id].body()}

    def _mlflow_search_runs(self, request: Recorded) -> tuple[int, Any]:
        """runs/search in `experiment_ids`, with a filter of `tags.<key> = '<value>'` conditions
        joined by AND (all this fake reads of MLflow's search syntax). Proto3 JSON leaves out an
        empty list: no match answers {}."""
        body = request.body or {}
        text = body.get("filter") or ""
        conditions = [re.fullmatch(r"\s*tags\.([\w.]+)\s*=\s*'([^']*)'\s*", part)
                      for part in re.split(r"\s+and\s+", text, flags=re.IGNORECASE)] if text else []  # fmt: skip
        if not all(conditions):
            return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"the fake cannot read filter {text!r}"}
        wanted = [condition.groups() for condition in conditions if condition]
        found = [
            run.body() for run in self.mlflow_runs.values()
            if run.experiment_id in body.get("experiment_ids", [])
            and all(run.tags.get(key) == value for key, value in wanted)
        ][: int(body.get("max_results", 1000))]  # fmt: skip
        return 200, {"runs": found} if found else {}

    def _score(self, request: Recorded) -> tuple[int, Any, dict[str, str]]:
        """The deployment named by the `azureml-model-deployment` header answers, whatever its
        traffic; without the header, the one with the largest share (the service splits requests
        by the shares; a fake answers the same way every time). The answer names the deployment
        in the same header (our assumption: no source we found documents it).

        As a serving container answers. `vllm`: the foundation-model serving container
        (azureml-assets foundation-model-serve, managed_inference.py) takes `input_string` as a
        list of messages and answers `{"output": ...}`. `mlflow`: the MLflow scoring of a
        fine-tuned chat model takes a list of conversations and answers pandas records."""
        endpoint = (urlparse(request.url).hostname or "").split(".")[0]
        if endpoint not in self.endpoints:
            return 404, {"message": f"endpoint {endpoint} not found"}, {}
        named = {key.lower(): value for key, value in request.headers.items()}.get(DEPLOYMENT_HEADER)
        traffic = {n: p for n, p in (self.endpoints[endpoint]["properties"].get("traffic") or {}).items() if p > 0}
        deployment = named or max(sorted(traffic), key=lambda n: traffic[n], default=None)
        if deployment is None:
            return 404, {"message": f"no deployment of endpoint {endpoint} takes traffic"}, {}
        if (endpoint, deployment) not in self.deployments:
            return 404, {"message": f"deployment {deployment} not found in endpoint {endpoint}"}, {}
        self.served.append((endpoint, deployment))
        served = {DEPLOYMENT_HEADER: deployment}
        data = (request.body or {}).get("input_data") or {}
        conversation = data.get("input_string")
        flat = isinstance(conversation, list) and all(isinstance(m, dict) and "role" in m for m in conversation)
        nested = isinstance(conversation, list) and len(conversation) == 1 and isinstance(conversation[0], list)
        reply = f"a reply from the deployment {deployment}"
        if self.serving == "vllm" and flat:
            return 200, {"output": reply, "finish_reason": "stop", "model": "fine-tuned"}, served
        if self.serving == "mlflow" and nested and "params" in request.body:
            return 200, [{"0": reply}], served
        if self.serving == "vllm":
            refused = {"status_code": 400, "body": "input_string must hold messages"}
            return 400, {"output": None, "error": refused}, served
        return 424, {"message": "An unexpected error occurred in scoring script. Check the logs for more info."}, served

    def _list_model_versions(self, request: Recorded, name: str) -> tuple[int, Any]:
        return 200, {"value": [model for (n, _), model in self.models.items() if n == name]}

    # Serverless endpoints (azure-rest-api-specs, machinelearningservices 2024-01-01-preview, the
    # api-version azure-ai-ml 1.35.2 sends; shapes of stable 2024-10-01 examples/Workspace/
    # ServerlessEndpoint/get.json) and marketplace subscriptions.
    def _put_serverless(self, request: Recorded, name: str) -> tuple[int, Any]:
        """Create one, or change an existing one's tags. Refused (our assumptions, beyond the
        spec): a model that is not a workspace model version of this workspace, a model change, a
        partner's model without a subscribed marketplace subscription to its base (Foundry's docs:
        "you must create a subscription before you can deploy them")."""
        body = request.body
        model_id = body["properties"]["modelSettings"]["modelId"]
        found = re.fullmatch(rf"azureml://locations/eastus/workspaces/{WORKSPACE_ID}/models/([^/]+)/versions/([^/]+)",
                             model_id)  # fmt: skip
        model = self.models.get((found.group(1), found.group(2))) if found else None
        if model is None:
            return 400, _error("UserError", f"model {model_id} is not a model version of workspace {WS}")
        if body.get("sku", {}).get("name") != "Consumption" or body.get("location") != "eastus":
            return 400, _error("UserError", "a serverless endpoint takes sku Consumption in the workspace's location")
        base = model["properties"]["properties"].get("baseModelId", "")
        if not base.startswith("azureml://registries/azureml/") and not self._subscribed(base):
            return 400, _error("UserError", f"no marketplace subscription to {base} in this workspace")
        existing = self.serverless_endpoints.get(name)
        if existing is not None:
            if existing["properties"]["modelSettings"]["modelId"] != model_id:
                return 400, _error("UserError", f"serverless endpoint {name} serves another model")
            existing["tags"] = body.get("tags") or {}
            return 200, existing
        self.serverless_endpoints[name] = {
            "id": f"{ARM}/serverlessEndpoints/{name}", "name": name,
            "type": "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints", "location": "eastus",
            "tags": body.get("tags") or {}, "sku": {"name": "Consumption"},
            "systemData": {"createdAt": _created_at(len(self.requests))},
            "properties": {"modelSettings": {"modelId": model_id}, "authMode": "Key",
                           "inferenceEndpoint": {"uri": f"https://{name}.eastus.models.ai.azure.com", "headers": {}},
                           "provisioningState": "Creating", "endpointState": "Creating",
                           "contentSafety": {"contentSafetyStatus": "Enabled"}},
        }  # fmt: skip
        return 201, self.serverless_endpoints[name]

    def _patch_serverless(self, request: Recorded, name: str) -> tuple[int, Any]:
        """ServerlessEndpoints_Update: tags (and sku, identity) only."""
        found = self.serverless_endpoints.get(name)
        if found is None:
            return 404, _error("NotFound", f"serverless endpoint {name} not found")
        if set(request.body) - {"tags", "sku", "identity"}:
            return 400, _error("UserError", f"a serverless endpoint's update takes tags, sku, identity: {request.body}")
        found["tags"] = request.body.get("tags", found["tags"])
        return 200, found

    def _list_subscriptions(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"value": list(self.marketplace_subscriptions.values())}

    def provision_serverless(self, name: str, state: str = "Succeeded") -> None:
        self.serverless_endpoints[name]["properties"]["provisioningState"] = state

    def _list_serverless(self, request: Recorded) -> tuple[int, Any]:
        return 200, {"value": list(self.serverless_endpoints.values())}

    def _delete_serverless(self, request: Recorded, name: str) -> tuple[int, Any, dict[str, str]]:
        """202 with Location (stable 2024-10-01 examples/.../delete.json), deleted at once here."""
        if self.serverless_endpoints.pop(name, None) is None:
            return 404, _error("NotFound", f"serverless endpoint {name} not found"), {}
        location = f"https://management.azure.com{OPERATION_RESULTS}/delete-serverless-{name}"
        return 202, None, {"Location": location, "Retry-After": "10"}

    def _serverless_keys(self, request: Recorded, name: str) -> tuple[int, Any]:
        if name not in self.serverless_endpoints:
            return 404, _error("NotFound", f"serverless endpoint {name} not found")
        return 200, {"primaryKey": f"sk-primary-{name}", "secondaryKey": f"sk-secondary-{name}"}

    def _serverless_metric_definitions(self, request: Recorded, name: str) -> tuple[int, Any]:
        return 200, {"value": self.serverless_metric_definitions}

    def _subscribed(self, model_id: str) -> bool:
        return any(sub["properties"]["modelId"] == model_id and sub["properties"]["marketplaceSubscriptionStatus"]
                   == "Subscribed" for sub in self.marketplace_subscriptions.values())  # fmt: skip

    def _put_subscription(self, request: Recorded, name: str) -> tuple[int, Any]:
        self.marketplace_subscriptions[name] = {
            "id": f"{ARM}/marketplaceSubscriptions/{name}", "name": name,
            "properties": {"modelId": request.body["properties"]["modelId"],
                           "marketplacePlan": {"publisherId": "partner", "offerId": "offer", "planId": "plan"},
                           "marketplaceSubscriptionStatus": self.subscription_status, "provisioningState": "Succeeded"},
        }  # fmt: skip
        return 201, self.marketplace_subscriptions[name]

    def _chat_completions(self, request: Recorded) -> tuple[int, Any]:
        """A serverless endpoint's chat completion (the Foundry Models API reference: OpenAI's
        shape), with its key as a bearer token."""
        name = (urlparse(request.url).hostname or "").split(".")[0]
        endpoint = self.serverless_endpoints.get(name)
        if endpoint is None:
            return 404, {"error": {"code": "NotFound", "message": f"no serverless endpoint {name}"}}
        authorization = {key.lower(): value for key, value in request.headers.items()}.get("authorization")
        if authorization != f"Bearer sk-primary-{name}":
            return 401, {"error": {"code": "Unauthorized", "message": "invalid key"}}
        messages = (request.body or {}).get("messages")
        if not isinstance(messages, list) or not messages:
            return 422, {"error": {"code": "Invalid input", "message": "messages is required"}}
        self.served.append((endpoint["tags"].get("endpoint", name), endpoint["tags"].get("deployment", name)))
        reply = {"role": "assistant", "content": f"a reply from the serverless endpoint {name}"}
        return 200, {"id": "cmpl-1", "object": "chat.completion", "created": 1790000000, "model": name,
                     "choices": [{"index": 0, "finish_reason": "stop", "message": reply}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}  # fmt: skip


def _created_at(serial: int) -> str:
    """A creation time that grows with `serial` (one second each), as the service's would."""
    return f"2026-11-20T{10 + serial // 3600:02d}:{serial // 60 % 60:02d}:{serial % 60:02d}Z"


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
