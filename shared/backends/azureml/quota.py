"""vCPU quota, checked before anything is created: Azure ML compute clusters and managed online
deployments draw on the subscription's Azure ML quota per VM family and region, which the
workspace's usage API reports (GET .../locations/{region}/usages) beside the VM size API that names
each size's family and vCPUs (GET .../locations/{region}/vmSizes).

azure-ai-ml 1.35 returns these as entities whose attributes carry the service's camelCase names
(`currentValue`, `vCPUs`, `name` a dict): read through `_field`, which takes either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.costs.estimate import deployment_vcpus
from shared.costs.throughput import vm_size as known_vm_size

TOTAL_USAGE = "total cluster dedicated regional vcpus"


@dataclass(frozen=True)
class Usage:
    label: str
    in_use: int
    limit: int

    @property
    def free(self) -> int:
        return self.limit - self.in_use


def _field(entity: Any, snake: str, camel: str) -> Any:
    value = getattr(entity, snake, None)
    return value if value is not None else getattr(entity, camel, None)


def _name(usage: Any) -> tuple[str, str]:
    """(value, localized value) of a usage's name, a dict or an object."""
    name = usage.name
    if isinstance(name, dict):
        return str(name.get("value", "")), str(name.get("localizedValue") or name.get("localized_value") or "")
    return str(getattr(name, "value", "")), str(_field(name, "localized_value", "localizedValue") or "")


def size_facts(sizes: list[Any], vm_size: str) -> tuple[int, str] | None:
    """(vCPUs, quota family) of `vm_size` from the VM size API, None if it does not list it."""
    for size in sizes:
        if (size.name or "").lower() == vm_size.lower():
            vcpus, family = _field(size, "v_cp_us", "vCPUs"), getattr(size, "family", None)
            return (int(vcpus), str(family)) if vcpus and family else None
    return None


def dedicated_usages(usages: list[Any], family: str) -> list[Usage]:
    """The subscription's dedicated-vCPU rows for `family` and the regional total (not the
    low-priority rows, nor the per-workspace or per-cluster breakdowns)."""
    found = []
    for usage in usages:
        value, label = _name(usage)
        kind = str(getattr(usage, "type", "") or "").lower()
        if "/workspaces/" in kind or "/computes/" in kind or "dedicated" not in label.lower():
            continue
        if value.lower() == family.lower() or label.lower().startswith(TOTAL_USAGE):
            in_use, limit = _field(usage, "current_value", "currentValue"), usage.limit
            if in_use is not None and limit is not None:
                found.append(Usage(label or value, int(in_use), int(limit)))
    return found


def refusal(purpose: str, vm_size: str, vcpus: int, family: str, region: str, usages: list[Usage]) -> str | None:
    """Why `vcpus` of `family` cannot be had in `region`, or None (also when the service reports
    no quota for the family: that is said elsewhere as a note, never guessed)."""
    for usage in usages:
        if usage.free < vcpus:
            return (
                f"not enough Azure ML quota in {region} for {purpose}: {vm_size} needs {vcpus} vCPUs of "
                f"{family}, and {usage.label} has {max(usage.free, 0)} free ({usage.in_use} of {usage.limit} in "
                "use); request more (Azure portal, Quotas, Machine learning) or choose another size or region"
            )
    return None


def deployment_need(vm_size: str, vcpus_per_instance: int, instances: int) -> int:
    known = known_vm_size(vm_size)
    return deployment_vcpus(instances, vcpus_per_instance, skips_reservation=bool(known and known.skips_reservation))
