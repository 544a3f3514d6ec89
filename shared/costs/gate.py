"""The gate before any spend: a prepared upload's tokens counted (exactly when the base model's
tokenizer is at hand), its fine-tune's time and cost estimated, and the budget checked, all before
a job exists. The report gets the counts and the estimate; a refusal says why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.costs.estimate import Estimate, budget_refusal

if TYPE_CHECKING:
    from shared.backends.interface import Backend
    from shared.datasets.prepare import Preparation


@dataclass(frozen=True)
class Verdict:
    estimate: Estimate | None
    refusal: str | None  # None: the fine-tune may go ahead


def check_before_spending(backend: Backend, preparation: Preparation) -> Verdict:
    """Count, estimate and check the budget of an accepted preparation; updates its report."""
    from shared.backends.interface import BackendError, TransientBackendError

    report = preparation.report
    settings, parameters = report["settings"], report["training_overrides"]
    tokenizer = backend.tokenizer()
    if tokenizer is not None:
        from shared.datasets.tokens import count_into_report

        count_into_report(preparation, tokenizer)
    training = report["statistics"]["training_tokens"]["total"]
    budget = float(settings.get("max_training_cost_usd") or 0)
    try:
        estimate = backend.estimate(training, parameters)
    except TransientBackendError:
        raise  # the run stays received; the redelivery estimates again
    except BackendError as error:
        report["estimate"] = {"error": str(error)}
        if budget:
            return Verdict(None, f"the training cost cannot be estimated ({error}), so the budget of "
                                 f"${budget:g} cannot be kept")  # fmt: skip
        return Verdict(None, None)
    report["estimate"] = estimate.as_dict()
    return Verdict(estimate, budget_refusal(estimate, budget))
