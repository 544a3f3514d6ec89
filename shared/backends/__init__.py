"""The backends that train, register and serve models, behind one small interface.

`local` (the default) does it all on this machine; `azureml` on Azure Machine Learning. Every
mutating call is idempotent: called again with the same arguments it finds what the first call
made instead of making a second one."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shared.settings import Settings

TERMINAL_JOB_STATUSES = ("Completed", "Failed", "Canceled")
MANAGED_BY = "finetune-on-upload"  # the `managed-by` tag on everything this app creates


def model_name_for(base_model: str, dataset: str) -> str:
    """`{base}-{dataset}`, as the walkthrough's `{model}-ultrachat-200k`, '/' and odd characters as '-'."""
    base = base_model.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{dataset}").strip("-")


def job_name_for(run_id: str) -> str:
    """A deterministic job name per run: a redelivered upload finds the job it already submitted."""
    return f"ft-{run_id}"


@dataclass(frozen=True)
class JobRequest:
    job_name: str
    prepared: str  # where train_sft.jsonl and test_sft.jsonl are (a folder, or a storage URI)
    dataset: str  # a short name for the data, used in the model's name
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides of the training defaults
    tags: dict[str, str] = field(default_factory=dict)  # lineage: run id, dataset sha256


@dataclass(frozen=True)
class JobStatus:
    job_name: str
    status: str  # Azure ML's names: Queued, Running, Completed, Failed, Canceled
    reason: str | None = None
    notes: tuple[str, ...] = ()  # what a submission's checks could not check, for the run's history

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class Endpoint:
    name: str
    state: str  # Creating, Succeeded, Failed
    scoring_uri: str | None
    model: ModelRef | None
    created_at: str
    last_request_at: str | None
    tags: dict[str, str] = field(default_factory=dict)


class DeployState(StrEnum):
    DEPLOYING = "deploying"  # the backend is still at it; ask again later
    DEPLOYED = "deployed"  # smoke-tested and taking traffic
    FAILED = "failed"  # the deployment or its smoke test failed; nothing is left billing


@dataclass(frozen=True)
class SmokeAttempt:
    """One request of a smoke test: the request shape, the HTTP status (None: no answer) and the
    start of the answer."""

    shape: str
    status: int | None
    excerpt: str
    answered: bool


@dataclass(frozen=True)
class DeployProgress:
    state: DeployState
    message: str | None = None
    smoke_test: tuple[SmokeAttempt, ...] = ()


Conversation = list[dict[str, str]]


class Backend(Protocol):
    def submit(self, request: JobRequest, restart: bool = False) -> JobStatus: ...

    def job_status(self, job_name: str) -> JobStatus: ...

    def job_metrics(self, job_name: str) -> dict[str, Any]: ...

    def register(self, job_name: str) -> ModelRef: ...

    def deploy(self, model: ModelRef, endpoint: str, tags: dict[str, str]) -> Endpoint: ...

    def advance(
        self, model: ModelRef, endpoint: str, tags: dict[str, str], conversation: Callable[[], Conversation]
    ) -> DeployProgress:
        """Move a deployment one step on, never blocking for long; once it serves, smoke-test it
        with the held-out `conversation` (read only then) before it takes traffic."""
        ...

    def endpoint(self, name: str) -> Endpoint: ...

    def invoke(self, endpoint: str, body: dict[str, Any], deployment: str | None = None) -> dict[str, Any]: ...

    def keys(self, endpoint: str) -> dict[str, str]: ...

    def list_endpoints(self) -> list[Endpoint]: ...

    def delete_endpoint(self, name: str) -> bool: ...


class BackendError(ValueError):
    """A backend refused or failed a request; the message says why."""


def get_backend(settings: Settings) -> Backend:
    if settings.ml_backend == "local":
        from shared.backends.local.backend import LocalBackend

        return LocalBackend(settings)
    from shared.backends.azureml.backend import AzureMLBackend

    return AzureMLBackend(settings)
