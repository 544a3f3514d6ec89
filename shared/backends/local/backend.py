"""The local backend: trainer processes, MLflow's registry, local HTTP endpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.backends.interface import (
    BackendError,
    DeployProgress,
    DeployState,
    Endpoint,
    JobReport,
    JobRequest,
    ModelRef,
    model_name_for,
)
from shared.backends.local import endpoints, jobs, registry
from shared.backends.local.processes import REPO_ROOT
from shared.backends.local.settings import local_settings
from shared.costs.estimate import Estimate, Hosting, idle_teardown_hours, measured_training
from shared.costs.prices import HourlyPrice
from shared.storage import blob_service
from shared.training import PARAMETERS
from shared.vocabulary import (
    BASE_MODEL_TAG,
    DATASET_TAG,
    JOB_TAG,
    PREPARED_CONTAINER,
    TEST_FILE,
    TRAIN_FILE,
    JobStatus,
)

if TYPE_CHECKING:
    from shared.settings import Settings


_TRANSFORMERS_FIRST_USE = threading.Lock()
# Well inside the flow's claim on a run (15 min), so no second handler takes over a gate under way.
EVALUATION_TIMEOUT_S = 600


@dataclass(frozen=True)
class LocalBackend:
    settings: Settings
    splits_traffic = True  # the gateway splits an endpoint's requests between its deployments

    @property
    def data_dir(self) -> Path:
        return local_settings(self.settings).data_dir

    @contextmanager
    def prepared_location(self, run_id: str) -> Iterator[str]:
        """A download of the run's prepared files, which `submit` copies into its job."""
        service = blob_service(self.settings.storage)
        with tempfile.TemporaryDirectory(prefix="submit-") as folder:
            for name in (TRAIN_FILE, TEST_FILE):
                blob = service.get_blob_client(PREPARED_CONTAINER, f"{run_id}/{name}")
                with (Path(folder) / name).open("wb") as target:
                    blob.download_blob().readinto(target)
            yield folder

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def base_model(self) -> str:
        return self.settings.base_model

    def tokenizer(self) -> Any:
        from shared.backends.local.trainer import resolve_base_model

        # transformers resolves its names lazily, and not thread-safely: concurrent first uses
        # (uploads handled at once) could see "cannot import name 'AutoTokenizer'".
        with _TRANSFORMERS_FIRST_USE:
            from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_base_model(self.base_model, self.data_dir / "models"))

    def estimate(self, training_tokens: int, parameters: Mapping[str, Any]) -> Estimate:
        """Wall time on this machine, from a measured calibration; nothing is billed."""
        from shared.backends.local.calibrate import training_rate
        from shared.backends.local.trainer import resolve_base_model

        base = resolve_base_model(self.base_model, self.data_dir / "models")
        rate, device = training_rate(self.data_dir, base, dict(parameters))
        free = HourlyPrice("this machine", 0.0, "the local backend runs on this machine: nothing is billed")
        hosting = Hosting("this machine", 1, free, idle_teardown_hours(self.settings))
        return measured_training(training_tokens, rate, device, hosting)

    def submit(self, request: JobRequest, restart: bool = False) -> JobReport:
        unknown = set(request.parameters) - set(PARAMETERS)
        if unknown:
            raise BackendError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        spec = jobs.JobSpec(
            job_name=request.job_name,
            base_model=self.base_model,
            parameters=dict(request.parameters),
            experiment_name=f"chat_completion_{Path(self.base_model).name}",
            tracking_uri=self.tracking_uri,
            models_dir=str(self.data_dir / "models"),
            tags={DATASET_TAG: request.dataset, **request.tags},
            events_endpoint=local_settings(self.settings).job_events_endpoint,
            events_key=local_settings(self.settings).job_events_key,
        )
        state = jobs.submit(self.data_dir, spec, Path(request.prepared), restart=restart)
        return JobReport(state.job_name, state.status, state.reason)

    def job_status(self, job_name: str) -> JobReport:
        state = jobs.read_state(jobs.job_dir(self.data_dir, job_name))
        return JobReport(state.job_name, state.status, state.reason)

    def job_names(self) -> list[str]:
        root = self.data_dir / "jobs"
        return sorted(path.parent.name for path in root.glob("*/status.json")) if root.exists() else []

    def job_progress(self, job_name: str) -> dict[str, Any] | None:
        return jobs.read_progress(jobs.job_dir(self.data_dir, job_name))

    def job_log(self, job_name: str) -> Path:
        return jobs.job_dir(self.data_dir, job_name) / "trainer.log"

    def job_metrics(self, job_name: str) -> dict[str, Any]:
        path = jobs.job_dir(self.data_dir, job_name) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def register(self, job_name: str) -> ModelRef:
        status = self.job_status(job_name)
        if status.status != JobStatus.COMPLETED:
            raise BackendError(f"job {job_name} is {status.status}; only a Completed job has a model to register")
        directory = jobs.job_dir(self.data_dir, job_name)
        spec = jobs.read_spec(directory)
        metrics = self.job_metrics(job_name)
        name = model_name_for(spec.base_model, spec.tags.get(DATASET_TAG, "chat"))
        tags = {JOB_TAG: job_name, BASE_MODEL_TAG: spec.base_model, **spec.tags}
        version = registry.register(
            self.tracking_uri, self.data_dir, name, Path(metrics["model_folder"]), metrics.get("mlflow_run_id"), tags
        )
        return ModelRef(name, version)

    def deploy(self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]) -> None:
        folder = registry.model_folder(self.tracking_uri, model.name, model.version)
        endpoints.deploy(self.data_dir, endpoint, deployment, (model.name, model.version, folder), tags,
                         self.settings.endpoint_request_timeout_s)  # fmt: skip

    def continue_deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]
    ) -> DeployProgress:
        """Deploy and wait for the model to load (seconds, locally). A failure is reported, not
        cleaned up: the flow deletes the deployment once it has recorded it."""
        self.deploy(model, endpoint, deployment, tags)
        try:
            self.wait_ready(endpoint, deployment)
        except BackendError as error:
            return DeployProgress(DeployState.FAILED, str(error))
        return DeployProgress(DeployState.READY)

    def wait_ready(self, endpoint: str, deployment: str, timeout_s: float = 120) -> None:
        endpoints.wait_ready(self.data_dir, endpoint, deployment, timeout_s)

    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> None:
        endpoints.set_traffic(self.data_dir, endpoint, split)

    def delete_deployment(self, endpoint: str, deployment: str) -> bool:
        return endpoints.delete_deployment(self.data_dir, endpoint, deployment)

    def score(self, endpoint: str, deployment: str | None, body: dict[str, Any]) -> tuple[int | None, str]:
        try:
            status, reply = endpoints.invoke(self.data_dir, endpoint, body, deployment=deployment)
        except (OSError, ValueError) as error:  # refused, reset, timed out, not JSON: no answer
            return None, f"{type(error).__name__}: {error}"
        return status, json.dumps(reply)

    def held_out_losses(self, models: Sequence[ModelRef | None], test_file: str) -> list[float] | None:
        """Computed in one process of its own (each model loaded in turn), on this machine."""
        from shared.backends.local.trainer import resolve_base_model

        paths = [str(registry.model_folder(self.tracking_uri, model.name, model.version)) if model
                 else resolve_base_model(self.base_model, self.data_dir / "models") for model in models]  # fmt: skip
        command = [sys.executable, "-m", "shared.backends.local.evaluate", test_file, *paths]
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                                  timeout=EVALUATION_TIMEOUT_S, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BackendError(f"held-out losses took longer than {EVALUATION_TIMEOUT_S} s") from None
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"could not compute held-out losses: {reason}")
        return [float(found["loss"]) for found in json.loads(done.stdout)]

    def endpoint(self, name: str) -> Endpoint:
        return _endpoint(endpoints.get(self.data_dir, name))

    def invoke(self, endpoint: str, body: dict[str, Any], deployment: str | None = None) -> dict[str, Any]:
        status, reply = endpoints.invoke(self.data_dir, endpoint, body, deployment=deployment)
        if status != 200:
            error = reply.get("error", reply)
            message = error.get("message", error) if isinstance(error, dict) else error
            raise BackendError(f"endpoint {endpoint} answered {status}: {message}")
        return reply

    def keys(self, endpoint: str) -> dict[str, str]:
        return endpoints.keys(self.data_dir, endpoint)

    def list_endpoints(self) -> list[Endpoint]:
        return [_endpoint(found) for found in endpoints.list_endpoints(self.data_dir)]

    def delete_endpoint(self, name: str) -> bool:
        return endpoints.delete(self.data_dir, name)


def _endpoint(found: endpoints.LocalEndpoint) -> Endpoint:
    serving = max(found.deployments, key=lambda d: found.traffic.get(d.name, 0), default=None)
    return Endpoint(
        name=found.name,
        state=found.state,
        scoring_uri=found.scoring_uri,
        model=ModelRef(serving.model_name, serving.model_version) if serving else None,
        created_at=found.created_at,
        last_request_at=found.last_request_at,
        tags=found.tags,
        traffic=found.traffic,
    )
