"""The gate before any spend: a prepared upload's tokens counted (exactly when the base model's
tokenizer is at hand), its fine-tune's time and cost estimated, and the budget checked, all before
a job exists. The report gets the counts and the estimate; a refusal says why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.costs.estimate import Estimate, budget_refusal
from shared.vocabulary import TEST_FILE, TRAIN_FILE

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
    _count_exactly(backend, preparation)
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


def _count_exactly(backend: Backend, preparation: Preparation) -> None:
    tokenizer = backend.tokenizer()
    if tokenizer is None:
        return
    from shared.datasets.tokens import count_tokens

    report = preparation.report
    statistics = report["statistics"]
    statistics["tokens"], statistics["training_tokens"] = count_tokens(
        preparation.out_dir / TRAIN_FILE,
        preparation.out_dir / TEST_FILE,
        tokenizer,
        str(getattr(tokenizer, "name_or_path", "base model")).rstrip("/").rsplit("/", 1)[-1],
        report["settings"]["effective_max_seq_length"],
        statistics["training_tokens"]["epochs"],
    )
