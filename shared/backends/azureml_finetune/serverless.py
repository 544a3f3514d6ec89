"""Serverless endpoints for models fine-tuned serverless (Azure ML's `serverlessEndpoints`, through
azure-ai-ml's `ServerlessEndpoint`).

A serverless endpoint serves one model: it has no deployments and no traffic split, and Azure
allows one deployment per fine-tuned model. So each of the app's deployments (a model version)
is a serverless endpoint of its own, named after the app's endpoint and the deployment, and tagged
with both; the app's endpoint is the group of them, and the one tagged `traffic=100` serves it.
Its URL and key are that serverless endpoint's: they change when a new version takes over (the
ledger records the URL of each `deployed` run, and `status` shows it).

Scoring follows azureml-examples' serverless fine-tuning notebook
(sdk/python/jobs/finetuning/standalone/model-as-a-service/chat-completion): an OpenAI-style chat
completion at `<scoring URI>/v1/chat/completions` with the endpoint's key; the `/score` bodies the
flow sends are translated to it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.backends.azureml.workspace import enum_text, model_of_id, service_errors
from shared.backends.azureml_finetune.marketplace import subscribe
from shared.backends.interface import BackendError, DeployProgress, DeployState, Endpoint, ModelRef
from shared.vocabulary import MANAGED_BY, MANAGED_BY_TAG

if TYPE_CHECKING:
    from shared.backends.azureml.workspace import WorkspaceBackend

ENDPOINT_TAG = "endpoint"  # the app's endpoint a serverless endpoint belongs to
DEPLOYMENT_TAG = "deployment"
TRAFFIC_TAG = "traffic"  # "100": it serves the app's endpoint; "0": kept, or on trial
NAME_LIMIT = 32  # Azure ML endpoint names: 3-32 characters
CHAT_COMPLETIONS = "v1/chat/completions"
METRIC_DEFINITIONS_API_VERSION = "2018-01-01"
# The api-version azure-ai-ml 1.35.2 sends serverless endpoints with; its PATCH changes tags alone
# (ServerlessEndpoints_Update), where a PUT would send the whole resource again.
SERVERLESS_API_VERSION = "2024-01-01-preview"
log = logging.getLogger(__name__)


def serverless_name(endpoint: str, deployment: str) -> str:
    """The serverless endpoint of one deployment: the app's endpoint name, cut to fit, and the
    deployment's digest (`run-<digest>`), so the portal shows what it belongs to."""
    digest = deployment.removeprefix("run-")
    return f"{endpoint[: NAME_LIMIT - len(digest) - 1].rstrip('-')}-{digest}"


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A `/score` body (`input_data.input_string` as messages or as one conversation, generation
    `parameters`) as a chat-completion request; a chat-completion request as it is."""
    if "messages" in body:
        return dict(body)
    data = body.get("input_data") or {}
    conversation = data.get("input_string") or []
    if conversation and isinstance(conversation[0], list):
        conversation = conversation[0]
    parameters = data.get("parameters") or {}
    request: dict[str, Any] = {"messages": conversation}
    if "max_new_tokens" in parameters:
        request["max_tokens"] = parameters["max_new_tokens"]
    if parameters.get("do_sample") is False:
        request["temperature"] = 0  # greedy, as the evaluation gate asks
    else:
        request.update({key: parameters[key] for key in ("temperature", "top_p") if key in parameters})
    return request


class ServerlessEndpoints:
    """The endpoint half of the Backend interface, on serverless endpoints of the workspace."""

    def __init__(self, backend: WorkspaceBackend) -> None:
        self.backend = backend

    @property
    def _operations(self) -> Any:
        return self.backend.workspace.serverless_endpoints

    def _get(self, name: str) -> Any | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._operations.get(name)
        except ResourceNotFoundError:
            return None

    def _members(self, endpoint: str | None = None) -> list[Any]:
        """The serverless endpoints this app made (for `endpoint`, or all), oldest first."""
        found = [
            member
            for member in self._operations.list()
            if (member.tags or {}).get(MANAGED_BY_TAG) == MANAGED_BY
            and (member.tags or {}).get(ENDPOINT_TAG)
            and (endpoint is None or member.tags[ENDPOINT_TAG] == endpoint)
        ]
        return sorted(found, key=_created_at)

    def _member(self, endpoint: str, deployment: str | None) -> Any:
        """`deployment`'s serverless endpoint, or (None) the one serving `endpoint`."""
        if deployment:
            found = self._get(serverless_name(endpoint, deployment))
            if found is None:
                raise BackendError(f"no serverless endpoint for deployment {deployment} of endpoint {endpoint!r}")
            return found
        serving = [m for m in self._members(endpoint) if _serves(m)]
        if not serving:
            raise BackendError(f"no serverless endpoint serves endpoint {endpoint!r}")
        return serving[-1]

    def model_id(self, model: ModelRef) -> str:
        """The fine-tuned model in the workspace, as a serverless endpoint names it (azureml-examples:
        `azureml://locations/<region>/workspaces/<workspace id>/models/<name>/versions/<version>`)."""
        workspace = self.backend.workspace_facts
        return (f"azureml://locations/{workspace.location}/workspaces/{workspace._workspace_id}/models/"
                f"{model.name}/versions/{model.version}")  # fmt: skip

    def _ours(self, name: str) -> Any | None:
        """The serverless endpoint of that name, refused if this app did not make it."""
        found = self._get(name)
        if found is not None and (found.tags or {}).get(MANAGED_BY_TAG) != MANAGED_BY:
            raise BackendError(f"serverless endpoint {name} exists and is not managed by this app")
        return found

    @service_errors("deployment")
    def deploy(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str], base_model_id: Callable[[], str]
    ) -> DeployProgress:
        """Start what is missing: the base model's marketplace subscription (a partner's model),
        then the deployment's serverless endpoint, serving none of `endpoint`'s traffic yet.
        `base_model_id` is asked only when the endpoint is to be made."""
        from azure.ai.ml.entities import ServerlessEndpoint

        name = serverless_name(endpoint, deployment)
        if self._ours(name) is not None:
            return DeployProgress(DeployState.DEPLOYING)
        subscribed = subscribe(self.backend.workspace, base_model_id())
        if subscribed.state != DeployState.READY:
            return subscribed
        member_tags = {MANAGED_BY_TAG: MANAGED_BY, **tags, ENDPOINT_TAG: endpoint, DEPLOYMENT_TAG: deployment,
                       TRAFFIC_TAG: "0"}  # fmt: skip
        # Key authentication: the service's only mode for serverless endpoints made this way
        # (the SDK sends no authMode; Foundry's docs: "uses key authentication").
        self._operations.begin_create_or_update(
            ServerlessEndpoint(name=name, model_id=self.model_id(model), auth_mode="key", tags=member_tags)
        )
        return DeployProgress(DeployState.DEPLOYING)

    @service_errors("deployment")
    def continue_deployment(
        self, model: ModelRef, endpoint: str, deployment: str, tags: dict[str, str], base_model_id: Callable[[], str]
    ) -> DeployProgress:
        found = self._ours(serverless_name(endpoint, deployment))
        if found is None:
            return self.deploy(model, endpoint, deployment, tags, base_model_id)
        state = enum_text(found.provisioning_state).lower()
        if state in ("failed", "canceled"):
            why = f"serverless endpoint {found.name} for {model.name}:{model.version} is {state}"
            return DeployProgress(DeployState.FAILED, f"{why}: see it in Azure AI Foundry or Azure ML studio")
        return DeployProgress(DeployState.READY if state == "succeeded" else DeployState.DEPLOYING)

    @service_errors("routing traffic")
    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> None:
        """All of the endpoint's traffic to one deployment (or to none): its serverless endpoint is
        tagged as serving, the others as not, those first (never two serving at once)."""
        shares = {share for share in split.values() if share}
        if shares - {100} or sum(split.values()) not in (0, 100):
            raise BackendError(f"endpoint {endpoint}: serverless endpoints serve one deployment at a time, "
                               f"so the split {dict(split)} cannot be routed")  # fmt: skip
        members = self._members(endpoint)
        serving = {serverless_name(endpoint, name) for name, share in split.items() if share == 100}
        ready = {m.name for m in members if enum_text(m.provisioning_state).lower() == "succeeded"}
        if serving - ready:
            missing = ", ".join(sorted(serving - ready))
            raise BackendError(f"endpoint {endpoint}: no ready serverless endpoint {missing} to route its traffic to")
        for member in sorted(members, key=lambda m: m.name in serving):
            wanted = "100" if member.name in serving else "0"
            if (member.tags or {}).get(TRAFFIC_TAG) != wanted:
                url, version = f"https://management.azure.com{member.id}", {"api-version": SERVERLESS_API_VERSION}
                tags = {**(member.tags or {}), TRAFFIC_TAG: wanted}
                self.backend.management_request("PATCH", url, params=version, json={"tags": tags})

    @service_errors("deleting a deployment")
    def delete_deployment(self, endpoint: str, deployment: str) -> bool:
        """Start deleting the deployment's serverless endpoint; False when there is none, or it is
        not this app's (one of that name it refused to deploy over is never deleted)."""
        from azure.core.exceptions import ResourceNotFoundError

        name = serverless_name(endpoint, deployment)
        found = self._get(name)
        if found is None or (found.tags or {}).get(MANAGED_BY_TAG) != MANAGED_BY:
            return False
        try:
            self._operations.begin_delete(name)
        except ResourceNotFoundError:
            return False
        return True

    @service_errors("reading an endpoint")
    def endpoint(self, name: str) -> Endpoint:
        members = self._members(name)
        if not members:
            raise BackendError(f"no serverless endpoint of endpoint {name!r}")
        return self._endpoint(name, members, observe=False)

    def _endpoint(self, name: str, members: list[Any], observe: bool) -> Endpoint:
        """The app's endpoint from its serverless endpoints: the serving one's URL, model and state;
        the newest one's creation (the last change); the last request to any, when observed."""
        serving = [m for m in members if _serves(m)]
        shown = serving[-1] if serving else members[-1]
        requests = [self._last_request(m) for m in members] if observe else []
        seen = [last for observed, last in requests if last]
        return Endpoint(
            name=name,
            state=_state(shown),
            scoring_uri=shown.scoring_uri if serving else None,
            model=model_of_id(shown.model_id) if serving else None,
            created_at=_created_at(members[-1]),
            last_request_at=max(seen, default=None),
            tags={key: value for m in members for key, value in (m.tags or {}).items()},
            traffic={m.tags[DEPLOYMENT_TAG]: 100 if _serves(m) else 0 for m in members if DEPLOYMENT_TAG in m.tags},
            usage_observed=all(observed for observed, _ in requests) if observe else True,
        )

    def _last_request(self, member: Any) -> tuple[bool, str | None]:
        """(whether the endpoint's requests are observable, the last one). No source documents a
        metric of serverless endpoints, so the resource's own metric definitions are asked for one
        counting requests (Azure Monitor's Metric Definitions API); with none, nothing is known."""
        url = f"https://management.azure.com{member.id}/providers/microsoft.insights/metricDefinitions"
        try:
            answer = self.backend.management_request("GET", url, params={"api-version": METRIC_DEFINITIONS_API_VERSION})
        except Exception as error:  # no metrics for this resource type: unobserved, never an error
            log.info("no metric definitions for %s (%s): its requests are not observed", member.name, error)
            return False, None
        for definition in answer.get("value", []):
            metric = str((definition.get("name") or {}).get("value") or "")
            if re.search(r"request", metric, re.IGNORECASE) and definition.get("unit", "Count") == "Count":
                namespace = str(
                    definition.get("namespace") or "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints"
                )
                return True, self.backend.last_request_at(member.id, metric, namespace)
        return False, None

    @service_errors("reading endpoint keys")
    def keys(self, endpoint: str) -> dict[str, str]:
        keys = self._operations.get_keys(self._member(endpoint, None).name)
        return {"primary_key": keys.primary_key, "secondary_key": keys.secondary_key}

    @service_errors("scoring")
    def score(self, endpoint: str, deployment: str | None, body: dict[str, Any]) -> tuple[int | None, str]:
        """A chat completion from `deployment`'s serverless endpoint (None: the serving one), with
        its key as a bearer token (the Foundry Models API reference) and the headers it names."""
        try:
            member = self._member(endpoint, deployment)
        except BackendError as error:  # deleted meanwhile: no answer, as from an endpoint that is down
            return None, str(error)
        if not member.scoring_uri:
            return None, f"serverless endpoint {member.name} has no scoring URI yet ({member.provisioning_state})"
        key = self._operations.get_keys(member.name).primary_key
        headers = {**(member.headers or {}), "Authorization": f"Bearer {key}"}
        url = f"{member.scoring_uri.rstrip('/')}/{CHAT_COMPLETIONS}"
        return self.backend.post_json(url, headers, chat_request(body))

    @service_errors("listing endpoints")
    def list_endpoints(self) -> list[Endpoint]:
        groups: dict[str, list[Any]] = {}
        for member in self._members():
            groups.setdefault(member.tags[ENDPOINT_TAG], []).append(member)
        return [self._endpoint(name, members, observe=True) for name, members in groups.items()]

    @service_errors("deleting an endpoint")
    def delete_endpoint(self, name: str) -> bool:
        """Start deleting every serverless endpoint of the app's endpoint (each stops billing)."""
        members = self._members(name)
        for member in members:
            self._operations.begin_delete(member.name)
        return bool(members)


def _serves(member: Any) -> bool:
    return (member.tags or {}).get(TRAFFIC_TAG) == "100"


def _state(member: Any) -> str:
    """As managed endpoints spell it (the SDK snake-cases a serverless endpoint's: `succeeded`)."""
    return enum_text(member.provisioning_state).replace("_", " ").title().replace(" ", "")


def _created_at(member: Any) -> str:
    """When it was made, ISO 8601 in UTC as managed endpoints' `createdAt` ("" when unknown)."""
    made = getattr(getattr(member, "system_data", None), "created_at", None)
    if isinstance(made, datetime):
        return (made if made.tzinfo else made.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    return str(made or "")
