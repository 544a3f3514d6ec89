"""What every backend does, behind one small interface, and the values backends and the flow
exchange. Every mutating call is idempotent: called again with the same arguments it finds what
the first call made instead of making a second one."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from shared.vocabulary import BASE_MODEL_TAG, DATASET_TAG, JobStatus

if TYPE_CHECKING:
    from shared.costs.estimate import Estimate
    from shared.validation import SettingsReader


def model_name_for(base_model: str, dataset: str) -> str:
    """`{base}-{dataset}`, as the walkthrough's `{model}-ultrachat-200k`, '/' and odd characters as '-'."""
    base = base_model.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{dataset}").strip("-")


def model_description(tags: Mapping[str, str], job_name: str) -> str:
    """What a registered model is, from its lineage tags."""
    return f"{tags.get(BASE_MODEL_TAG, '?')} fine-tuned on {tags.get(DATASET_TAG, '?')} by job {job_name}"


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
class JobReport:
    """What a backend says about a job."""

    job_name: str
    status: JobStatus
    reason: str | None = None
    notes: tuple[str, ...] = ()  # what a submission's checks could not check, for the run's history


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class Endpoint:
    """A scoring URL behind a key, hosting one or more deployments (model versions) between which
    its traffic is split; the URL and keys stay as deployments come and go."""

    name: str
    state: str  # Creating, Succeeded, Failed
    scoring_uri: str | None
    model: ModelRef | None  # what the deployment with the most traffic serves
    created_at: str
    last_request_at: str | None
    tags: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)  # deployment name -> percent
    # False: the backend cannot see the endpoint's requests (`last_request_at` is None because
    # nobody knows, not because nobody called), so idleness is no reason to tear it down.
    usage_observed: bool = True


class DeployState(StrEnum):
    DEPLOYING = "deploying"  # the backend is still at it; ask again later
    READY = "ready"  # the deployment answers at 0% traffic (the deployment header reaches it)
    FAILED = "failed"  # the deployment failed; the flow records why, then deletes it


@dataclass(frozen=True)
class DeployProgress:
    state: DeployState
    message: str | None = None


Conversation = list[dict[str, str]]


class Backend(Protocol):
    # False: an endpoint serves one deployment at a time (a split is all or nothing), so a new
    # version takes all the traffic once it passes the evaluation gate.
    splits_traffic: bool

    def prepared_location(self, run_id: str) -> AbstractContextManager[str]:
        """Where the backend reads a run's prepared files (`prepared/<run id>/`) while it submits."""
        ...

    def tokenizer(self) -> Any | None:
        """The base model's tokenizer with its chat template, loaded, if this backend has one at
        hand: token counts are then exact. None: they are estimates."""
        ...

    def estimate(self, training_tokens: int, parameters: Mapping[str, Any]) -> Estimate:
        """The time and cost of fine-tuning on `training_tokens` with `parameters`, and of hosting
        the result; reads only, creates nothing."""
        ...

    def submit(self, request: JobRequest, restart: bool = False) -> JobReport: ...

    def job_status(self, job_name: str) -> JobReport: ...

    def job_metrics(self, job_name: str) -> dict[str, Any]: ...

    def register(self, job_name: str) -> ModelRef: ...

    def deploy(self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]) -> None:
        """Start what is missing, returning at once: the endpoint (created with `tags` the first
        time; its URL and keys never change afterwards), then `deployment` serving `model` at 0%
        traffic."""
        ...

    def continue_deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str]
    ) -> DeployProgress:
        """Move `deployment` one step on (creating what is still missing), never blocking for
        long: DEPLOYING, READY (it answers at 0% traffic) or FAILED with the reason."""
        ...

    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> None:
        """Route `split` (deployment -> percent, summing to 100 or, to stop serving, 0); every
        deployment left out gets 0%."""
        ...

    def delete_deployment(self, endpoint: str, deployment: str) -> bool:
        """Delete one deployment of an endpoint (it must take no traffic); False if there was none."""
        ...

    def score(self, endpoint: str, deployment: str | None, body: dict[str, Any]) -> tuple[int | None, str]:
        """POST `body` to the endpoint's scoring URI with its key, to `deployment` whatever the
        traffic split when given (the `azureml-model-deployment` header): (status, body), or
        (None, why) when no answer came."""
        ...

    def held_out_losses(self, models: Sequence[ModelRef | None], test_file: str) -> list[float] | None:
        """The mean assistant-token loss of each of `models` (None: the base model) on the
        conversations of the JSON Lines file `test_file`, when this backend can compute them;
        None when it cannot (the flow then uses the losses the jobs logged)."""
        ...

    def endpoint(self, name: str) -> Endpoint: ...

    def invoke(self, endpoint: str, body: dict[str, Any], deployment: str | None = None) -> dict[str, Any]: ...

    def keys(self, endpoint: str) -> dict[str, str]: ...

    def list_endpoints(self) -> list[Endpoint]: ...

    def delete_endpoint(self, name: str) -> bool: ...


class BackendError(ValueError):
    """A backend refused or failed a request; the message says why."""


class TransientBackendError(BackendError):
    """A failure worth trying again later (throttling, a conflict with a concurrent change, the
    service or the network unavailable): the flow leaves the run where it is."""


@dataclass(frozen=True)
class BackendPlugin:
    """What the rest of the app knows about a backend, and nothing more."""

    name: str
    setting_names: tuple[str, ...]  # every app setting it reads
    # Its settings section, read from the environment when it is the backend configured.
    read_section: Callable[[SettingsReader], Any]
    default_base_model: str
    # Where its job events come from, when JOB_EVENTS_TOPICS does not say.
    default_job_event_topics: Callable[[Any], tuple[str, ...]]
    backend_class: str  # "module:Class", imported only when a backend object is made
    # The `runType` of the job events that finish its jobs; empty: any (the job name decides).
    job_run_types: tuple[str, ...]
    runs_in_azure: bool  # False: a developer's machine only (its settings stay out of infra/)
