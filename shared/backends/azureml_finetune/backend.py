"""The `azureml-finetune` backend: Azure ML's own fine-tuning job (job type `FineTuning`, built by
azure-ai-ml's experimental `create_finetuning_job`), serverless or on managed compute. The service
registers the trained model (the job's `registered_model` output); serverless training deploys it
to serverless endpoints (`serverless.py`), managed compute to the managed online endpoints both
Azure ML backends share (`WorkspaceBackend`).

What settles each shape: the SDK's own code (azure-ai-ml 1.35.2, pinned: the feature is
experimental), azure-rest-api-specs (machinelearningservices 2024-10-01-preview, `FineTuningJob`,
the api-version the SDK sends it with) and azureml-examples' fine-tuning notebooks
(sdk/python/jobs/finetuning/standalone/model-as-a-service and model-as-a-platform)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.backends.azureml.settings import workspace_settings
from shared.backends.azureml.workspace import (
    PreflightError,
    WorkspaceBackend,
    check_vm_size,
    model_uri,
    parse_base_model,
    put_body,
    service_errors,
)
from shared.backends.azureml_finetune.marketplace import subscribe
from shared.backends.azureml_finetune.serverless import ServerlessEndpoints
from shared.backends.azureml_finetune.settings import FineTuneWorkspace
from shared.backends.interface import (
    BackendError,
    DeployProgress,
    DeployState,
    Endpoint,
    JobReport,
    JobRequest,
    ModelRef,
    TransientBackendError,
    model_name_for,
)
from shared.costs.estimate import Estimate
from shared.training import DEFAULTS
from shared.vocabulary import (
    BASE_MODEL_ID_TAG,
    BASE_MODEL_TAG,
    DATASET_TAG,
    MANAGED_BY,
    MANAGED_BY_TAG,
    RUN_ID_TAG,
    TEST_FILE,
    TRAIN_FILE,
)

if TYPE_CHECKING:
    from shared.backends.azureml.registry_model import RegistryModel
    from shared.settings import Settings

log = logging.getLogger(__name__)
# azure-ai-ml warns on every use of its experimental fine-tuning classes; the app pins the version
# it was built against (requirements.txt), so the warning tells whoever reads the logs nothing.
logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
# The hyperparameters every official sample of the fine-tuning job passes (azureml-examples
# notebooks and CLI jobs under jobs/finetuning/standalone), as strings; no source lists others,
# so any other training parameter is refused by name rather than sent to be ignored or refused
# hours later.
HYPERPARAMETERS = ("num_train_epochs", "per_device_train_batch_size", "learning_rate")
OUTPUT = "registered_model"  # the job's output the service registers as a model
SERVERLESS_OPTION = "ServerlessMaaS"  # system metadata deploymentOptions: served from serverless endpoints
# Where the registry says nothing: the regions Foundry's docs list for serverless fine-tuning
# (MicrosoftDocs/azure-ai-docs, articles/ai-foundry/includes/region-availability-maas.md, column
# "Hub/Project Region for Fine tuning", November 2025), by model name.
_US_SIX = ("eastus", "eastus2", "northcentralus", "southcentralus", "westus", "westus3")
DOCUMENTED_SERVERLESS_REGIONS: Mapping[str, tuple[str, ...]] = {
    **dict.fromkeys(("Phi-4", "Phi-4-mini-instruct", "Phi-4-multimodal-instruct", "Mistral-Nemo", "Ministral-3B",
                     "Mistral-Large-2411", "tsuzumi-7b"), _US_SIX),
    **dict.fromkeys(("Meta-Llama-3.1-8B-Instruct", "Llama-3.2-11B-Vision-Instruct", "Llama-3.2-90B-Vision-Instruct",
                     "Llama-3.3-70B-Instruct"), ("westus3",)),
}  # fmt: skip
# How long a submission waits for a new marketplace subscription (usually seconds) before it is
# refused with the reason.
SUBSCRIBE_WAIT_S = 60


@dataclass(frozen=True)
class FineTunePlan:
    """What a submission will use, decided by the preflight checks (a dry run's: BASE_MODEL as
    given, unchecked)."""

    registry: str
    model_name: str
    model_version: str  # pinned
    hyperparameters: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return model_uri(self.model_name, self.model_version, self.registry)


def hyperparameters(overrides: Mapping[str, Any]) -> dict[str, str]:
    """Our training defaults for the job's hyperparameters, then the upload's overrides, as the
    strings the job takes; an override it does not take is refused, naming it."""
    refused = sorted(set(overrides) - set(HYPERPARAMETERS))
    if refused:
        raise PreflightError(
            f"the fine-tuning job does not take {', '.join(refused)}: it takes {', '.join(HYPERPARAMETERS)} "
            "(or use ML_BACKEND=azureml, whose pipeline takes them)"
        )
    merged = {name: overrides.get(name, DEFAULTS[name]) for name in HYPERPARAMETERS}
    return {name: str(value) for name, value in merged.items()}


def output_model_name(base_model: str, dataset: str, job_name: str) -> str:
    """The name the job registers its model under: `{base}-{dataset}`, as the pipeline backend's
    models, and the job's digest, so each job's model has a name of its own (the service numbers
    the versions of a name; the examples take version 1 of a fresh one)."""
    return f"{model_name_for(base_model, dataset)[:200]}-{job_name.rsplit('-', 1)[-1]}"


def check_serverless(model: RegistryModel, region: str) -> str | None:
    """Refuse a model the catalog does not offer serverless, or not in the workspace's region;
    a note when the registry does not say where."""
    options = model.deployment_options()
    if options is not None and SERVERLESS_OPTION.lower() not in {option.lower() for option in options}:
        raise PreflightError(
            f"base model {model.label} is not offered for serverless fine-tuning (its deployment options: "
            f"{', '.join(options)}): set AZUREML_FINETUNE_COMPUTE to a VM size, or choose another BASE_MODEL"
        )
    regions, source = model.serverless_finetune_regions()
    if regions is None and model.name.lower() in {name.lower() for name in DOCUMENTED_SERVERLESS_REGIONS}:
        documented = {name.lower(): listed for name, listed in DOCUMENTED_SERVERLESS_REGIONS.items()}
        regions, source = list(documented[model.name.lower()]), "Foundry's documented regions; the registry names none"
    if regions is None:
        return f"{model.label} names no serverless fine-tuning regions ({source} are missing): {region} was not checked"
    if region.lower() not in {name.lower() for name in regions}:
        raise PreflightError(
            f"base model {model.label} is fine-tuned serverless only in {', '.join(regions)} ({source}), not in the "
            f"workspace's region {region}: use a workspace there, or set AZUREML_FINETUNE_COMPUTE to a VM size"
        )
    return None


class FineTuneBackend(WorkspaceBackend):
    workspace_settings: FineTuneWorkspace

    def __init__(self, settings: Settings, transport: Any = None, credential: Any = None) -> None:
        super().__init__(settings, transport, credential)
        self.workspace_settings = workspace_settings(settings, FineTuneWorkspace)
        # Serverless training serves from serverless endpoints: one model each, no split.
        self.serverless = ServerlessEndpoints(self) if self.workspace_settings.serverless else None
        self.splits_traffic = self.serverless is None

    # Preflight and submission.
    def plan(self, parameters: Mapping[str, Any]) -> FineTunePlan:
        """Every check before a submission: the base model (its version pinned), where it can
        train (serverless: offered so in the workspace's region; managed compute: both VM sizes on
        its allow-lists, the training size's vCPU quota), the hyperparameters."""
        chosen = hyperparameters(parameters)
        model = self.base_model()
        ws = self.workspace_settings
        base_model_id = model.id.rsplit("/versions/", 1)[0]
        if ws.serverless:
            notes = [check_serverless(model, self.region)]
            subscribed = subscribe(self.workspace, base_model_id, wait_s=SUBSCRIBE_WAIT_S)
            if subscribed.state != DeployState.READY:
                raise PreflightError(f"{subscribed.message or 'subscribing to ' + base_model_id}: the workspace must "
                                     "be subscribed to the model's Azure Marketplace offer before it is fine-tuned "
                                     "serverless; upload again once it is")  # fmt: skip
        else:
            notes = [
                check_vm_size(model, ws.training_compute, "finetune"),
                check_vm_size(model, ws.instance_type, "inference"),
                self.check_quota("the fine-tune", ws.training_compute, lambda vcpus: vcpus),
            ]
        registry = parse_base_model(self.settings.base_model)[0]
        kept = [note for note in notes if note]
        for note in kept:
            log.warning("%s", note)
        return FineTunePlan(registry, model.name, model.version, chosen, kept)

    def build_job(self, request: JobRequest, plan: FineTunePlan) -> Any:
        """The fine-tuning job, by the SDK's own builder. Its inputs are plain URI strings (it
        wraps them in Input itself; an Input given is wrapped again into a broken URI), and the
        validation data is always given (without it, 1.35's builder raises UnboundLocalError)."""
        from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

        registry, name, version = plan.registry, plan.model_name, plan.model_version
        ws = self.workspace_settings
        tags = {
            MANAGED_BY_TAG: MANAGED_BY,
            BASE_MODEL_TAG: f"{name}:{version}",
            BASE_MODEL_ID_TAG: f"azureml://registries/{registry}/models/{name}",
            DATASET_TAG: request.dataset,
            **request.tags,
        }
        instance_types = None if ws.serverless else [ws.training_compute]  # serverless: no compute at all
        try:
            return create_finetuning_job(
                model=plan.model_id,
                task=FineTuningTaskType.CHAT_COMPLETION,
                training_data=self._input_uri(request.prepared, TRAIN_FILE),
                validation_data=self._input_uri(request.prepared, TEST_FILE),
                hyperparameters=plan.hyperparameters,
                output_model_name_prefix=output_model_name(name, request.dataset, request.job_name),
                name=request.job_name,
                display_name=f"{name}-{request.dataset}-{'serverless' if ws.serverless else ws.training_compute}",
                experiment_name=ws.experiment_name,
                description=f"Fine-tune {name}:{version} on {request.dataset}",
                tags=tags,
                instance_types=instance_types,
            )
        except BackendError:
            raise
        except Exception as error:  # the builder is experimental: its failures are recorded, not raised raw
            raise BackendError(
                f"azure-ai-ml could not build the fine-tuning job: {type(error).__name__}: {error}"
            ) from None

    def dry_run(self, request: JobRequest) -> dict[str, Any]:
        """The job body the SDK would PUT, with no network: the model is BASE_MODEL as given, and
        must name its version (a submission pins the newest, which only the registry knows)."""
        registry, name, version = parse_base_model(self.settings.base_model)
        if not version or name.lower() == "auto":
            raise BackendError(
                "a dry run needs BASE_MODEL with its version (name:version, or "
                "azureml://registries/<registry>/models/<name>/versions/<version>): it cannot ask the registry"
            )
        plan = FineTunePlan(registry, name, version, hyperparameters(request.parameters))
        return put_body(self.build_job(request, plan))

    @service_errors("submission")
    def submit(self, request: JobRequest, restart: bool = False) -> JobReport:
        def build() -> tuple[Any, list[str]]:
            plan = self.plan(request.parameters)
            return self.build_job(request, plan), plan.notes

        return self.submit_once(request.job_name, build)

    @service_errors("estimating the cost")
    def estimate(self, training_tokens: int, parameters: Mapping[str, Any]) -> Estimate:
        ws = self.workspace_settings
        model = self.base_model()
        if ws.serverless:
            basis = {
                "training_tokens": training_tokens,
                "base_model": model.name,
                "billing": "serverless: per training token, and per hour for each fine-tuned model deployed",
                "unknown": "the per-token price of serverless fine-tuning is the model offer's, which this app "
                "does not read (see the model's Pricing and terms in Azure AI Foundry)",
            }
            return Estimate(None, None, basis=basis)
        gpus = self.gpus_of(ws.training_compute)
        return self.estimate_on(training_tokens, {}, model.name, ws.training_compute, gpus, self.region)  # LoRA

    # Registration: the service's.
    @service_errors("registration")
    def register(self, job_name: str) -> ModelRef:
        """The model the job registered (its `registered_model` output): the version of that name
        made by this job, or its only one. Nothing is registered a second time."""
        job = self.completed_job(job_name)
        output = (job.outputs or {}).get(OUTPUT)
        name = getattr(output, "name", None)
        if not name:
            raise BackendError(f"job {job_name} names no {OUTPUT} output: it registered no model")
        versions = list(self.workspace.models.list(name=name))
        made = [model for model in versions if getattr(model, "job_name", None) == job_name]
        candidates = made or (versions if len(versions) == 1 else [])
        if not candidates:
            # The service registers the model as the job ends; its event may come first.
            raise TransientBackendError(f"job {job_name}'s model {name} is not registered yet")
        newest = max(candidates, key=lambda model: [int(part) for part in re.findall(r"\d+", str(model.version))])
        return ModelRef(name, str(newest.version))

    # Endpoints: serverless ones for serverless training, else the managed online endpoints.
    def _base_model_id(self, tags: Mapping[str, str]) -> Callable[[], str]:
        """The base model of the run's job, read from the job's tags when asked (only before its
        serverless endpoint is made: a partner's model needs a marketplace subscription)."""
        from shared.backends.interface import job_name_for

        def read() -> str:
            job = self.workspace.jobs.get(job_name_for(tags.get(RUN_ID_TAG, "")))
            return str((job.tags or {}).get(BASE_MODEL_ID_TAG, ""))

        return read

    def deploy(self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]) -> None:
        if self.serverless is None:
            return super().deploy(model, endpoint, deployment, tags)
        self.serverless.deploy(model, endpoint, deployment, tags, self._base_model_id(tags))

    def continue_deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]
    ) -> DeployProgress:
        if self.serverless is None:
            return super().continue_deployment(model, endpoint, deployment, tags)
        return self.serverless.continue_deployment(model, endpoint, deployment, tags, self._base_model_id(tags))

    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> None:
        if self.serverless is None:
            return super().set_traffic(endpoint, split)
        return self.serverless.set_traffic(endpoint, split)

    def delete_deployment(self, endpoint: str, deployment: str) -> bool:
        if self.serverless is None:
            return super().delete_deployment(endpoint, deployment)
        return self.serverless.delete_deployment(endpoint, deployment)

    def endpoint(self, name: str) -> Endpoint:
        return super().endpoint(name) if self.serverless is None else self.serverless.endpoint(name)

    def keys(self, endpoint: str) -> dict[str, str]:
        return super().keys(endpoint) if self.serverless is None else self.serverless.keys(endpoint)

    def score(self, endpoint: str, deployment: str | None, body: dict[str, Any]) -> tuple[int | None, str]:
        if self.serverless is None:
            return super().score(endpoint, deployment, body)
        return self.serverless.score(endpoint, deployment, body)

    def list_endpoints(self) -> list[Endpoint]:
        return super().list_endpoints() if self.serverless is None else self.serverless.list_endpoints()

    def delete_endpoint(self, name: str) -> bool:
        return super().delete_endpoint(name) if self.serverless is None else self.serverless.delete_endpoint(name)
