"""What both Azure ML backends do the same way: the workspace's and the registry's clients, the
base model's preflight checks, quotas, a job's status and metrics, and managed online endpoints
with their deployments, traffic and scoring. Nothing here blocks on a long-running operation:
jobs and deployments are started and their progress is read later."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cached_property, partial, wraps
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlparse

from shared.backends import smoke
from shared.backends.azureml import quota
from shared.backends.azureml.component import REGISTRY
from shared.backends.azureml.registry_model import Purpose, RegistryModel
from shared.backends.azureml.settings import DISCOVER_BASE_MODEL, Workspace, prepared_uri, workspace_settings
from shared.backends.interface import (
    BackendError,
    DeployProgress,
    DeployState,
    Endpoint,
    JobReport,
    ModelRef,
    TransientBackendError,
)
from shared.costs.estimate import Estimate, Hosting, gpu_training, idle_teardown_hours
from shared.costs.prices import price_book
from shared.vocabulary import (
    BASE_MODEL_ID_TAG,
    BASE_MODEL_TAG,
    DEPLOYMENT_HEADER,
    MANAGED_BY,
    MANAGED_BY_TAG,
    JobStatus,
)

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import ManagedOnlineDeployment

    from shared.settings import Settings

log = logging.getLogger(__name__)
DEPLOYMENT_INSTANCES = 1
# NC v1 (K80) sizes, and NCv3 (V100) sizes retired on 2025-09-30.
RETIRED_VM_SIZES = frozenset(
    {"standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r",
     "standard_nc6s_v3", "standard_nc12s_v3", "standard_nc24s_v3", "standard_nc24rs_v3"}
)  # fmt: skip
LIVENESS_INITIAL_DELAY_S = 600
METRICS_API_VERSION = "2023-10-01"
ENDPOINT_METRICS_NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
CHAT_TASK = "chat-completion"
MANAGEMENT_SCOPE = "https://management.azure.com/.default"
# The MLflow REST API under the workspace's tracking server (mlflow.org/docs/latest/rest-api.html).
MLFLOW_API = "api/2.0/mlflow"
# A pipeline job has a handful of runs (its own, its steps'): one page of a search holds them all.
MLFLOW_MAX_RUNS = 100
# HF Trainer's training losses: `train_loss`, the mean over the run, once at the end; `loss` at
# each logging step. Both are logged at the trainer's global step.
TRAINING_LOSSES = ("train_loss", "loss")


class PreflightError(BackendError):
    """Refused before anything was created in Azure; the message says why."""


P = ParamSpec("P")
R = TypeVar("R")


def service_message(error: Exception) -> str:
    """The service's own words for a failed call: status, error code and message."""
    from azure.core.exceptions import HttpResponseError

    text = getattr(error, "message", None) or str(error)
    if isinstance(error, HttpResponseError):
        detail = getattr(error, "error", None)
        code, message = getattr(detail, "code", None), getattr(detail, "message", None) or text
        status = f"{error.status_code} " if error.status_code else ""
        text = f"{status}{code}: {message}" if code else f"{status}{message}"
    return " ".join(str(text).split())[:500]


def service_errors(action: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Whatever azure-ai-ml or azure-core raises (ValidationException, HttpResponseError, a
    credential or network failure: all AzureError) becomes a BackendError with the service's
    message, so the flow records a failure instead of crashing with a traceback."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            from azure.core.exceptions import AzureError

            try:
                return method(*args, **kwargs)
            except AzureError as error:
                kind = TransientBackendError if _transient(error) else BackendError
                raise kind(f"Azure ML {action} failed: {service_message(error)}") from None

        return wrapper

    return decorate


def _transient(error: Exception) -> bool:
    """Throttled, conflicting with a concurrent change, or the service or network unavailable
    (the SDK has already retried 429 and 5xx a few times)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return True
    return isinstance(error, HttpResponseError) and error.status_code in (408, 409, 429, 500, 502, 503, 504)


def check_model(model: RegistryModel, today: datetime) -> None:
    """Refuse an archived model, one past its fine-tune retirement date (naming the date), or
    one whose fine-tuning tasks are known and exclude chat completion."""
    if model.archived:
        raise PreflightError(
            f"base model {model.label} is archived in the {REGISTRY} registry: choose another BASE_MODEL"
        )
    retirement = model.finetune_retirement()
    if retirement:
        try:
            retired = datetime.fromisoformat(retirement).replace(tzinfo=UTC) <= today
        except ValueError:
            retired = False
        if retired:
            raise PreflightError(
                f"base model {model.label} was retired for fine-tuning on {retirement}: choose another BASE_MODEL"
            )
    tasks = model.finetune_tasks()
    if tasks is not None and CHAT_TASK not in {task.lower() for task in tasks}:
        raise PreflightError(
            f"base model {model.label} is fine-tunable for {', '.join(tasks)}, not {CHAT_TASK}: "
            "choose another BASE_MODEL"
        )


def check_vm_size(model: RegistryModel, vm_size: str, purpose: Purpose) -> str | None:
    """Refuse a retired size, or one off the model's allow-list; when the registry names no
    allow-list, say so (returned, for the run's history) instead of passing silently."""
    doing = "fine-tuning" if purpose == "finetune" else "deployment"
    if vm_size.lower() in RETIRED_VM_SIZES:
        raise PreflightError(f"{doing} VM size {vm_size} is retired: use an A100 size such as Standard_NC24ads_A100_v4")
    allowed, source = model.allowed_computes(purpose)
    if allowed is None:
        return f"{model.label} names no {doing} VM sizes ({source} are missing): {vm_size} was not checked"
    if vm_size.lower() not in {size.lower() for size in allowed}:
        raise PreflightError(
            f"{doing} VM size {vm_size} is not allowed for {model.label} ({source}): {', '.join(allowed)}"
        )
    return None


def _version_order(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (-1,)


def model_uri(name: str, version: str, registry: str = REGISTRY) -> str:
    return f"azureml://registries/{registry}/models/{name}/" + (f"versions/{version}" if version else "labels/latest")


def parse_base_model(text: str) -> tuple[str, str, str]:
    """BASE_MODEL as (registry, name, version): `name[:version]` is a model of the `azureml`
    registry; `azureml://registries/<registry>/models/<name>[/versions/<version>]` names another
    (a partner's, such as `azureml-mistral`). An empty version: the newest active one."""
    found = re.fullmatch(r"azureml://registries/([^/]+)/models/([^/]+)(?:/versions/([^/]+))?/?", text.strip())
    if found:
        return found.group(1), found.group(2), found.group(3) or ""
    name, _, version = text.partition(":")
    return REGISTRY, name, version


class WorkspaceBackend:
    """What both Azure ML backends share: the workspace's and the registry's clients, the base
    model's preflight checks, quotas, job status and metrics, and managed online endpoints."""

    splits_traffic = True  # a managed online endpoint splits its requests between its deployments

    def __init__(self, settings: Settings, transport: Any = None, credential: Any = None) -> None:
        self.settings = settings
        self.workspace_settings: Workspace = workspace_settings(settings, Workspace)
        self._transport = transport  # tests pass a fake HTTP transport; None is the real network
        self._credential = credential
        self._registries: dict[str, MLClient] = {}

    @contextmanager
    def prepared_location(self, run_id: str) -> Iterator[str]:
        """The workspace's datastore on the `prepared` container: nothing moves at submit time."""
        yield prepared_uri(self.workspace_settings.datastore, run_id)

    # Clients: created on first use and reused.
    def client_options(self) -> dict[str, Any]:
        return {"transport": self._transport} if self._transport is not None else {}

    @cached_property
    def credential(self) -> Any:
        if self._credential is not None:
            return self._credential
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential(managed_identity_client_id=self.settings.managed_identity_client_id)

    @cached_property
    def workspace(self) -> MLClient:
        from azure.ai.ml import MLClient

        ws = self.workspace_settings
        return MLClient(self.credential, ws.subscription_id, ws.resource_group, ws.workspace_name,
                        **self.client_options())  # fmt: skip

    @cached_property
    def registry(self) -> MLClient:
        return self.registry_client(REGISTRY)

    def registry_client(self, name: str) -> MLClient:
        """A client of one model registry (`azureml`, or a partner's such as `azureml-mistral`)."""
        from azure.ai.ml import MLClient

        if name not in self._registries:
            self._registries[name] = MLClient(self.credential, registry_name=name, **self.client_options())
        return self._registries[name]

    # Preflight: every refusal happens before anything is created.
    def _registry_model(self, name: str, version: str, registry: str = REGISTRY) -> RegistryModel:
        # The raw body: the SDK's Model drops the archived flag and the system metadata. `_get`
        # is the GET that `models.get` itself makes (one registry versioned-asset request).
        return RegistryModel.from_rest(self.registry_client(registry).models._get(name, version).as_dict())

    def _latest_version(self, name: str, registry: str = REGISTRY) -> str:
        """The registry's `latest` label: the newest active version. A model with none (missing,
        or every version archived) raises ValidationException, not ResourceNotFoundError."""
        return str(self.registry_client(registry).models.get(name, label="latest").version)

    def base_model(self) -> RegistryModel:
        """BASE_MODEL, found in its registry (its version pinned: the newest active one when none
        is given) and checked."""
        from azure.ai.ml.exceptions import MlException
        from azure.core.exceptions import ResourceNotFoundError

        registry, name, version = parse_base_model(self.settings.base_model)
        if name.lower() == DISCOVER_BASE_MODEL:
            model = self._newest_finetunable_chat_model()
        else:
            try:
                model = self._registry_model(name, version or self._latest_version(name, registry), registry)
            except (ResourceNotFoundError, MlException) as error:
                which = f"{name}:{version}" if version else f"{name} has no active version (missing or archived) and"
                raise PreflightError(
                    f"base model {which} is not in the {registry} registry: set BASE_MODEL ({service_message(error)})"
                ) from None
        check_model(model, datetime.now(UTC))
        return model

    def _newest_finetunable_chat_model(self) -> RegistryModel:
        """BASE_MODEL=auto: the newest Phi chat model the registry offers for fine-tuning. Ties on
        the Phi generation are broken by model version, then creation date; never by name."""
        from azure.ai.ml.exceptions import MlException
        from azure.core.exceptions import ResourceNotFoundError

        candidates = []
        for container in self.registry.models.list():
            generation = re.match(r"^Phi-(\d+(?:\.\d+)?)(?:-|$)", container.name or "")
            if not generation:
                continue
            try:
                model = self._registry_model(container.name, self._latest_version(container.name))
                check_model(model, datetime.now(UTC))
            except (ResourceNotFoundError, MlException, PreflightError):
                continue
            tasks = model.finetune_tasks() or model.inference_tasks() or []
            if CHAT_TASK not in {task.lower() for task in tasks} or model.allowed_computes("finetune")[0] is None:
                continue
            candidates.append(((float(generation.group(1)), _version_order(model.version), model.created_at), model))
        if not candidates:
            raise PreflightError(f"no fine-tunable Phi chat model found in the {REGISTRY} registry: set BASE_MODEL")
        candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        tied = [model.label for order, model in candidates if order == candidates[0][0]]
        if len(tied) > 1:
            raise PreflightError(f"BASE_MODEL=auto cannot choose between {', '.join(tied)}: set BASE_MODEL")
        return candidates[0][1]

    @cached_property
    def vm_sizes(self) -> list[Any]:
        """The VM sizes of the workspace's region (GPUs, vCPUs, quota family), read once."""
        return list(self.workspace.compute.list_sizes(location=self.region))

    def gpus_of(self, vm_size: str) -> int:
        """The GPUs of one VM of `vm_size`, from the region's list; refused when it has none."""
        sizes = self.vm_sizes
        for size in sizes:
            if (size.name or "").lower() == vm_size.lower():
                if not size.gpus:
                    raise PreflightError(f"VM size {vm_size} has no GPU: fine-tuning needs one")
                return int(size.gpus)
        names = ", ".join(sorted(size.name for size in sizes if size.gpus))
        raise PreflightError(f"VM size {vm_size} is not in the workspace's list of sizes (GPU sizes: {names})")

    @cached_property
    def workspace_facts(self) -> Any:
        """The workspace itself (its region, id, MLflow tracking URI), read once."""
        return self.workspace.workspaces.get(self.workspace_settings.workspace_name)

    @cached_property
    def region(self) -> str:
        return str(self.workspace_facts.location)

    def check_quota(self, purpose: str, vm_size: str, vcpus_needed: Callable[[int], int]) -> str | None:
        """Refuse (PreflightError) when the VM family's free vCPU quota in the workspace's region
        is short of `vcpus_needed(vCPUs of one node)`; a note when the service does not say."""
        facts = quota.size_facts(self.vm_sizes, vm_size)
        if facts is None:
            return f"the quota for {vm_size} was not checked: the workspace's VM size list gives no family for it"
        vcpus, family = facts
        usages = quota.dedicated_usages(list(self.workspace.compute.list_usage(location=self.region)), family)
        if not usages:
            return f"the quota for {family} was not checked: the usage API reports none in {self.region}"
        refused = quota.refusal(purpose, vm_size, vcpus_needed(vcpus), family, self.region, usages)
        if refused:
            raise PreflightError(refused)
        return None

    def estimate_on(self, training_tokens: int, parameters: Mapping[str, Any], model_name: str, vm_size: str,
                    gpus: int, region: str | None) -> Estimate:  # fmt: skip
        """The estimate from facts given (the dry run's): no call to the workspace. Without a
        region, prices come from the settings' table."""
        book = price_book(self.settings.prices)
        instance_type = self.workspace_settings.instance_type
        hosting = Hosting(instance_type, DEPLOYMENT_INSTANCES, book.hourly(instance_type, region),
                          idle_teardown_hours(self.settings))  # fmt: skip
        lora = bool(parameters.get("apply_lora", True))
        return gpu_training(training_tokens, model_name, vm_size, gpus, lora, book.hourly(vm_size, region), hosting)

    def tokenizer(self) -> None:
        """None: the app in Azure has no tokenizer library (it never trains), so its token counts
        are estimates; `prepare --tokenizer` counts exactly on a machine that has the tokenizer."""
        return None

    def _input_uri(self, prepared: str, name: str) -> str:
        # Jobs read inputs with the compute cluster's identity, through an identity-based
        # datastore; https:// inputs are for public servers only.
        if not prepared.startswith("azureml://datastores/"):
            raise BackendError(f"prepared data must be an azureml://datastores/ URI, not {prepared!r}")
        return f"{prepared.rstrip('/')}/{name}"

    def completed_job(self, job_name: str) -> Any:
        """The job, which must have completed: only then has it a model."""
        job = self.workspace.jobs.get(job_name)
        if JobStatus.parse(enum_text(job.status)) != JobStatus.COMPLETED:
            raise BackendError(f"job {job_name} is {enum_text(job.status)}; only a Completed job has a model")
        return job

    def submit_once(self, job_name: str, build: Callable[[], tuple[Any, Sequence[str]]]) -> JobReport:
        """The job of that name if it was submitted already (a redelivered upload finds it), else
        the job `build` makes after its checks, created, with what the checks noted."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._status(self.workspace.jobs.get(job_name))
        except ResourceNotFoundError:
            pass
        job, notes = build()
        return replace(self._status(self.workspace.jobs.create_or_update(job)), notes=tuple(notes))

    def _status(self, job: Any) -> JobReport:
        # A status this app does not know yet is taken as still running: the janitor asks again.
        status = JobStatus.parse(enum_text(job.status) or JobStatus.NOT_STARTED) or JobStatus.RUNNING
        reason = None
        if status in (JobStatus.FAILED, JobStatus.CANCELED):
            reason = f"Azure ML job {job.name} {status.lower()}: see {job.studio_url or 'Azure ML studio'}"
        return JobReport(job.name, status, reason)

    @service_errors("reading a job's status")
    def job_status(self, job_name: str) -> JobReport:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._status(self.workspace.jobs.get(job_name))
        except ResourceNotFoundError:
            raise BackendError(f"no Azure ML job {job_name!r}") from None

    @service_errors("reading a job's metrics")
    def job_metrics(self, job_name: str) -> dict[str, Any]:
        """What the job's runs logged to MLflow (the fine-tune step's HF Trainer logs `loss`,
        `eval_loss`, `train_loss` and the like), read over the workspace's MLflow REST API: see
        `metrics_summary`. {} when the job's runs logged no metrics."""
        # A job's name is its MLflow run id; its run says which experiment to search.
        job_run = self._mlflow("GET", "runs/get", params={"run_id": job_name}).get("run") or {}
        experiment_id = (job_run.get("info") or {}).get("experiment_id")
        if not experiment_id:
            raise BackendError(f"Azure ML's MLflow API answered no run for job {job_name!r}")
        search = {
            "experiment_ids": [experiment_id],
            # Every run under the job, however deep: the fine-tune step is a step of the registry
            # pipeline component, whose own run may sit in between (azureml-examples' fine-tune
            # notebooks find their training run the same way).
            "filter": f"tags.mlflow.rootRunId = '{job_name}'",
            "max_results": MLFLOW_MAX_RUNS,
        }
        runs = self._mlflow("POST", "runs/search", json=search).get("runs") or []
        return metrics_summary([job_run, *runs])

    @cached_property
    def _mlflow_url(self) -> str:
        """The workspace's MLflow tracking server over https. Its tracking URI,
        `azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/.../workspaces/<name>`,
        names the host and path that azureml-mlflow sends the MLflow REST API to; it is read,
        not built, because a workspace behind a private link has another host."""
        name = self.workspace_settings.workspace_name
        tracking = urlparse(self.workspace_facts.mlflow_tracking_uri or "")
        if not tracking.netloc:
            raise BackendError(f"Azure ML workspace {name} names no MLflow tracking URI")
        return f"https://{tracking.netloc}{tracking.path.rstrip('/')}"

    def _mlflow(self, method: str, api: str, **request: Any) -> dict[str, Any]:
        """One call to the MLflow REST API (with an Azure Resource Manager token: the scope
        azureml-mlflow asks for)."""
        return self.management_request(method, f"{self._mlflow_url}/{MLFLOW_API}/{api}", **request)

    def management_request(self, method: str, url: str, **request: Any) -> dict[str, Any]:
        """One REST call with an Azure Resource Manager token; its JSON answer ({} when none)."""
        from azure.core import PipelineClient
        from azure.core.pipeline.policies import BearerTokenCredentialPolicy
        from azure.core.rest import HttpRequest

        policy = BearerTokenCredentialPolicy(self.credential, MANAGEMENT_SCOPE)
        client = PipelineClient(base_url=url, per_call_policies=[policy], **self.client_options())
        response = client.send_request(HttpRequest(method, url, **request))
        response.raise_for_status()
        return dict(response.json() or {})

    @service_errors("deployment")
    def deploy(self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]) -> None:
        """Start what is missing (the endpoint, then `deployment` at 0% traffic) and return at
        once; call again (the janitor does) to move it on."""
        from azure.ai.ml.entities import ManagedOnlineEndpoint
        from azure.core.exceptions import ResourceNotFoundError

        try:
            found = self.workspace.online_endpoints.get(endpoint)
        except ResourceNotFoundError:
            self._check_deployment_fits(model)
            self.workspace.online_endpoints.begin_create_or_update(
                ManagedOnlineEndpoint(name=endpoint, auth_mode="key", tags={MANAGED_BY_TAG: MANAGED_BY, **tags})
            )
            return
        if enum_text(found.provisioning_state).lower() != "succeeded":
            return
        existing = {d.name for d in self.workspace.online_deployments.list(endpoint_name=endpoint)}
        if deployment in existing:
            return
        if existing:  # a new version beside those already there: the endpoint's check covered its first only
            self._check_deployment_fits(model)
        self.workspace.online_deployments.begin_create_or_update(self._deployment(model, endpoint, deployment, tags))

    def _check_deployment_fits(self, model: ModelRef) -> None:
        """Refuse, before anything is created, a deployment VM size off the base model's
        allow-list (checked at submission too, but the setting may have changed since) or short
        of quota."""
        instance_type = self.workspace_settings.instance_type
        registered = self.workspace.models.get(model.name, version=model.version)
        # Our lineage tags are on the model when this app registered it, else on the job that did.
        tags = dict(registered.tags or {})
        if BASE_MODEL_TAG not in tags and registered.job_name:
            tags = dict(self.workspace.jobs.get(registered.job_name).tags or {})
        base_name, _, base_version = tags.get(BASE_MODEL_TAG, ":").partition(":")
        registry = parse_base_model(tags.get(BASE_MODEL_ID_TAG) or base_name)[0]
        if base_name:
            check_vm_size(self._registry_model(base_name, base_version, registry), instance_type, "inference")
        need = partial(quota.deployment_need, instance_type, instances=DEPLOYMENT_INSTANCES)
        note = self.check_quota("the endpoint's deployment", instance_type, need)
        if note:
            log.warning("%s", note)

    def _deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]
    ) -> ManagedOnlineDeployment:
        from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

        timeout_ms = min(self.settings.endpoint_request_timeout_s, 180) * 1000
        return ManagedOnlineDeployment(
            name=deployment,
            endpoint_name=endpoint,
            model=f"azureml:{model.name}:{model.version}",
            instance_type=self.workspace_settings.instance_type,
            instance_count=DEPLOYMENT_INSTANCES,
            liveness_probe=ProbeSettings(initial_delay=LIVENESS_INITIAL_DELAY_S),
            request_settings=OnlineRequestSettings(request_timeout_ms=timeout_ms),
            tags={MANAGED_BY_TAG: MANAGED_BY, **tags},
        )

    @service_errors("deployment")
    def continue_deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]
    ) -> DeployProgress:
        """Create what is still missing, never waiting, and say where `deployment` stands: READY
        once it has succeeded (at 0% traffic, only the `azureml-model-deployment` header reaches
        it), FAILED with its last log lines when it failed (the flow records that and deletes it,
        never this call)."""
        from azure.core.exceptions import ResourceNotFoundError

        self.deploy(model, endpoint, deployment, tags)
        try:
            found = self.workspace.online_deployments.get(deployment, endpoint_name=endpoint)
        except ResourceNotFoundError:  # its endpoint is not ready for it yet
            return DeployProgress(DeployState.DEPLOYING)
        state = enum_text(found.provisioning_state).lower()
        if state == "failed":
            logs = self._deployment_logs(endpoint, deployment)
            return DeployProgress(DeployState.FAILED, f"deployment {deployment} of {endpoint} failed: {logs}")
        return DeployProgress(DeployState.READY if state == "succeeded" else DeployState.DEPLOYING)

    def _deployment_logs(self, endpoint: str, deployment: str) -> str:
        try:
            logs = self.workspace.online_deployments.get_logs(deployment, endpoint, lines=20)
        except Exception as error:  # the logs are a courtesy; the failure itself is what matters
            return f"no logs ({type(error).__name__})"
        return " ".join(str(logs).split())[-500:] or "no logs"

    @service_errors("routing traffic")
    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> None:
        """Route `split` (the service refuses one it cannot route) and name in the endpoint's
        description the model that the largest share reaches."""
        found = self.workspace.online_endpoints.get(endpoint)
        # The PUT replaces the whole map, so every deployment left out gets 0% (the SDK sends no
        # 0% entries either: the safe-rollout sample's {"blue": 0, "green": 100} goes as {"green": 100}).
        found.traffic = dict(split)
        serving = [name for name, percent in sorted(split.items()) if percent > 0]
        top = max(serving, key=lambda name: split[name], default=None)
        models = {d.name: d.model for d in self.workspace.online_deployments.list(endpoint_name=endpoint)}
        model = model_of_id(models.get(top)) if top else None
        found.description = f"{model.name}:{model.version}" if model else ""
        self.workspace.online_endpoints.begin_create_or_update(found)

    @service_errors("deleting a deployment")
    def delete_deployment(self, endpoint: str, deployment: str) -> bool:
        """Start the deletion and return (it takes minutes); the service refuses it while the
        deployment takes traffic."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self.workspace.online_deployments.begin_delete(name=deployment, endpoint_name=endpoint)
        except ResourceNotFoundError:
            return False
        return True

    def held_out_losses(self, models: Sequence[ModelRef | None], test_file: str) -> None:
        """None: the app has no GPU at hand to compute them; the flow uses the eval_loss the
        fine-tuning jobs logged."""
        return None

    @service_errors("reading an endpoint")
    def endpoint(self, name: str) -> Endpoint:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            found = self.workspace.online_endpoints.get(name)
        except ResourceNotFoundError:
            raise BackendError(f"no Azure ML endpoint {name!r}") from None
        return self._endpoint(found, last_request_at=None)

    def _endpoint(self, found: Any, last_request_at: str | None) -> Endpoint:
        model_label = (found.description or "").partition(":")
        return Endpoint(
            name=found.name,
            state=enum_text(found.provisioning_state),
            scoring_uri=found.scoring_uri,
            model=ModelRef(model_label[0], model_label[2]) if model_label[1] else None,
            created_at=str((found.properties or {}).get("createdAt", "")),
            last_request_at=last_request_at,
            tags=dict(found.tags or {}),
            traffic={name: int(percent) for name, percent in (found.traffic or {}).items()},
        )

    @service_errors("reading endpoint keys")
    def keys(self, endpoint: str) -> dict[str, str]:
        keys = self.workspace.online_endpoints.get_keys(endpoint)
        return {"primary_key": keys.primary_key, "secondary_key": keys.secondary_key}

    @service_errors("scoring")
    def invoke(self, endpoint: str, body: dict[str, Any], deployment: str | None = None) -> dict[str, Any]:
        status, text = self.score(endpoint, deployment, body)
        if status != 200:
            raise BackendError(f"endpoint {endpoint} answered {status or 'nothing'}: {smoke.excerpt(text)}")
        try:
            reply = json.loads(text)
        except ValueError:
            return {"output": text}
        answer = smoke.reply_text(reply)
        return {"output": answer if answer is not None else reply}

    @service_errors("scoring")
    def score(self, endpoint: str, deployment: str | None, body: dict[str, Any]) -> tuple[int | None, str]:
        """POST to the scoring URI with our own HTTP call (`online_endpoints.invoke` takes only
        files and leaks headers between calls in a long-lived process), to `deployment` whatever
        the traffic split when given: (status, body), or (None, why) when no answer came."""
        found = self.workspace.online_endpoints.get(endpoint)
        headers = {"Authorization": f"Bearer {self.keys(endpoint)['primary_key']}"}
        if deployment:
            headers[DEPLOYMENT_HEADER] = deployment
        return self.post_json(found.scoring_uri, headers, body)

    def post_json(self, url: str, headers: Mapping[str, str], body: dict[str, Any]) -> tuple[int | None, str]:
        """POST `body` as JSON: (status, body), or (None, why) when no answer came."""
        from azure.core import PipelineClient
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
        from azure.core.rest import HttpRequest

        client = PipelineClient(base_url=url, **self.client_options())
        sent = {**headers, "Content-Type": "application/json"}
        try:
            response = client.send_request(HttpRequest("POST", url, headers=sent, json=body))
            return response.status_code, response.text()
        except (ServiceRequestError, ServiceResponseError, HttpResponseError) as error:
            return None, f"{type(error).__name__}: {service_message(error)}"

    @service_errors("listing endpoints")
    def list_endpoints(self) -> list[Endpoint]:
        managed = [
            e for e in self.workspace.online_endpoints.list() if (e.tags or {}).get(MANAGED_BY_TAG) == MANAGED_BY
        ]
        return [self._endpoint(found, self.last_request_at(found.id)) for found in managed]

    def last_request_at(
        self,
        resource_id: str,
        metric: str = "RequestsPerMinute",
        namespace: str = ENDPOINT_METRICS_NAMESPACE,
        window: timedelta = timedelta(days=7),
    ) -> str | None:
        """The start of the last minute with a request, from a request-count metric of the
        resource (queried over REST: azure-monitor-query 2.x dropped MetricsQueryClient)."""
        end = datetime.now(UTC).replace(microsecond=0)
        query = {
            "api-version": METRICS_API_VERSION,
            "metricnames": metric,
            "metricnamespace": namespace,
            "timespan": f"{(end - window).isoformat()}/{end.isoformat()}",
            "interval": "PT1M",
            "aggregation": "Total",
        }
        url = f"https://management.azure.com{resource_id}/providers/microsoft.insights/metrics"
        last = None
        for metric_series in self.management_request("GET", url, params=query).get("value", []):
            for series in metric_series.get("timeseries", []):
                for point in series.get("data", []):
                    if point.get("total"):  # grains without traffic come back as None, not 0
                        last = max(last or point["timeStamp"], point["timeStamp"])
        return last

    @service_errors("deleting an endpoint")
    def delete_endpoint(self, name: str) -> bool:
        """Start the deletion and return: it takes minutes, and the endpoint stops billing."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self.workspace.online_endpoints.begin_delete(name)
        except ResourceNotFoundError:
            return False
        return True


def put_body(job: Any) -> dict[str, Any]:
    """The body the SDK PUTs for `job` (its name goes in the URL: PUT .../jobs/{name})."""
    body: dict[str, Any] = job._to_rest_object().as_dict()
    body.pop("name", None)
    return body


def metrics_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The value of each metric logged last across a job's MLflow runs (MLflow answers only the
    latest of each metric of a run), and the summary the flow reads, as the local trainer writes it:
    `train_loss` (HF Trainer's mean over the run, else its last `loss`), `perplexity` from
    `eval_loss`, `steps` (the step of the last training loss). {} when no run logged a metric."""
    logged = [metric for run in runs for metric in (run.get("data") or {}).get("metrics") or []]
    # MLflow's own server writes int64 fields (timestamp, step) as JSON numbers; proto3 JSON, as strings.
    logged.sort(key=lambda metric: (int(metric.get("timestamp", 0)), int(metric.get("step", 0))))
    latest = {metric["key"]: metric for metric in logged}
    summary: dict[str, Any] = {key: float(metric["value"]) for key, metric in latest.items()}
    losses = [latest[key] for key in TRAINING_LOSSES if key in latest]
    if losses:
        summary["train_loss"] = float(losses[0]["value"])
        steps = max(int(metric.get("step", 0)) for metric in losses)
        if steps:
            summary["steps"] = steps
    if "eval_loss" in summary:
        summary["perplexity"] = math.exp(min(summary["eval_loss"], 50))
    return summary


def model_of_id(model_id: str | None) -> ModelRef | None:
    """The model a deployment serves, from its `model` field: `azureml:name:version` as we send
    it, or the ARM id `.../models/<name>/versions/<version>` the service answers with."""
    found = re.fullmatch(r"azureml:([^:/]+):([^:/]+)", model_id or "") or re.search(
        r"/models/([^/]+)/versions/([^/]+)$", model_id or ""
    )
    return ModelRef(found.group(1), found.group(2)) if found else None


def enum_text(value: Any) -> str:
    """The SDK's string enums (EndpointProvisioningState.SUCCEEDED) as the service spells them."""
    return str(getattr(value, "value", value) or "")
