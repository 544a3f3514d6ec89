"""Marketplace subscriptions: a partner's model (any registry but `azureml`: `azureml-mistral`,
`azureml-meta`...) is fine-tuned and served serverless only under a subscription of the workspace
to its Azure Marketplace offer; Microsoft's models need none (Foundry's docs, "Deploy models as
serverless API deployments"; azureml-examples' serverless fine-tuning notebook subscribes before it
submits the job, to the base model's registry id without its version)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from shared.backends.azureml.component import REGISTRY
from shared.backends.azureml.workspace import enum_text
from shared.backends.interface import DeployProgress, DeployState

if TYPE_CHECKING:
    from azure.ai.ml import MLClient


def needs_subscription(base_model_id: str) -> bool:
    return bool(base_model_id) and not base_model_id.startswith(f"azureml://registries/{REGISTRY}/")


def subscription_name(model_id: str) -> str:
    """A new subscription's name: after the model, as the examples name theirs (`<model>-sub`)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", model_id.rstrip("/").rsplit("/", 1)[-1]).strip("-")[:45] + "-sub"


def _find(workspace: MLClient, base_model_id: str) -> Any | None:
    """The workspace's subscription to the model's offer, whatever its name (one made in the
    portal or by a notebook counts). azure-ai-ml 1.35 fails to read a subscription that has no
    marketplace plan yet (AttributeError): such a listing is read as not there yet."""
    try:
        found = list(workspace.marketplace_subscriptions.list())
    except AttributeError:
        return None
    return next((s for s in found if (s.model_id or "").rstrip("/") == base_model_id.rstrip("/")), None)


def subscribe(workspace: MLClient, base_model_id: str, wait_s: float = 0) -> DeployProgress:
    """READY when the workspace is subscribed to the offer of `base_model_id` (or the model needs
    no subscription); else the subscription is created when missing (waiting up to `wait_s` for
    it), and DEPLOYING while it is under way, FAILED when it cannot be used."""
    from azure.ai.ml.entities import MarketplaceSubscription

    if not needs_subscription(base_model_id):
        return DeployProgress(DeployState.READY)
    found = _find(workspace, base_model_id)
    if found is None:
        name = subscription_name(base_model_id)
        poller = workspace.marketplace_subscriptions.begin_create_or_update(
            MarketplaceSubscription(name=name, model_id=base_model_id)
        )
        if wait_s:
            poller.wait(wait_s)
        found = _find(workspace, base_model_id)
        if found is None:
            return DeployProgress(DeployState.DEPLOYING, f"subscribing to {base_model_id} ({name})")
    status, state = enum_text(found.status).lower(), enum_text(found.provisioning_state).lower()
    if state in ("failed", "canceled") or status in ("suspended", "unsubscribed"):
        why = f"marketplace subscription {found.name} to {base_model_id} is {status or state}"
        return DeployProgress(DeployState.FAILED, f"{why}: the model's offer cannot be used until it is subscribed")
    if state == "succeeded" and status == "subscribed":
        return DeployProgress(DeployState.READY)
    return DeployProgress(DeployState.DEPLOYING, f"marketplace subscription {found.name} is {status or state}")
