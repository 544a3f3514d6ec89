"""What a fine-tune will take and cost, before anything is submitted, and what it took after.

GPU time comes from the training tokens and the published throughput of the model's size on the
cluster's GPUs (`throughput`); money from the hourly price of the VM size (`prices`). The figures
are estimates for planning and for the budget guard, not a quote: see the README for how far to
trust them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.costs import throughput
from shared.costs.prices import HourlyPrice
from shared.ncrontab import Schedule

if TYPE_CHECKING:
    from shared.settings import Settings

# Beside the training itself, a pipeline run starts the cluster's node, downloads the model and
# the data, preprocesses, evaluates and saves: an allowance, not a measured figure.
PIPELINE_OVERHEAD_HOURS = 0.5


@dataclass(frozen=True)
class Estimate:
    """A fine-tune's time and money, and what the figures rest on (`basis`). None: unknown."""

    training_hours: float | None
    training_usd: float | None
    hosting_usd_per_hour: float | None = None
    hosting_usd_until_teardown: float | None = None  # an endpoint nobody calls, until the janitor deletes it
    basis: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}

    @property
    def summary(self) -> str:
        hours = f"{self.training_hours:.2f} h" if self.training_hours is not None else "unknown time"
        money = f"${self.training_usd:.2f}" if self.training_usd is not None else "an unknown price"
        return f"about {hours} of training for {money}"


@dataclass(frozen=True)
class Hosting:
    """The endpoint a fine-tune will be deployed to: its VM size, instances and price."""

    vm_size: str
    instances: int
    price: HourlyPrice | None
    hours_until_teardown: float  # idle time before the janitor deletes an endpoint nobody calls


def gpu_training(
    training_tokens: int,
    base_model: str,
    vm_size: str,
    gpus: int,
    lora: bool,
    price: HourlyPrice | None,
    hosting: Hosting,
) -> Estimate:
    """A fine-tune on one node of `vm_size` using `gpus` of its GPUs."""
    billions = throughput.model_billions(base_model)
    size = throughput.vm_size(vm_size)
    basis: dict[str, Any] = {
        "training_tokens": training_tokens,
        "base_model": base_model,
        "model_billions": billions,
        "vm_size": vm_size,
        "gpus": gpus,
        "method": "LoRA" if lora else "full fine-tune",
        "training_price_usd_per_hour": price.usd_per_hour if price else None,
        "training_price_source": price.source if price else "no price known for this VM size",
        **_hosting_basis(hosting),
    }
    rate = throughput.tokens_per_second(billions, size.gpu, gpus, lora) if billions and size else None
    if rate is None:
        basis["unknown"] = (
            f"no throughput figure for {base_model} on {vm_size}: the estimate knows "
            f"{', '.join(throughput.MODEL_BILLIONS)} and {', '.join(throughput.VM_SIZES)}"
        )
        hours = None
    else:
        basis["tokens_per_second"] = round(rate)
        basis["overhead_hours"] = PIPELINE_OVERHEAD_HOURS
        hours = training_tokens / rate / 3600 + PIPELINE_OVERHEAD_HOURS
    usd = hours * price.usd_per_hour if hours is not None and price else None
    return Estimate(hours, usd, *_hosting_costs(hosting), basis=basis)


def measured_training(training_tokens: int, tokens_per_second: float, device: str, hosting: Hosting) -> Estimate:
    """A fine-tune on this machine, at a throughput measured on it: time, and no money."""
    hours = training_tokens / tokens_per_second / 3600
    basis = {"training_tokens": training_tokens, "tokens_per_second": round(tokens_per_second, 1),
             "device": device, "measured": "a short calibration run of the trainer on this machine",
             "training_price_usd_per_hour": 0.0, "training_price_source": "this machine: nothing is billed",
             **_hosting_basis(hosting)}  # fmt: skip
    return Estimate(hours, 0.0, *_hosting_costs(hosting), basis=basis)


def _hosting_basis(hosting: Hosting) -> dict[str, Any]:
    return {
        "hosting_vm_size": hosting.vm_size,
        "hosting_instances": hosting.instances,
        "hosting_price_source": hosting.price.source if hosting.price else "no price known for this VM size",
        "hosting_hours_until_teardown": round(hosting.hours_until_teardown, 3),
    }


def _hosting_costs(hosting: Hosting) -> tuple[float | None, float | None]:
    if hosting.price is None:
        return None, None
    per_hour = hosting.price.usd_per_hour * hosting.instances
    return per_hour, per_hour * hosting.hours_until_teardown


def budget_refusal(estimate: Estimate, budget_usd: float) -> str | None:
    """Why a fine-tune must not start under a budget of `budget_usd` (0: no limit), or None."""
    if not budget_usd:
        return None
    if estimate.training_usd is None:
        why = estimate.basis.get("unknown") or estimate.basis.get("training_price_source")
        return f"the training cost cannot be estimated ({why}), so the budget of ${budget_usd:g} cannot be kept"
    if estimate.training_usd > budget_usd:
        return (f"the estimated training cost (${estimate.training_usd:.2f}, {estimate.summary}) is over the "
                f"budget of ${budget_usd:g}")  # fmt: skip
    return None


def actual_cost(hours: float, usd_per_hour: float | None) -> dict[str, Any]:
    """Spent time and money, from the recorded start and end (hours) and the hourly price."""
    return {"hours": round(hours, 4), "usd": round(hours * usd_per_hour, 4) if usd_per_hour is not None else None}


def idle_teardown_hours(settings: Settings) -> float:
    """How long an endpoint nobody calls lives: until the first janitor run after it is both
    ENDPOINT_MIN_AGE_MINUTES old and ENDPOINT_IDLE_MINUTES idle (at worst one schedule interval
    later)."""
    schedule = Schedule(settings.janitor_schedule)
    first = schedule.next_after(datetime.now(UTC))
    interval = (schedule.next_after(first) - first).total_seconds() / 60
    return (max(settings.janitor.idle_minutes, settings.janitor.min_age_minutes) + interval) / 60


def deployment_vcpus(instances: int, vcpus_per_instance: int, skips_reservation: bool) -> int:
    """vCPU quota a managed online deployment needs: `ceil(1.2 * instances) * vCPUs` (Azure ML
    reserves 20% for upgrades), or `instances * vCPUs` on sizes exempt from the reservation
    (learn.microsoft.com/azure/machine-learning/how-to-manage-quotas)."""
    return (instances if skips_reservation else math.ceil(1.2 * instances)) * vcpus_per_instance
