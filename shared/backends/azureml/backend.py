"""The Azure ML backend: the walkthrough's registry pipeline `chat_completion_pipeline` on the
workspace's GPU cluster, with its traps fixed; the trained model is registered by this app, then
served from managed online endpoints (`WorkspaceBackend`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.backends.azureml.component import COMPONENT_NAME, OUTPUT, REGISTRY, ComponentInputError, merge_parameters
from shared.backends.azureml.settings import DISCOVER_BASE_MODEL, AzureMLWorkspace, workspace_settings
from shared.backends.azureml.workspace import (
    PreflightError,
    WorkspaceBackend,
    check_vm_size,
    enum_text,
    model_uri,
    put_body,
    service_errors,
)
from shared.backends.interface import BackendError, JobReport, JobRequest, ModelRef, model_description, model_name_for
from shared.costs.estimate import Estimate
from shared.vocabulary import (
    BASE_MODEL_TAG,
    DATASET_TAG,
    JOB_TAG,
    MANAGED_BY,
    MANAGED_BY_TAG,
    TEST_FILE,
    TRAIN_FILE,
)

if TYPE_CHECKING:
    from azure.ai.ml.entities import PipelineJob

    from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a submission will use, decided by the preflight checks."""

    model_id: str
    model_name: str
    model_version: str
    compute: str
    gpus_per_node: int
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def model_version_for(job_name: str) -> str:
    """A deterministic model version per job (Azure ML versions are strings; digits sort well)."""
    return str(int(hashlib.sha256(job_name.encode()).hexdigest()[:10], 16))


def display_name(model: str, parameters: dict[str, Any], gpus: int) -> str:
    """The walkthrough's rule: {model}-ultrachat-bs{B}-{scheduler}-{ds2|nods}-{lora|nolora}-save_limit{L}-seqlen{S}."""
    batch = (
        int(parameters.get("per_device_train_batch_size", 1))
        * int(parameters.get("gradient_accumulation_steps", 1))
        * gpus
        * int(parameters.get("num_nodes_finetune", 1))
    )
    deepspeed = f"ds{parameters.get('deepspeed_stage', 2)}" if parameters.get("apply_deepspeed") == "true" else "nods"
    lora = "lora" if parameters.get("apply_lora") == "true" else "nolora"
    return (
        f"{model}-ultrachat-bs{batch}-{parameters.get('lr_scheduler_type', 'linear')}-{deepspeed}-{lora}"
        f"-save_limit{parameters.get('save_total_limit', -1)}-seqlen{parameters.get('max_seq_length', -1)}"
    )


class AzureMLBackend(WorkspaceBackend):
    workspace_settings: AzureMLWorkspace

    def __init__(self, settings: Settings, transport: Any = None, credential: Any = None) -> None:
        super().__init__(settings, transport, credential)
        self.workspace_settings = workspace_settings(settings, AzureMLWorkspace)

    def gpus_per_node(self, vm_size: str) -> int:
        return self.workspace_settings.gpus_per_node or self.gpus_of(vm_size)

    def _cluster(self) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        cluster = self.workspace_settings.compute_cluster
        try:
            compute = self.workspace.compute.get(cluster)
        except ResourceNotFoundError:
            raise PreflightError(f"compute cluster {cluster} does not exist in the workspace") from None
        if enum_text(getattr(compute, "type", "")).lower() != "amlcompute":
            raise PreflightError(f"compute {cluster} is not an Azure ML compute cluster (AmlCompute)")
        if enum_text(compute.provisioning_state).lower() == "failed":
            raise PreflightError(f"compute cluster {cluster} is in a failed provisioning state: recreate it")
        return compute

    @service_errors("estimating the cost")
    def estimate(self, training_tokens: int, parameters: Mapping[str, Any]) -> Estimate:
        model = self.base_model()
        vm_size = self._cluster().size or ""
        gpus = self.gpus_per_node(vm_size)
        return self.estimate_on(training_tokens, parameters, model.name, vm_size, gpus, self.region)

    def plan(self, parameters: dict[str, Any]) -> Plan:
        """Every check before a submission: the base model, the cluster, both VM sizes against
        the model's allow-lists (the deployment's too: better refused before hours of training),
        the cluster's vCPU quota, the parameters against the component's inputs."""
        model = self.base_model()
        cluster = self.workspace_settings.compute_cluster
        compute = self._cluster()
        vm_size = compute.size or ""
        notes = [
            check_vm_size(model, vm_size, "finetune"),
            check_vm_size(model, self.workspace_settings.instance_type, "inference"),
        ]
        gpus = self.gpus_per_node(vm_size)
        if not (compute.min_instances or 0):  # a cluster that holds nodes already needs no new quota
            notes.append(self.check_quota("the fine-tune", vm_size, lambda vcpus: vcpus))
        try:
            merged, warnings = merge_parameters(model.model_specific_defaults(), parameters)
        except ComponentInputError as error:
            raise PreflightError(str(error)) from None
        warnings = [note for note in notes if note] + warnings
        for warning in warnings:
            log.warning("%s", warning)
        return Plan(model_uri(model.name, model.version), model.name, model.version, cluster, gpus, merged, warnings)

    # Submission.
    def _component_uri(self) -> str:
        version = self.workspace_settings.component_version
        suffix = f"versions/{version}" if version else "labels/latest"
        return f"azureml://registries/{REGISTRY}/components/{COMPONENT_NAME}/{suffix}"

    def build_job(self, request: JobRequest, plan: Plan) -> PipelineJob:
        from azure.ai.ml import Input, Output
        from azure.ai.ml.entities import PipelineJob
        from azure.ai.ml.entities._builders.pipeline import Pipeline

        inputs: dict[str, Any] = {
            "mlflow_model_path": Input(type="mlflow_model", path=plan.model_id),
            "train_file_path": Input(type="uri_file", path=self._input_uri(request.prepared, TRAIN_FILE)),
            "test_file_path": Input(type="uri_file", path=self._input_uri(request.prepared, TEST_FILE)),
            "compute_model_import": plan.compute,
            "compute_preprocess": plan.compute,
            "compute_finetune": plan.compute,
            "compute_model_evaluation": plan.compute,
            "number_of_gpu_to_use_finetuning": plan.gpus_per_node,
            "task_name": "ChatCompletion",
            **plan.parameters,
        }
        node = Pipeline(component=self._component_uri(), inputs=inputs,
                        outputs={OUTPUT: "${{parent.outputs.trained_model}}"})  # fmt: skip
        job = PipelineJob(
            name=request.job_name,
            display_name=display_name(plan.model_name, plan.parameters, plan.gpus_per_node),
            experiment_name=self.workspace_settings.experiment_name,
            description=f"Fine-tune {plan.model_name}:{plan.model_version} on {request.dataset}",
            jobs={COMPONENT_NAME: node},
            outputs={"trained_model": Output(type="mlflow_model")},
            tags={
                MANAGED_BY_TAG: MANAGED_BY,
                BASE_MODEL_TAG: f"{plan.model_name}:{plan.model_version}",
                DATASET_TAG: request.dataset,
                **request.tags,
            },
        )
        assert job.settings is not None  # PipelineJob always makes its settings
        job.settings.force_rerun = True
        job.settings.continue_on_step_failure = False
        return job

    def dry_run(self, request: JobRequest) -> dict[str, Any]:
        """The job body the SDK would PUT, with no network: the model comes from BASE_MODEL as
        given and the GPUs per node from AZUREML_GPUS_PER_NODE."""
        name, _, version = self.settings.base_model.partition(":")
        if name.lower() == DISCOVER_BASE_MODEL or not self.workspace_settings.gpus_per_node:
            raise BackendError(
                "a dry run needs BASE_MODEL (name[:version], not auto) and AZUREML_GPUS_PER_NODE: "
                "it cannot look them up"
            )
        model_id = model_uri(name, version)
        try:
            parameters, _ = merge_parameters(None, request.parameters)
        except ComponentInputError as error:
            raise PreflightError(str(error)) from None
        plan = Plan(model_id, name, version or "latest", self.workspace_settings.compute_cluster,
                    self.workspace_settings.gpus_per_node, parameters)  # fmt: skip
        return put_body(self.build_job(request, plan))

    @service_errors("submission")
    def submit(self, request: JobRequest, restart: bool = False) -> JobReport:
        def build() -> tuple[PipelineJob, list[str]]:
            plan = self.plan(request.parameters)
            return self.build_job(request, plan), plan.warnings

        return self.submit_once(request.job_name, build)

    # Registration and deployment.
    @service_errors("registration")
    def register(self, job_name: str) -> ModelRef:
        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model
        from azure.core.exceptions import ResourceNotFoundError

        job = self.completed_job(job_name)
        tags = dict(job.tags or {})
        base = tags.get(BASE_MODEL_TAG, "model").split(":", 1)[0]
        name, version = model_name_for(base, tags.get(DATASET_TAG, "chat")), model_version_for(job_name)
        try:
            existing = self.workspace.models.get(name, version=version)
            return ModelRef(existing.name, str(existing.version))
        except ResourceNotFoundError:
            pass
        model = Model(
            path=f"azureml://jobs/{job_name}/outputs/trained_model",
            type=AssetTypes.MLFLOW_MODEL,
            name=name,
            version=version,
            description=model_description(tags, job_name),
            tags={
                JOB_TAG: job_name,
                **{k: v for k, v in tags.items() if k != MANAGED_BY_TAG},
                MANAGED_BY_TAG: MANAGED_BY,
            },
        )
        registered = self.workspace.models.create_or_update(model)
        return ModelRef(registered.name, str(registered.version))
